"""Data- and sequence-parallel plumbing of :class:`~lightning_vidalign.module.VideoAlignModule` (issue 33: out of the base
module): the rank-aware generators, the data-parallel / sequence-parallel groups and collectives, per-rank checkpoint
state, and the FSDP2 / sequence-parallel wiring of ``configure_model``."""
from __future__ import annotations

import hashlib

import torch
import torchmetrics
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor


class DistributedMixin:
    """Rank-aware randomness and collectives of a :class:`~lightning_vidalign.module.VideoAlignModule` (a
    ``LightningModule``: uses its ``trainer``, ``global_rank``, ``all_gather``). Settings it reads: ``seed``,
    ``batches_seen``, ``sequence_parallel_size``, ``fsdp_param_dtype``, ``backbone``."""

    sequence_parallel_size: int = 1
    _sp_mesh = None  # the (data, ring, ulysses) device mesh once sequence parallelism is on

    def generator(self, tag: int = 0, batch: int | None = None) -> torch.Generator:
        """A CPU generator seeded from ``(seed, rank, batch, tag)`` (rank-aware, resumable), ``rank`` the
        data-parallel rank (:attr:`data_parallel_rank`: the global rank without sequence parallelism; with it, the
        same for every rank of a sequence-parallel group, so they draw the same noise).

        ``batch`` defaults to :attr:`batches_seen` (1-based index of the current training batch).
        """
        batch = self.batches_seen if batch is None else batch
        key = f"{self.seed}/{self.data_parallel_rank}/{batch}/{tag}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel groups: ``world size / sequence_parallel_size`` (1 without a trainer)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return max(1, world // self.sequence_parallel_size)

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel index ``global_rank // sequence_parallel_size`` (the global rank without sequence
        parallelism): what shards the data and seeds the generators."""
        rank = self.global_rank if self._trainer is not None else 0
        return rank // self.sequence_parallel_size

    def sequence_parallel_group(self):
        """The process group of this rank's sequence-parallel group (None when sequence parallelism is off)."""
        return None if self._sp_mesh is None else self._sp_mesh["ulysses"].get_group()

    def data_parallel_group(self):
        """The process group of the ranks holding the same token shard of different clips (``mesh["data"]``;
        None when sequence parallelism is off: the whole world)."""
        return None if self._sp_mesh is None else self._sp_mesh["data"].get_group()

    def sequence_parallel_broadcast(self, x: Tensor) -> Tensor:
        """``x`` of the first rank of this rank's sequence-parallel group, on every rank of it (collective within the
        group; ``x`` itself when sequence parallelism is off). Used where a group must take one decision from
        values every rank computed (rewards: the same rollouts, but a reward need not be bitwise deterministic)."""
        group = self.sequence_parallel_group()
        if group is None:
            return x
        out = x.detach().clone().contiguous()
        torch.distributed.broadcast(out, group=group, group_src=0)
        return out

    def gather_data_parallel(self, x: Tensor) -> Tensor:
        """All-gather a per-sample tensor over the data-parallel ranks, concatenated in data-parallel rank order
        (``x`` itself on one process). With sequence parallelism the copies of the ranks of a group are dropped but
        the first's (``(W, n, ...)`` gathered, every ``s``-th row kept)."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return x
        return self.all_gather(x)[:: self.sequence_parallel_size].flatten(0, 1)

    def gather_per_rank(self, tensors: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Per-rank state for the checkpoint: ``[rank 0's tensors, rank 1's, ...]`` (on CPU).

        Call it from ``on_save_checkpoint`` (which runs on every rank): the all-gather is collective.
        Tensors must have the same shapes on every rank. With one process: ``[tensors]``.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1 or not tensors:
            return [{k: v.detach().cpu() for k, v in tensors.items()} for _ in range(max(1, world))]
        gathered = {k: self.all_gather(v.to(self.device)).cpu() for k, v in tensors.items()}
        return [{k: v[r] for k, v in gathered.items()} for r in range(self.trainer.world_size)]

    def offloaded_state_names(self) -> list[str]:
        """Names (in this module) of the parameters and buffers of the backbone's offloaded frozen modules
        (``offload_frozen``), which stay on CPU: DDP is told to ignore them (``_ddp_params_and_buffers_to_ignore``;
        it refuses a module on two device types, and they are frozen, equal on every rank). ``[]`` without offload."""
        backbone = self.backbone
        if not getattr(backbone, "offload_frozen", False):
            return []
        frozen = {id(t) for m in backbone.vae_modules() + backbone.encoder_modules() if m is not None for t in [*m.parameters(), *m.buffers()]}
        return [n for n, t in [*self.named_parameters(), *self.named_buffers()] if id(t) in frozen]

    def check_sequence_parallel(self) -> None:
        """Refuse ``sequence_parallel_size > 1`` where it cannot work, naming the setting and the value: a size not
        dividing the world size; a strategy other than DDP / FSDP2 (DeepSpeed is untested with it); a trained VAE
        (replicated on every rank of a group: the group sum would count its gradient ``s`` times)."""
        from lightning.pytorch.strategies import DDPStrategy

        from lightning_vidalign.sequence_parallel import SETTING, data_parallel_layout

        s = self.sequence_parallel_size
        data_parallel_layout(self.trainer.world_size, s)
        if not isinstance(self.trainer.strategy, (DDPStrategy, ModelParallelStrategy)):
            raise ValueError(f"sequence_parallel_size={s} runs under DDP or FSDP2 (configs/strategies/ddp.yaml, fsdp2.yaml); "
                             f"the strategy is {type(self.trainer.strategy).__name__}: change it or set {SETTING} 1")
        if getattr(self.backbone, "train_vae", False):
            raise ValueError(f"sequence_parallel_size={s} with backbone.train_vae: the VAE is not split over the group; set {SETTING} 1")

    def configure_model(self) -> None:
        """Sequence parallelism (``sequence_parallel_size > 1``): the ``(data, ring, ulysses)`` mesh and the
        backbone's :meth:`~lightning_vidalign.backbones.base.VideoBackbone.enable_sequence_parallel`, first (also under DDP);
        the torchmetrics of evaluation then reduce over the data-parallel ranks only (each clip counted once).

        FSDP2 (``ModelParallelStrategy``, tensor-parallel size 1): ``fully_shard`` every block the
        backbone names in :meth:`VideoBackbone.fsdp_modules`, then each denoiser itself
        (:meth:`VideoBackbone.denoisers`: the one denoiser, or both Wan 2.2 A14B experts), over the
        data-parallel mesh of the strategy (all ``W`` ranks, sequence-parallel ones included: parameters
        are sharded over the whole world). No-op under other strategies (DDP, single device)."""
        if self._trainer is None:
            return
        if self.sequence_parallel_size > 1 and self._sp_mesh is None:
            from lightning_vidalign.sequence_parallel import sequence_parallel_mesh

            self.check_sequence_parallel()
            self._sp_mesh = sequence_parallel_mesh(self.trainer.world_size, self.sequence_parallel_size, self.trainer.strategy.root_device.type)
            self.backbone.enable_sequence_parallel(self.sequence_parallel_size, self._sp_mesh)
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"sequence parallelism: {self.trainer.world_size} processes = data {self.data_parallel_size} x sequence "
                           f"{self.sequence_parallel_size} (Ulysses; each clip's tokens split over {self.sequence_parallel_size} ranks)")
            group = self.data_parallel_group()
            for metric in self.modules():
                if isinstance(metric, torchmetrics.Metric):
                    metric.process_group = group
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError("VideoAlignModule under ModelParallelStrategy supports data-parallel FSDP2 only (tensor_parallel_size=1)")
        dp = mesh["data_parallel"]
        kw = {}
        if self.fsdp_param_dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, self.fsdp_param_dtype), reduce_dtype=torch.float32)
        for module in self.backbone.fsdp_modules():
            fully_shard(module, mesh=dp, **kw)
        for denoiser in self.backbone.denoisers():
            fully_shard(denoiser, mesh=dp, **kw)
