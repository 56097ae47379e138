"""``VideoAlignModule``: the thin base LightningModule of every algorithm (DESIGN §2)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import math
import warnings

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from lightning_vidalign.backbones.base import VideoBackbone
from lightning_vidalign.checkpointing import base_weights_fingerprint, check_identity, load_adapter_weights, run_identity, use_atomic_checkpoint_io
from lightning_vidalign.metrics import motion_metrics, transnetv2_frechet_distance
from lightning_vidalign.utils import StageTimer, add_gif_summary

log = logging.getLogger(__name__)

# The frozen base (VAE, image encoder) stays in eval mode by design; Lightning's notice about
# modules in eval mode at fit start is expected here and would only be noise.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_ratio``·lr at ``total_steps``.

    ``f(k) = k/warmup`` for ``k < warmup``; else ``min_ratio + (1 - min_ratio)·0.5·(1 + cos(π·p))``,
    ``p = min(1, (k - warmup)/(total - warmup))``. SHIFT App. C: 20 warm-up steps.

    Args:
        optimizer: the optimizer.
        warmup_steps: optimizer steps of linear warm-up (>= 0).
        total_steps: step at which the cosine reaches ``min_ratio``.
        min_ratio: final lr as a fraction of the base lr, in ``[0, 1]``.
    """

    def __init__(self, optimizer, warmup_steps: int = 20, total_steps: int = 1000, min_ratio: float = 0.0, last_epoch: int = -1):
        if warmup_steps < 0 or total_steps <= 0 or not 0 <= min_ratio <= 1:
            raise ValueError(f"WarmupCosineLR: bad warmup_steps={warmup_steps}, total_steps={total_steps}, min_ratio={min_ratio}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class VideoAlignModule(L.LightningModule):
    """Base of every algorithm: owns the backbone, one optimizer, manual optimization.

    Subclasses write ``training_step`` top to bottom and call :meth:`optimize`. Only the trainable
    (adapter) parameters are checkpointed; the base weights come from the backbone's constructor.

    Args:
        backbone: the policy (a :class:`VideoBackbone`).
        optimizer: optimizer factory over the trainable parameters (default AdamW).
        lr_scheduler: optional scheduler factory (e.g. :class:`WarmupCosineLR`), stepped per
            optimizer step.
        grad_clip: max gradient norm (SHIFT App. C: 1.0); 0 disables.
        seed: base seed of the rank-aware generators ``(seed, rank, batch, tag)``.
        sampler: rollout sampler of the backbone (SVD: ``euler`` | ``euler_ancestral``).
        num_inference_steps: rollout denoising steps; None: the checkpoint's default
            (``backbone.settings["num_inference_steps"]``: the folder's own record or its diffusers pipeline's default,
            e.g. Wan 50, SVD 25; the tiny family 10; issue 32).
        guidance: CFG scale or ``(min, max)`` over frames (SVD pipeline); ``<= 1`` disables CFG; None: the checkpoint's
            default (``backbone.settings["guidance"]``: e.g. ``WanPipeline`` 5.0, HunyuanVideo 1.5 its guider's scale,
            SVD (1.0, 3.0); the tiny family 1.0).
        val_num_videos: videos sampled per validation run (per rank) for metrics and logs.
        on_nonfinite: ``"raise"`` (FloatingPointError naming the step) or ``"skip"`` (the step is
            skipped, logged and counted in ``train/skipped_steps``) for a non-finite loss.
        val_frechet: also report ``<val|test>/frechet_transnetv2``, the Fréchet distance between the
            real and the generated clips in TransNetV2 feature space (:func:`transnetv2_frechet_distance`;
            needs >= 2 clips of each per evaluation; real statistics computed once per process).
        fsdp_param_dtype: under FSDP2 only: compute the sharded denoiser in this dtype
            (``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)``) while the stored parameters —
            the LoRA master weights included — stay fp32.
        export_lora: at the end of ``fit``, write the trained LoRA in diffusers format to
            ``<trainer.default_root_dir>/lora/pytorch_lora_weights.safetensors`` (the backbone's
            ``export_lora``; ``vidalign export`` does the same for any checkpoint).
        heldout_conditions: held-out evaluation of the training objective (0 = off): the first
            ``heldout_conditions`` conditions of the validation set (never trained on), each sampled
            ``heldout_samples`` times with the module's sampler from noise fixed by ``(heldout_seed,
            condition index, draw)`` — the same videos' noise at every evaluation and for every training
            seed — and scored with the run's reward callbacks. Logged before the first update (step 0)
            and at every validation, see :meth:`heldout_evaluation`.
        heldout_samples: noise draws per held-out condition (their rewards are averaged per condition).
        heldout_seed: seed of the held-out noise (our choice: independent of ``seed`` so that runs of
            different training seeds are scored on the same videos' noise).
        heldout_drift: also sample the base model (adapters off) once from the same noise and log the
            mean absolute pixel difference to it (``heldout/drift_from_base``, ``[0, 1]``).
        heldout_loss_draws: noise draws ``(σ, ε)`` per held-out clip of ``heldout/denoising_loss`` (one forward each;
            our choice 8: the per-clip loss varies with σ far more than training changes it, so a paired
            decrease needs several draws).
        init_adapter_from: a checkpoint file of any ``VideoAlignModule`` run whose adapter (trainable) tensors
            initialise this run's backbone in :meth:`setup` — a *new* run (fresh optimizer, step 0), e.g. SHIFT
            from an SFT run (:func:`~lightning_vidalign.checkpointing.load_adapter_weights`: refused, with the
            differing fields, when the LoRA config or backbone differ). With ``--ckpt_path`` as well (a resumed
            run), the resumed checkpoint's adapters replace them.
        overlap_rewards: GRPO family, SHIFT and on-policy DPO score each chunk of ``rollout_batch_size``
            rollouts in a background thread while the next chunk is generated (:meth:`submit_rewards`),
            instead of all rollouts after the last one; results are kept in rollout order. It hides the
            reward's time where the reward waits on something else (a served reward: :class:`RemoteReward`,
            a VLM judge, a model on another GPU). Rewards are scored per chunk of ``rollout_batch_size``
            rollouts with or without overlap (a multi-threaded reduction over a chunk may differ in the last
            bit from one over the whole round), so overlap changes when they are computed, never their values,
            and a resumed run stays bitwise identical. Our choice (issue 22).
        sequence_parallel_size: Ulysses sequence parallelism (issue 24): the ``W`` processes of the run form groups of
            this many consecutive ranks, each group training one clip at a time with its tokens split over the
            group (all-to-all over attention heads around attention: diffusers' context parallelism,
            :mod:`lightning_vidalign.sequence_parallel`); data parallelism runs over the ``W / s`` groups (mesh
            ``data × sequence``). The ranks of a group get the same batch, noise, timesteps, rollouts and
            conditions (generators and samplers keyed by the data-parallel rank ``rank // s``), and the strategy's
            gradient average is corrected to the group's sum (:meth:`backward_pass`). Needs a backbone with a
            context-parallel plan (Wan; HunyuanVideo 1.5 with ours), ``s`` dividing the world size, the heads and each clip's token
            count, and DDP or FSDP2 (``configs/strategies/``). 1 = off. The per-rank batch size is per group.

    Resume safety (issue 20; :mod:`lightning_vidalign.checkpointing`): every checkpoint records
    :func:`~lightning_vidalign.checkpointing.run_identity` under ``checkpoint["vidalign"]["identity"]``, and a
    ``--ckpt_path`` of another method or configuration is refused (``CheckpointMismatchError`` listing each
    differing field). :meth:`setup` installs :class:`~lightning_vidalign.checkpointing.AtomicCheckpointIO` in
    place of Lightning's default ``TorchCheckpointIO`` (atomic writes; a corrupt file named on load).
    """

    def __init__(
        self,
        backbone: VideoBackbone,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float = 1.0,
        seed: int = 0,
        sampler: str = "euler",
        num_inference_steps: int | None = None,
        guidance: float | tuple[float, float] | None = None,
        val_num_videos: int = 2,
        on_nonfinite: str = "raise",
        fsdp_param_dtype: str | None = None,
        val_frechet: bool = True,
        export_lora: bool = True,
        heldout_conditions: int = 0,
        heldout_samples: int = 1,
        heldout_seed: int = 1234,
        heldout_drift: bool = True,
        heldout_loss_draws: int = 8,
        init_adapter_from: str | None = None,
        overlap_rewards: bool = False,
        sequence_parallel_size: int = 1,
    ):
        super().__init__()
        if int(sequence_parallel_size) < 1:
            raise ValueError(f"sequence_parallel_size must be >= 1, got {sequence_parallel_size}")
        self.sequence_parallel_size = int(sequence_parallel_size)
        self._sp_mesh = None  # the (data, ring, ulysses) device mesh once sequence parallelism is on
        if heldout_conditions < 0 or heldout_samples < 1:
            raise ValueError(f"heldout_conditions must be >= 0 and heldout_samples >= 1, got {heldout_conditions}, {heldout_samples}")
        if fsdp_param_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"fsdp_param_dtype must be None, 'bfloat16' or 'float16', got {fsdp_param_dtype!r}")
        self.fsdp_param_dtype = fsdp_param_dtype
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.automatic_optimization = False
        self.strict_loading = False  # adapter-only checkpoints
        self._save_cli_config()
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.grad_clip = grad_clip
        self.seed = seed
        self.sampler = sampler
        self.num_inference_steps = int(backbone.default_setting("num_inference_steps", 10) if num_inference_steps is None else num_inference_steps)
        self.guidance = backbone.default_setting("guidance", 1.0) if guidance is None else guidance
        self._settings_from_config = {"guidance": guidance is not None, "num_inference_steps": num_inference_steps is not None}
        self.val_num_videos = val_num_videos
        self.on_nonfinite = on_nonfinite
        self.export_lora = export_lora
        self.init_adapter_from = init_adapter_from
        self.overlap_rewards = bool(overlap_rewards)
        self._reward_pool = None  # the background scoring thread of overlap_rewards (made on first use)
        # base weights as built (before sharding or training): part of every checkpoint's identity
        self._base_fingerprint = base_weights_fingerprint(backbone)
        self.batches_seen = 0
        self.skipped_steps = 0
        self.timer = StageTimer()
        self.val_metrics = torch.nn.ModuleDict({f"{src}_{k}": m for src in ("gen", "real") for k, m in motion_metrics().items()})
        self.val_frechet = transnetv2_frechet_distance() if val_frechet else None
        self._frechet_real_done = False
        self._val_videos: list[tuple[Tensor, Tensor, list[str]]] = []
        self.heldout_conditions, self.heldout_samples = heldout_conditions, heldout_samples
        self.heldout_seed, self.heldout_drift = heldout_seed, heldout_drift
        if heldout_loss_draws < 1:
            raise ValueError(f"heldout_loss_draws must be >= 1, got {heldout_loss_draws}")
        self.heldout_loss_draws = heldout_loss_draws
        self.heldout_metrics = torch.nn.ModuleDict(motion_metrics()) if heldout_conditions else None
        self.heldout_frechet = transnetv2_frechet_distance() if heldout_conditions and val_frechet else None
        #: per-condition total reward before any update: ``{"indices" (M,), "rewards" (M,), "settings"}``; checkpointed
        self.heldout_baseline: dict | None = None
        self._heldout_rows: list[tuple[int, float, dict[str, float], float]] = []
        self._heldout_base_videos: dict[tuple[int, int], Tensor] = {}  # base model's samples (uint8, CPU)

    def _save_cli_config(self) -> None:
        """Built by ``vidalign`` (LightningCLI), record the model's config (class paths and init args, not objects) as
        the hyperparameters, so ``MyMethod.load_from_checkpoint(path)`` rebuilds the backbone, rewards and settings
        from the checkpoint alone (then loads its adapters). Built in Python, nothing is recorded (the arguments are
        objects): pass them, ``load_from_checkpoint(path, backbone=...)``. ``init_adapter_from`` is not carried
        over (the checkpoint holds the adapters)."""
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

        if _given_hyperparameters.get() is None:
            return
        self.save_hyperparameters()
        for hparams in (self._hparams, self._hparams_initial):
            if "init_adapter_from" in hparams:
                hparams["init_adapter_from"] = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's ``load_from_checkpoint`` for our adapter-only checkpoints
        (``SHIFT.load_from_checkpoint("runs/shift/checkpoints/last.ckpt")``; called on a base class, e.g.
        ``VideoAlignModule``, it builds the run's own class when that is imported, as every shipped one is); a checkpoint written by ``vidalign``
        holds the model's config, so the backbone (from its ``pretrained_path``), rewards and settings are rebuilt
        and the adapters loaded; keyword arguments override the config (``backbone=...``, required for a run built
        in Python). The base weights come from the backbone, not the checkpoint, so Lightning's warning listing
        them as "not in the checkpoint" is not shown; instead every adapter tensor must be in the checkpoint
        (:meth:`on_load_checkpoint`).

        Raises:
            KeyError: if the checkpoint lacks adapter tensors of the rebuilt backbone (another LoRA config), naming
                examples. CorruptCheckpointError: for a truncated file. TypeError: if the checkpoint's class is not
                ``cls`` or a subclass (``SHIFT.load_from_checkpoint`` of an SFT run), naming the class to load it with.
        """
        import sys

        from lightning_vidalign.checkpointing import naming_corrupt_checkpoint

        with naming_corrupt_checkpoint(checkpoint_path):
            stored = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
        class_path = (stored.get("hyper_parameters") or {}).get("_class_path")
        if class_path and "." in class_path:  # the run's own class, when already imported and a subclass of cls
            module_name, name = class_path.rsplit(".", 1)
            target = getattr(sys.modules.get(module_name), name, None)
            if isinstance(target, type) and target is not cls and issubclass(target, cls):
                return target.load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs)
            if isinstance(target, type) and not issubclass(target, cls):
                raise TypeError(
                    f"{checkpoint_path} was written by a {name} run ({class_path}), which is not a {cls.__name__}: load it "
                    f"with {name}.load_from_checkpoint or VideoAlignModule.load_from_checkpoint; to start a {cls.__name__} "
                    f"run from its adapters, set --model.init_args.init_adapter_from {checkpoint_path}"
                )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs)

    # ------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        params = self.backbone.trainable_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__}: the backbone has no trainable parameter (LoRA not injected?)")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        scheduler = self.scheduler_factory(opt)
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if isinstance(scheduler, WarmupCosineLR) and scheduler.min_ratio == 0 and max_steps and max_steps > 0:
            steps = max_steps * self.optimizer_steps_per_batch
            if steps > scheduler.total_steps:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"WarmupCosineLR reaches lr 0 at total_steps={scheduler.total_steps} optimizer steps, before the run's "
                               f"{steps} (trainer.max_steps={max_steps}): the last {steps - scheduler.total_steps} do not change "
                               f"the model; set --model.init_args.lr_scheduler.init_args.total_steps {steps}")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimize(self, loss: Tensor) -> dict[str, float]:
        """One optimizer step on ``loss``: backward, clip, step, scheduler step.

        Returns:
            ``{"grad_norm": float, "lr": float}`` (grad norm before clipping), or ``{}`` when a
            non-finite loss was skipped (``on_nonfinite="skip"``).

        Raises:
            FloatingPointError: on a non-finite loss with ``on_nonfinite="raise"``.
        """
        if not self.loss_is_finite(loss):
            return {}
        self.optimizers().zero_grad(set_to_none=True)
        self.backward_pass(loss, last=True)
        return self.step_optimizer()

    def loss_is_finite(self, loss: Tensor, what: str = "loss") -> bool:
        """True if ``loss`` is finite; otherwise raise (``on_nonfinite="raise"``) or log, count in
        ``train/skipped_steps`` and return False (``"skip"``): the caller then skips the step.

        Raises:
            FloatingPointError: naming the quantity and the batch, with ``on_nonfinite="raise"``.
        """
        if bool(torch.isfinite(loss).all()):
            return True
        msg = f"{type(self).__name__}: non-finite {what} {loss.detach().flatten()[:4].tolist()} at batch {self.batches_seen}"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg)
        self.skipped_steps += 1
        log.warning("%s; step skipped (%d so far)", msg, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps))
        return False

    def backward_pass(self, loss: Tensor, last: bool = True) -> None:
        """``manual_backward`` that accumulates into ``.grad``; with ``last=False`` the gradient
        synchronisation of the strategy is skipped (DDP ``no_sync`` through Lightning's
        ``block_backward_sync``), so a step made of several backward passes syncs once.
        Under FSDP2 (``ModelParallelStrategy``) ``set_requires_gradient_sync(last)`` does the same.
        With ``sequence_parallel_size = s > 1`` the loss is multiplied by ``s`` (the strategies average over all
        ranks, the shards of a clip must be summed).
        (DESIGN's ``backward(loss, last)``; named ``backward_pass`` because ``LightningModule.backward``
        is the hook that ``manual_backward`` itself calls.)"""
        ctx = contextlib.nullcontext()
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            # FSDP2: accumulate unsharded-reduced gradients locally, reduce-scatter on the last pass
            for denoiser in self.backbone.denoisers():  # Wan 2.2 A14B: both experts
                denoiser.set_requires_gradient_sync(last)
        elif isinstance(self.trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed: only the last backward of a step is an accumulation boundary (not run here: needs CUDA)
            self.trainer.strategy.model.set_gradient_accumulation_boundary(last)
        elif not last:
            block = getattr(self.trainer.strategy, "block_backward_sync", None)
            if block is not None:
                ctx = block()
        if self.sequence_parallel_size > 1:
            # each rank's backward gives its token shard's gradient; DDP / FSDP2 average over all W = D·s ranks,
            # so s·loss makes the reduced gradient mean_data(sum_sequence) (see lightning_vidalign.sequence_parallel)
            loss = loss * self.sequence_parallel_size
        with ctx:
            self.manual_backward(loss)

    def step_optimizer(self) -> dict[str, float]:
        """Clip the accumulated gradients, step the optimizer and the scheduler, zero the grads.

        Lightning's ``global_step`` counts *batches* (DESIGN §4): only the first optimizer step of a
        batch advances it, so ``trainer.max_steps``, ``ModelCheckpoint(every_n_train_steps)``, the
        logging step and the progress bar all count batches (GRPO: rounds), whatever the number of
        optimizer steps a batch takes. The LR scheduler steps with every optimizer step.

        Returns:
            ``{"grad_norm": float (before clipping), "lr": float}``.
        """
        opt = self.optimizers()
        grads = [p.grad.detach().float().norm() for p in self.backbone.trainable_parameters() if p.grad is not None]
        grad_norm = torch.stack(grads).norm().item() if grads else 0.0
        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        if self.grad_clip and self.grad_clip > 0 and not deepspeed:  # DeepSpeed clips from its config ("gradient_clipping")
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        if self._batch_step_counted:  # a later optimizer step of the same batch: not a new global step
            hooks = (opt._on_before_step, opt._on_after_step)
            opt._on_before_step = opt._on_after_step = lambda: None
            try:
                opt.step()
            finally:
                opt._on_before_step, opt._on_after_step = hooks
        else:
            opt.step()
            self._batch_step_counted = True
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return {"grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"]}

    # -------------------------------------------------------------- rewards
    def score_rewards(self, videos: Tensor, names: list[str] | None = None, batch: dict | None = None, log: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Score videos with the trainer's reward callbacks.

        Args:
            videos: ``(N, T, 3, H, W)`` in ``[0, 1]``.
            names: reward callbacks to use (None: all; see :func:`find_rewards`).
            batch: passed to each callback's ``score``.
            log: log ``reward/<name>/mean`` and ``reward/<name>/std`` per callback, and the mean of each
                named part the callback reports (``score_components()``) as ``reward/<name>/<part>``.

        Returns:
            ``(total (N,), components)``: the sum of ``weight·score`` over the callbacks (fp32, on the
            videos' device) and each callback's unweighted score by name.

        Raises:
            ValueError: from :func:`find_rewards` when no (or a missing named) reward callback.
        """
        return self.collect_rewards([self.submit_rewards(videos, names, batch, background=False)], log=log)

    def submit_rewards(self, videos: Tensor, names: list[str] | None = None, batch: dict | None = None, background: bool | None = None):
        """Start scoring one chunk of rollouts; :meth:`collect_rewards` takes the handles of a round's chunks
        in rollout order. ``background`` (default: ``overlap_rewards``): in the module's one scoring thread
        (under ``no_grad``, on the videos' CUDA device), so the caller goes on generating; else now."""
        from concurrent.futures import Future, ThreadPoolExecutor

        from lightning_vidalign.rewards.base import find_rewards

        callbacks = find_rewards(self.trainer, names)

        def work() -> list[tuple]:
            if videos.is_cuda:
                torch.cuda.set_device(videos.device)
            out = []
            for cb in callbacks:
                r = cb.score(videos, batch).to(videos.device).float()
                out.append((cb, r, dict(cb.score_components())))
            return out

        if background if background is not None else self.overlap_rewards:
            if self._reward_pool is None:
                self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidalign-reward")
            return self._reward_pool.submit(torch.no_grad()(work))
        done = Future()
        done.set_result(work())
        return done

    def collect_rewards(self, handles: list, log: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Wait for the chunks of :meth:`submit_rewards` and join them in order: ``(total, components)`` and the
        logs of :meth:`score_rewards` (a part's mean over all the chunks' values)."""
        chunks = [h.result() for h in handles]  # re-raises a reward's error here, in the training thread
        first = chunks[0][0][1]
        total = torch.zeros(sum(c[0][1].shape[0] for c in chunks), device=first.device)
        components = {}
        for i, (cb, _, _) in enumerate(chunks[0]):
            r = torch.cat([c[i][1] for c in chunks])
            components[cb.name] = r
            total += cb.weight * r
            if log:
                keys = [k for k in chunks[0][i][2] if k not in ("mean", "std")]
                parts = {f"reward/{cb.name}/{k}": torch.cat([c[i][2][k].detach().float().flatten().to(first.device) for c in chunks if k in c[i][2]]).mean() for k in keys}
                self.log_dict({f"reward/{cb.name}/mean": r.mean(), f"reward/{cb.name}/std": r.std(unbiased=False), **parts}, batch_size=r.shape[0])
        return total, components

    def teardown(self, stage: str) -> None:
        if self._reward_pool is not None:
            self._reward_pool.shutdown(wait=True)
            self._reward_pool = None
        super().teardown(stage)

    # ------------------------------------------------------------------ RNG
    def generator(self, tag: int = 0, batch: int | None = None) -> torch.Generator:
        """A CPU generator seeded from ``(seed, rank, batch, tag)`` (rank-aware, resumable), ``rank`` the
        data-parallel rank (:attr:`data_parallel_rank`: the global rank without sequence parallelism; with it, the
        same for every rank of a sequence-parallel group, so they draw the same noise).

        ``batch`` defaults to :attr:`batches_seen` (1-based index of the current training batch).
        """
        batch = self.batches_seen if batch is None else batch
        key = f"{self.seed}/{self.data_parallel_rank}/{batch}/{tag}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))

    # ------------------------------------------------- sequence parallelism
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

    def randn_like(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``N(0, I)`` with the shape of ``x``, drawn on CPU from ``generator`` (device-independent)."""
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)

    def sample_noise(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Training ``(sigma (B,), noise like x0)`` from the backbone's noise distribution."""
        sigma = self.backbone.sample_sigma(x0.shape[0], generator).to(x0.device)
        return sigma, self.randn_like(x0, generator)

    @staticmethod
    def clip_size(batch: dict) -> tuple[int, int, int, int]:
        """``(B, T, H, W)`` of the batch's real clips: from ``batch["video"]``, or — training from the latent cache
        without pixels — from ``batch["first_frame"]`` and ``batch["num_frames"]``."""
        if "video" in batch:
            b, t, _, h, w = batch["video"].shape
            return b, t, h, w
        first = batch["first_frame"]
        return first.shape[0], int(torch.as_tensor(batch["num_frames"]).view(-1)[0]), first.shape[-2], first.shape[-1]

    @staticmethod
    def real_video(batch: dict, purpose: str) -> Tensor:
        """``batch["video"]``, the real pixel clips ``(B, T, 3, H, W)``.

        Raises:
            KeyError: when the batch comes from the latent cache without pixels, naming ``purpose`` and the option
                that adds them (``data.init_args.cache_video``).
        """
        if "video" not in batch:
            raise KeyError(f"{purpose} needs the real clips' pixels, and this batch comes from the latent cache without them: "
                           "set --data.init_args.cache_video true (latents still from the cache, pixels decoded from the videos)")
        return batch["video"]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # counted before the step so that checkpoints written by callbacks at batch end (which run
        # before the module's own batch-end hook) hold the number of completed batches
        self.batches_seen += 1
        self._batch_step_counted = False

    def report_settings(self) -> None:
        """Print (rank 0) the settings this run uses that a real checkpoint decides (issue 32): the backbone's recorded
        :attr:`~lightning_vidalign.backbones.base.VideoBackbone.settings` with their sources, and the resolved ``guidance``
        and ``num_inference_steps`` (the config's, or the checkpoint's when the config leaves them null)."""
        from lightning.pytorch.utilities import rank_zero_info

        settings = dict(getattr(self.backbone, "settings", {}) or {})
        if not settings:
            return
        for key, value in (("guidance", self.guidance), ("num_inference_steps", self.num_inference_steps)):
            if getattr(self, "_settings_from_config", {}).get(key):
                settings[key] = {"value": value, "source": "config"}
        lines = [f"  {k}: {v['value']} ({v['source']})" for k, v in settings.items()]
        rank_zero_info(f"{type(self.backbone).__name__} settings ({getattr(self.backbone, 'pretrained_path', '?')}):\n" + "\n".join(lines))

    def setup(self, stage: str) -> None:
        """Refuse strategy combinations that cannot work, with the fix in the message; make checkpoint writes
        atomic (:func:`~lightning_vidalign.checkpointing.use_atomic_checkpoint_io`); load ``init_adapter_from``
        (before FSDP2 shards the backbone in :meth:`configure_model`)."""
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                f"{type(self).__name__} uses manual optimization, which Lightning's FSDPStrategy (FSDP1) does not support: "
                "use FSDP2 instead (configs/strategies/fsdp2.yaml: ModelParallelStrategy, tensor_parallel_size 1)"
            )
        if isinstance(self.trainer.strategy, DeepSpeedStrategy) and self.optimizer_steps_per_batch > 1:
            raise ValueError(
                f"{type(self).__name__} takes {self.optimizer_steps_per_batch} optimizer steps per batch, which DeepSpeed's single "
                "engine step per batch cannot express: set minibatches_per_round: 1 or use DDP/FSDP2"
            )
        if self.sequence_parallel_size > 1:
            self.check_sequence_parallel()
        self.report_settings()
        cache_dir = getattr(getattr(self.trainer, "datamodule", None), "cache_dir", None)
        if cache_dir and stage == "fit" and not self.trains_from_latent_cache:
            raise ValueError(f"{type(self).__name__} does not train from the latent cache (data.cache_dir={cache_dir!r}): its training "
                             "step conditions rollouts on the real clips; SFT, SHIFT and DPO do. Unset --data.init_args.cache_dir")
        if not isinstance(self.trainer.strategy, DeepSpeedStrategy):  # DeepSpeed writes its checkpoint folders itself
            use_atomic_checkpoint_io(self.trainer.strategy)
        if self.init_adapter_from and not self._adapters_initialised:
            load_adapter_weights(self, self.init_adapter_from)
            self._adapters_initialised = True
        self._ddp_params_and_buffers_to_ignore = self.offloaded_state_names()

    #: whether this algorithm's training step reads the latent cache's batches (``data.cache_dir``): it gets its real
    #: clips' latents and conditions through ``backbone.encode_batch`` / ``condition_batch``; refused otherwise
    trains_from_latent_cache: bool = False

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

    #: optimizer steps a training batch may take (GRPO with several minibatches per round: > 1)
    optimizer_steps_per_batch: int = 1

    _batch_step_counted: bool = False
    _adapters_initialised: bool = False  # init_adapter_from loaded (once per module, whatever the number of fits)

    def on_fit_end(self) -> None:
        """Write the trained LoRA under the run folder (``export_lora``; every rank gathers, rank 0 writes)."""
        if not self.export_lora or getattr(self.backbone, "lora_config", None) is None or self.trainer.global_step == 0:
            return  # (no optimizer step: nothing trained, nothing written)
        path = self.backbone.export_lora(os.path.join(self.trainer.default_root_dir, "lora"), write=self.trainer.is_global_zero)
        if self.trainer.is_global_zero:
            from lightning.pytorch.utilities import rank_zero_info

            others = sorted(f for f in os.listdir(os.path.dirname(path)) if f.endswith(".safetensors") and f != os.path.basename(path))
            rank_zero_info(f"LoRA (diffusers format) written to {path}" + (f" (and {', '.join(others)} beside it)" if others else ""))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # progress is counted in batches (DESIGN §4; step_optimizer makes global_step count batches):
        # ``trainer.max_steps`` also stops a module that takes no optimizer step (reward pretraining)
        # or a batch whose steps were all skipped as non-finite
        max_batches = self.trainer.max_steps
        if max_batches is not None and max_batches > 0 and self.batches_seen >= max_batches:
            self.trainer.should_stop = True
            # The loops' state as a checkpoint written now holds it. Lightning then ends the epoch (counted as
            # completed) and ModelCheckpoint writes last.ckpt at epoch or train end: resumed with a larger
            # max_steps, that checkpoint would skip the rest of the epoch. on_save_checkpoint writes this state
            # instead, so extending a finished run continues where it stopped (our choice; test_run_folder.py).
            self._stop_loop_state = (self.trainer.global_step, copy.deepcopy(self.trainer.fit_loop.state_dict()))

    # ----------------------------------------------------------- validation
    def rollout_videos(self, batch: dict, generator: torch.Generator, num: int | None = None) -> Tensor:
        """Sample one video per condition of ``batch`` (the first ``num``) with the module's sampler
        settings, at the size of ``batch["video"]``; returns ``(B, T, 3, H, W)`` in ``[0, 1]``."""
        video = batch["video"]
        sub = {k: v[:num] for k, v in batch.items()} if num else batch
        cond = self.backbone.encode_condition(sub, generator)
        traj = self.backbone.rollout(
            cond,
            self.sampler,
            self.num_inference_steps,
            self.guidance,
            generator,
            num_frames=video.shape[1],
            height=video.shape[-2],
            width=video.shape[-1],
        )
        return traj.video

    # ------------------------------------------------- held-out evaluation
    def heldout_generator(self, index: int, draw: int, kind: str = "sample") -> torch.Generator:
        """CPU generator of held-out condition ``index``, noise draw ``draw`` (independent of rank,
        training seed and batch composition); ``kind``: ``"sample"`` (the sampler's noise) or ``"loss"`` (the
        noise level and noise of the held-out denoising loss)."""
        key = (f"heldout/{self.heldout_seed}/{index}/{draw}" if kind == "sample" else f"heldout-{kind}/{self.heldout_seed}/{index}/{draw}").encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))

    def _reward_names(self) -> list[str] | None:
        return getattr(self, "reward_names", None)

    def _has_rewards(self) -> bool:
        from lightning_vidalign.rewards.base import RewardCallback

        return self._trainer is not None and any(isinstance(cb, RewardCallback) for cb in self.trainer.callbacks)

    @torch.no_grad()
    def heldout_update(self, batch: dict) -> None:
        """Sample and score the held-out conditions of one validation batch (up to ``heldout_conditions``
        on this rank); rows are kept until :meth:`heldout_evaluation`."""
        if not self.heldout_conditions or (self._trainer is not None and self.trainer.sanity_checking):
            return
        have = len({row[0] for row in self._heldout_rows})
        if have >= self.heldout_per_rank():
            return
        indices = torch.as_tensor(batch["index"]).view(-1).tolist()
        real = batch["video"].float()
        for i, index in enumerate(indices[: self.heldout_per_rank() - have]):
            sub = {k: v[i : i + 1] for k, v in batch.items()}
            totals, parts, drift, losses = [], {}, [], []
            for draw in range(self.heldout_loss_draws if getattr(self.backbone, "single_level_loss", True) else 0):  # MeanFlow I2V: none (NaN)
                losses.append(self.heldout_denoising_loss(sub, self.heldout_generator(index, draw, kind="loss")))
            for draw in range(self.heldout_samples):
                video = self.rollout_videos(sub, self.heldout_generator(index, draw))
                if self._has_rewards():
                    total, components = self.score_rewards(video, self._reward_names(), batch=sub, log=False)
                    totals.append(float(total[0]))
                    for name, r in components.items():
                        parts.setdefault(name, []).append(float(r[0]))
                if self.heldout_drift:
                    key = (index, draw)
                    if key not in self._heldout_base_videos:
                        with self.backbone.adapters_disabled():
                            base = self.rollout_videos(sub, self.heldout_generator(index, draw))
                        self._heldout_base_videos[key] = (base.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
                    ours = (video.float().clamp(0, 1) * 255).round().cpu()  # both in uint8 steps: 0 at step 0
                    drift.append(float((ours - self._heldout_base_videos[key].float()).abs().mean() / 255))
                for metric in self.heldout_metrics.values():
                    metric.update(video.float())
                if self.heldout_frechet is not None:
                    self.heldout_frechet.update(video.float(), real=False)
            if self.heldout_frechet is not None and not self._frechet_heldout_real_done:
                self.heldout_frechet.update(real[i : i + 1], real=True)
            mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
            self._heldout_rows.append((int(index), mean(totals), {k: mean(v) for k, v in parts.items()}, mean(drift), mean(losses),
                                       self.heldout_extra(sub, int(index))))

    _frechet_heldout_real_done: bool = False

    def heldout_extra_keys(self) -> list[str]:
        """Names of an algorithm's own held-out measurements (logged as ``heldout/<name>``, the mean over held-out
        conditions); none here. A subclass that returns names implements :meth:`heldout_extra`."""
        return []

    def heldout_extra(self, clip: dict, index: int) -> dict[str, float]:
        """An algorithm's own held-out measurements of one held-out condition ``clip`` (batch of 1, dataset index
        ``index``): ``{name: value}`` for each of :meth:`heldout_extra_keys` (e.g. DPO's implicit accuracy)."""
        return {}

    def heldout_denoising_loss(self, clip: dict, generator: torch.Generator) -> float:
        """The training denoising loss of one held-out real clip (batch of 1) at the noise level and noise drawn
        from ``generator`` (fixed per condition and draw, so evaluations are paired): the objective SFT
        optimizes, measured where it never trained (``heldout/denoising_loss``, lower is better; our choice)."""
        x0 = self.backbone.encode(clip["video"])
        cond = self.backbone.encode_condition(clip, generator)
        sigma, noise = self.sample_noise(x0, generator)
        return float(self.backbone.training_loss(x0, cond, sigma, noise).mean())

    def heldout_per_rank(self) -> int:
        """Held-out conditions each rank evaluates: ``ceil(heldout_conditions / D)`` of its
        shard of the validation set (data-parallel rank ``r`` of ``D`` holds conditions ``r, r + D, ...``; the ranks
        of a sequence-parallel group evaluate the same ones together), so that about ``heldout_conditions`` are
        evaluated in all, the same ones at every evaluation."""
        return math.ceil(self.heldout_conditions / self.data_parallel_size)

    def heldout_settings(self) -> dict:
        """What fixes the held-out videos' noise and sampling (stored with the step-0 baseline; a resumed
        run with other settings drops the baseline, with a warning, instead of pairing other videos)."""
        return {"seed": self.heldout_seed, "samples": self.heldout_samples, "sampler": self.sampler,
                "num_inference_steps": self.num_inference_steps, "guidance": str(self.guidance), "loss_draws": self.heldout_loss_draws}

    def heldout_evaluation(self) -> dict[str, float]:
        """Gather this evaluation's held-out rows from every rank and return the metrics (then reset).

        Keys: ``heldout/batches_seen`` (training batches done: the x axis of learning curves),
        ``heldout/reward`` (mean over conditions of the total training reward, the weighted sum
        of the reward callbacks), ``heldout/reward_se`` (its standard error over conditions),
        ``heldout/reward/<name>`` (each callback, unweighted), ``heldout/reward_step0`` and
        ``heldout/improvement`` / ``heldout/improvement_se`` / ``heldout/improvement_z``: the paired
        difference to the step-0 reward of the same conditions and noise (mean, standard error over
        conditions, mean/SE; the learning criterion of the recipes is ``z >= 3``), ``heldout/<metric>``
        (motion score, dynamic degree, flickering, smoothness of the held-out samples),
        ``heldout/frechet_transnetv2`` (samples vs the held-out real clips),
        ``heldout/drift_from_base`` and ``heldout/denoising_loss`` (± ``_se``: the training denoising loss of the
        held-out real clips at fixed noise levels and noise, see :meth:`heldout_denoising_loss`) with
        ``heldout/denoising_loss_step0`` / ``_decrease`` / ``_decrease_se`` / ``_decrease_z`` (paired, step 0 minus
        now: positive when the loss went down; the SFT recipe's criterion). Reward keys only with reward callbacks; the improvement keys
        once a step-0 evaluation exists (:attr:`heldout_baseline`, set by the first evaluation of a
        fit before any update, saved with the checkpoints). Conditions are deduplicated by dataset
        index (a distributed sampler pads the last batch). Collective under DDP/FSDP2.
        """
        from lightning_vidalign.metrics import mean_and_standard_error

        rows = self._heldout_rows
        self._heldout_rows = []
        if self._has_rewards():  # the same columns on every rank (a rank may have no row)
            from lightning_vidalign.rewards.base import find_rewards

            names = sorted(cb.name for cb in find_rewards(self.trainer, self._reward_names()))
        else:
            names = []
        extra = self.heldout_extra_keys()
        local = torch.tensor([[row[0], row[1], row[3], row[4], *[row[5].get(k, float("nan")) for k in extra], *[row[2].get(n, float("nan")) for n in names]]
                              for row in rows], dtype=torch.float64).view(-1, 4 + len(extra) + len(names))
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            n = torch.tensor([local.shape[0]], device=self.device)
            most = int(self.all_gather(n).max())
            padded = torch.full((most, local.shape[1]), float("nan"), dtype=torch.float64)
            padded[: local.shape[0]] = local
            local = self.all_gather(padded.to(self.device)).reshape(-1, local.shape[1]).cpu()
            local = local[~torch.isnan(local[:, 0])]
        seen, keep = set(), []
        for r in range(local.shape[0]):
            if int(local[r, 0]) not in seen:
                seen.add(int(local[r, 0]))
                keep.append(r)
        table = local[keep]
        table = table[table[:, 0].argsort()]
        # training batches (rounds) completed: Lightning logs a validation after batch n at step n - 1
        out: dict[str, float] = {"heldout/batches_seen": float(0 if self._heldout_is_step0 else self.batches_seen)}
        for key, metric in self.heldout_metrics.items():
            if metric.update_called:
                out[f"heldout/{key}"] = float(metric.compute())
            metric.reset()
        if self.heldout_frechet is not None:
            self._frechet_heldout_real_done = True
            value = self.finish_frechet(self.heldout_frechet)
            if value is not None:
                out["heldout/frechet_transnetv2"] = float(value)
        if table.shape[0] == 0:
            return out
        if self.heldout_drift:
            out["heldout/drift_from_base"] = float(table[:, 2].mean())
        for j, key in enumerate(extra):
            out[f"heldout/{key}"] = float(table[:, 4 + j].nanmean())
        indices, losses = table[:, 0].long(), table[:, 3].float()
        out["heldout/denoising_loss"], out["heldout/denoising_loss_se"] = mean_and_standard_error(table[:, 3])
        if self._heldout_is_step0:
            self.heldout_baseline = {"indices": indices, "rewards": table[:, 1].float(), "denoising_loss": losses,
                                     "settings": self.heldout_settings()}
        if self.heldout_baseline is not None and "denoising_loss" in self.heldout_baseline:
            lookup = {int(i): float(v) for i, v in zip(self.heldout_baseline["indices"], self.heldout_baseline["denoising_loss"])}
            common = [k for k, i in enumerate(indices.tolist()) if i in lookup]
            if common:  # paired as the reward: step 0 minus now (positive = the loss went down)
                before = torch.tensor([lookup[int(indices[k])] for k in common], dtype=torch.float64)
                diff = before - losses[common].double()
                out["heldout/denoising_loss_step0"] = float(before.mean())
                out["heldout/denoising_loss_decrease"], se = mean_and_standard_error(diff)
                out["heldout/denoising_loss_decrease_se"] = se
                out["heldout/denoising_loss_decrease_z"] = out["heldout/denoising_loss_decrease"] / se if se > 0 else float("nan")
        if not torch.isnan(table[:, 1]).all():
            out["heldout/reward"], out["heldout/reward_se"] = mean_and_standard_error(table[:, 1])
            for j, name in enumerate(names):
                out[f"heldout/reward/{name}"] = float(table[:, 4 + len(extra) + j].mean())
            rewards = table[:, 1].float()
            if self.heldout_baseline is not None:
                base_idx, base_r = self.heldout_baseline["indices"], self.heldout_baseline["rewards"]
                lookup = {int(i): float(r) for i, r in zip(base_idx, base_r)}
                common = [k for k, i in enumerate(indices.tolist()) if i in lookup]
                if common:
                    before = torch.tensor([lookup[int(indices[k])] for k in common], dtype=torch.float64)
                    diff = rewards[common].double() - before
                    out["heldout/reward_step0"] = float(before.mean())
                    out["heldout/improvement"], out["heldout/improvement_se"] = mean_and_standard_error(diff)
                    se = out["heldout/improvement_se"]
                    out["heldout/improvement_z"] = out["heldout/improvement"] / se if se > 0 else float("nan")
        return out

    _heldout_is_step0: bool = False

    def on_train_start(self) -> None:
        """Held-out evaluation before the first update (step 0) of a fit that starts from scratch:
        the reference point of ``heldout/improvement``; logged at step 0 to every logger."""
        self._stop_loop_state = None  # (a former fit's, see on_train_batch_end)
        if not self.heldout_conditions or self.global_step != 0 or self.heldout_baseline is not None:
            return
        # the loader Lightning prepared (with its distributed sampler: each rank its shard, as in validation)
        loader = self.trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None and self.trainer.datamodule is not None:
            loader = self.trainer.datamodule.val_dataloader()
        if loader is None:
            raise ValueError("heldout_conditions > 0 needs a datamodule with a val_dataloader (the held-out conditions)")
        modes = {m: m.training for m in self.modules()}  # restored after: the frozen base stays in eval mode
        self.eval()
        for batch in loader:
            self.heldout_update(self.trainer.strategy.batch_to_device(batch))
            if len(self._heldout_rows) >= self.heldout_per_rank():
                break
        self._heldout_is_step0 = True
        try:
            metrics = self.heldout_evaluation()
        finally:
            self._heldout_is_step0 = False
        for m, mode in modes.items():
            m.train(mode)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
        self.print_heldout(metrics)

    def print_heldout(self, metrics: dict[str, float]) -> None:
        """One console line (rank 0) per held-out evaluation: reward ± SE, the paired improvement and its z,
        the drift from the base."""
        from lightning.pytorch.utilities import rank_zero_info

        if not {"heldout/reward", "heldout/drift_from_base", "heldout/denoising_loss"} & set(metrics):
            return
        parts = [f"held-out after {int(metrics.get('heldout/batches_seen', 0))} batches:"]
        if "heldout/reward" in metrics:
            parts.append(f"reward {metrics['heldout/reward']:.4f} ± {metrics['heldout/reward_se']:.4f}")
        if "heldout/improvement" in metrics and metrics.get("heldout/batches_seen", 0) > 0:
            parts.append(f"improvement {metrics['heldout/improvement']:+.4f} (z {metrics['heldout/improvement_z']:.1f})")
        if "heldout/drift_from_base" in metrics:
            parts.append(f"drift from base {metrics['heldout/drift_from_base']:.4f}")
        for key in self.heldout_extra_keys():
            if f"heldout/{key}" in metrics:
                parts.append(f"{key} {metrics[f'heldout/{key}']:.3f}")
        if "heldout/denoising_loss" in metrics:
            loss = f"denoising loss {metrics['heldout/denoising_loss']:.4f}"
            if "heldout/denoising_loss_decrease" in metrics and metrics.get("heldout/batches_seen", 0) > 0:
                loss += f" (decrease {metrics['heldout/denoising_loss_decrease']:+.5f}, z {metrics['heldout/denoising_loss_decrease_z']:.1f})"
            parts.append(loss)
        rank_zero_info(parts[0] + " " + ", ".join(parts[1:]))

    def evaluation_step(self, batch: dict, batch_idx: int, prefix: str) -> None:
        """Validation/test: denoising loss with fixed noise (not for a backbone whose ``single_level_loss`` is False: a
        MeanFlow I2V checkpoint), motion metrics of real clips and of ``val_num_videos`` generated videos (same seeds at
        every evaluation), videos kept for logging."""
        gen = self.generator(tag=1000 + batch_idx, batch=0)  # same noise at every evaluation
        x0 = self.backbone.encode(batch["video"])
        cond = self.backbone.encode_condition(batch, gen)
        sigma, noise = self.sample_noise(x0, gen)
        if getattr(self.backbone, "single_level_loss", True):  # a MeanFlow I2V checkpoint has no loss at one level: no val/loss
            loss = self.backbone.training_loss(x0, cond, sigma, noise).mean()
            self.log(f"{prefix}/loss", loss, batch_size=x0.shape[0], sync_dist=True)
        real = batch["video"].float()
        for name, metric in self.val_metrics.items():
            if name.startswith("real_"):
                metric.update(real)
        if self.val_frechet is not None and not self._frechet_real_done:
            self.val_frechet.update(real, real=True)
        have = sum(v.shape[0] for _, v, _ in self._val_videos)
        if have < self.val_num_videos:
            n = min(self.val_num_videos - have, real.shape[0])
            fake = self.rollout_videos(batch, gen, n)
            for name, metric in self.val_metrics.items():
                if name.startswith("gen_"):
                    metric.update(fake)
            if self.val_frechet is not None:
                self.val_frechet.update(fake.float(), real=False)
            self._val_videos.append((real[:n].cpu(), fake.cpu(), self.sample_labels(batch, n)))
        self.heldout_update(batch)

    def evaluation_epoch_end(self, prefix: str) -> None:
        """Log ``<prefix>/{gen,real}/<metric>`` and the sampled videos; reset the metrics."""
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                src, key = name.split("_", 1)
                self.log(f"{prefix}/{src}/{key}", metric.compute(), sync_dist=False)
            metric.reset()
        if self.val_frechet is not None:
            self._frechet_real_done = True  # the real clips' statistics are kept (reset_real_features=False)
            value = self.finish_frechet(self.val_frechet)
            if value is not None:
                self.log(f"{prefix}/frechet_transnetv2", value, sync_dist=False)
        if self.heldout_conditions and not self.trainer.sanity_checking:
            metrics = self.heldout_evaluation()
            for key, value in metrics.items():
                self.log(key, value, sync_dist=False)  # gathered over ranks already
            self.print_heldout(metrics)
        if self._val_videos and self.global_rank == 0:
            self.log_videos(f"{prefix}/samples", self._val_videos)
        self._val_videos = []

    @staticmethod
    def finish_frechet(fd) -> Tensor | None:
        """The Fréchet distance of an evaluation (fp32 0-dim), or None with fewer than 2 clips of either side;
        the generated clips' statistics are reset (the real ones are kept, ``reset_real_features=False``)."""
        value = fd.compute().float() if int(fd.real_features_num_samples) >= 2 and int(fd.fake_features_num_samples) >= 2 else None
        fd.reset()
        return value

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self.evaluation_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self.evaluation_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One generated video per condition: ``{"video": (B, T, 3, H, W) in [0, 1], "path", "start"}``."""
        gen = self.generator(tag=3000 + batch_idx, batch=0)
        return {"video": self.rollout_videos(batch, gen), "path": batch.get("path"), "start": batch.get("start")}

    @staticmethod
    def sample_labels(batch: dict, n: int) -> list[str]:
        """Labels of the first ``n`` clips of ``batch``: ``"<file name> from <start> s"`` and, when the batch has
        captions, ``': "<caption>"'`` (what a logged sample was conditioned on)."""
        paths, starts, captions = batch.get("path"), batch.get("start"), batch.get("caption")
        labels = []
        for i in range(n):
            label = os.path.basename(str(paths[i])) if paths is not None else f"clip {i}"
            if starts is not None:
                label += f" from {float(starts[i]):.2f} s"
            if captions is not None and captions[i]:
                label += f': "{captions[i]}"'
            labels.append(label)
        return labels

    def log_videos(self, tag: str, samples: list[tuple[Tensor, Tensor, list[str]]]) -> None:
        """Log ``[real | generated]`` side by side as GIFs to every TensorBoard logger: tag ``<tag>/<k>_<clip name>``,
        with a description (TensorBoard's card info) saying left = the real clip, right = the model's sample from its
        condition, the clip, start and caption, and the fixed seed."""
        import re

        from lightning.pytorch.loggers import TensorBoardLogger

        fps = float(getattr(self.backbone, "fps", 7))
        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            k = 0
            for real, fake, labels in samples:
                for r, f, label in zip(real, fake, labels):
                    name = re.sub(r"[^-\w.]", "_", label.split(":")[0])[:48]
                    description = (f"left: the real clip ({label}); right: the model's sample at step {self.global_step} from the "
                                   f"same condition (first frame / caption), same noise at every evaluation (seed {self.seed})")
                    add_gif_summary(logger.experiment, f"{tag}/{k}_{name}", torch.cat([r, f], dim=-1), self.global_step, fps,
                                    description=description)
                    k += 1

    # ----------------------------------------------------------- checkpoint
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"backbone.{k}" for k in self.backbone.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable or not k.startswith("backbone.")}
        checkpoint["vidalign"] = {"batches_seen": self.batches_seen, "skipped_steps": self.skipped_steps,
                                  "heldout_baseline": self.heldout_baseline,
                                  "identity": run_identity(self, self._trainer)}
        stop = getattr(self, "_stop_loop_state", None)
        if stop is not None and self._trainer is not None and stop[0] == self.trainer.global_step and "loops" in checkpoint:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(stop[1])  # (see on_train_batch_end)
            checkpoint["epoch"] = stop[1]["epoch_progress"]["current"]["completed"]

    def check_checkpoint_identity(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another run (:func:`~lightning_vidalign.checkpointing.check_identity`): when
        fitting, every identity field; in ``validate``/``test``/``predict`` (adapters only) and without a trainer,
        the adapter fields.
        Called by :meth:`on_load_checkpoint` (``FSDP2Strategy.load_checkpoint`` calls it before loading any weight).

        Raises:
            CheckpointMismatchError: listing each differing field ``name: checkpoint → this run``.
        """
        from lightning.pytorch.trainer.states import TrainerFn

        # a module outside a run (no trainer: the hook called directly) cannot resume one: adapter fields only
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        path = str(self.trainer.ckpt_path) if self._trainer is not None and self.trainer.ckpt_path else None
        check_identity(checkpoint, run_identity(self, self._trainer), path, adapters_only=not fitting)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if not checkpoint.pop("_vidalign_identity_checked", False):  # (set by FSDP2Strategy, which checked already)
            self.check_checkpoint_identity(checkpoint)
        trainable = {f"backbone.{k}" for k in self.backbone.trainable_state_dict()}
        # FSDP2 (ModelParallelStrategy) loads the weights itself and hands the hooks the rest
        missing = trainable - set(checkpoint["state_dict"]) if "state_dict" in checkpoint else set()
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} adapter tensor(s), e.g. {sorted(missing)[:3]} (different LoRA config?)")
        state = checkpoint.get("vidalign", {})
        self.batches_seen = int(state.get("batches_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        baseline = state.get("heldout_baseline")
        if isinstance(baseline, dict) and baseline.get("settings") != self.heldout_settings():
            log.warning("held-out settings differ from the checkpoint's (%s -> %s): its step-0 held-out baseline is dropped "
                        "(no heldout/improvement in this run)", baseline.get("settings"), self.heldout_settings())
            baseline = None
        self.heldout_baseline = baseline if isinstance(baseline, dict) else None
