"""Test-only plugins and callbacks that tests/test_checkpoint_safety.py passes to ``vidalign fit`` on the command
line (``--trainer.plugins`` / ``--trainer.callbacks+=``; the test puts this folder on PYTHONPATH)."""
import io
import os
import time

import lightning as L
import torch

from lightning_vidalign.checkpointing import AtomicCheckpointIO


class BlockingCheckpointIO(AtomicCheckpointIO):
    """The library's atomic save, except that save number ``block_at`` writes half of its bytes, fsyncs them,
    writes the temporary file's path to ``marker`` and then blocks (the test kills the process with SIGKILL)."""

    def __init__(self, marker: str, block_at: int = 2):
        super().__init__()
        self.marker, self.block_at, self.saves = marker, block_at, 0

    def write(self, checkpoint, f) -> None:
        self.saves += 1
        if self.saves < self.block_at:
            return super().write(checkpoint, f)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        with open(self.marker + ".part", "w") as m:
            m.write(f.name)
        os.replace(self.marker + ".part", self.marker)
        time.sleep(3600)


class DumpAtTrainStart(L.Callback):
    """Writes ``out`` with the adapters, global step and optimizer state size as training starts."""

    def __init__(self, out: str):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        lora = {k: v.detach().cpu().clone() for k, v in pl_module.backbone.trainable_state_dict().items()}
        opt_state = sum(len(s) for s in trainer.optimizers[0].state.values())
        torch.save({"lora": lora, "global_step": trainer.global_step, "batches": pl_module.batches_seen, "optimizer_state_entries": opt_state,
                    "checkpoint_io": type(trainer.strategy.checkpoint_io).__name__}, self.out)
