"""``VideoAlignModule``: the thin base LightningModule of every algorithm (DESIGN §2)."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor

from lightning_vidalign.backbones.base import VideoBackbone
from lightning_vidalign.checkpointing import base_weights_fingerprint, check_identity, load_adapter_weights, run_identity, use_atomic_checkpoint_io
from lightning_vidalign.distributed import DistributedMixin
from lightning_vidalign.evaluation import EvaluationMixin
from lightning_vidalign.generation import GenerationMixin
from lightning_vidalign.heldout import HeldoutMixin
from lightning_vidalign.optim import WarmupCosineLR
from lightning_vidalign.utils import StageTimer

__all__ = ["VideoAlignModule", "WarmupCosineLR"]

log = logging.getLogger(__name__)

# The frozen base (VAE, image encoder) stays in eval mode by design; Lightning's notice about
# modules in eval mode at fit start is expected here and would only be noise.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


class VideoAlignModule(DistributedMixin, GenerationMixin, HeldoutMixin, EvaluationMixin, L.LightningModule):
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
        self.on_nonfinite = on_nonfinite
        self.export_lora = export_lora
        self.init_adapter_from = init_adapter_from
        self.overlap_rewards = bool(overlap_rewards)
        # base weights as built (before sharding or training): part of every checkpoint's identity
        self._base_fingerprint = base_weights_fingerprint(backbone)
        self.batches_seen = 0
        self.skipped_steps = 0
        self.timer = StageTimer()
        self.init_evaluation(val_num_videos, val_frechet)
        self.init_heldout(heldout_conditions, heldout_samples, heldout_seed, heldout_drift, heldout_loss_draws, val_frechet)

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

    def on_train_start(self) -> None:
        """Forget a former fit's stop state (see :meth:`on_train_batch_end`), then the held-out evaluation at step 0
        (:meth:`~lightning_vidalign.heldout.HeldoutMixin.on_train_start`)."""
        self._stop_loop_state = None
        super().on_train_start()

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

    #: optimizer steps a training batch may take (GRPO with several minibatches per round: > 1)
    optimizer_steps_per_batch: int = 1

    _batch_step_counted: bool = False
    _adapters_initialised: bool = False  # init_adapter_from loaded (once per module, whatever the number of fits)

    def on_fit_end(self) -> None:
        """Write the trained LoRA under the run folder (``export_lora``; every rank gathers, rank 0 writes); not when a
        signal stopped the run (:class:`~lightning_vidalign.preemption.InterruptCheckpoint`, ``PreemptionCheckpoint``)."""
        if not self.export_lora or getattr(self.backbone, "lora_config", None) is None or self.trainer.global_step == 0:
            return  # (no optimizer step: nothing trained, nothing written)
        if any(getattr(cb, "preempted", False) for cb in self.trainer.callbacks):  # stopped by a signal: not the run's result
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info("LoRA not exported: the run was stopped before its end (resume it; `vidalign export --ckpt_path last` "
                           "writes the saved state's LoRA)")
            return
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

    # ----------------------------------------------------------- checkpoint

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
