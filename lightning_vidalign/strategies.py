"""Strategies shipped as config fragments (``configs/strategies/*.yaml``)."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (torch ``fully_shard``) over every process of the run: data-parallel size =
    ``num_nodes × devices`` (the world size), tensor-parallel size 1.

    Lightning's ``ModelParallelStrategy(data_parallel_size="auto")`` resolves the data-parallel size to
    the number of *nodes* and the tensor-parallel size to the devices per node, so a one-node,
    2-device run fails (``data_parallel_size=1 and tensor_parallel_size=1 multiplied should equal the
    world size (2)``); our modules shard data-parallel only (``VideoAlignModule.configure_model``).
    This subclass sets the data-parallel size to the world size once the process group exists, so the
    same fragment runs on 1 device, 8 GPUs or 2 × 8 under SLURM without computing anything.

    Args:
        save_distributed_checkpoint: per-rank shard files (True) or one consolidated file written by
            rank 0 (False, our default: adapter-only checkpoints, resume and LoRA export work as
            without sharding).
        process_group_backend: ``nccl`` / ``gloo`` (None: Lightning's choice for the accelerator).
        timeout: process-group timeout.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        self._data_parallel_size = self.world_size  # read by ModelParallelStrategy.setup_environment next

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load (which reads the file itself, not through the ``CheckpointIO``), preceded by the
        module's identity check (``VideoAlignModule.check_checkpoint_identity``: refused before any weight is
        loaded) and with a truncated or corrupt file named (``CorruptCheckpointError``, issue 20)."""
        from lightning_vidalign.checkpointing import naming_corrupt_checkpoint

        module = self.lightning_module
        checked = os.path.isfile(checkpoint_path) and hasattr(module, "check_checkpoint_identity")
        if checked:
            with naming_corrupt_checkpoint(checkpoint_path):
                peek = torch.load(checkpoint_path, mmap=True, map_location="cpu", weights_only=False)
            module.check_checkpoint_identity(peek)
            del peek
        with naming_corrupt_checkpoint(checkpoint_path):
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if checked:
            checkpoint["_vidalign_identity_checked"] = True
        return checkpoint


__all__ = ["FSDP2Strategy"]
