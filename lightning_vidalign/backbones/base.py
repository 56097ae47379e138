"""The ``VideoBackbone`` contract: the policy that every algorithm owns (DESIGN §2)."""
from __future__ import annotations

import abc
import contextlib
import glob
import os
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lightning_vidalign.sampling import Trajectory
from lightning_vidalign.utils import require_files  # noqa: F401 (re-exported: the backbones' loaders use it)

#: the dtype names the backbone options accept (``dtype``, ``vae_dtype``, ``encoder_dtype``)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VideoBackbone(nn.Module, abc.ABC):
    """A diffusers denoiser + VAE + condition encoders with LoRA adapters.

    Video tensors at the pixel level are ``(B, T, C, H, W)`` float in ``[0, 1]``; latents are
    ``(B, T, C_lat, h, w)``. Only the adapter parameters are trainable; the frozen base with the
    adapters disabled is the reference policy.
    """

    #: keys of the condition dict produced by :meth:`encode_condition`
    condition_keys: tuple[str, ...] = ()

    #: whether :meth:`training_loss` exists at a single noise level (False for a MeanFlow checkpoint whose velocity needs
    #: the next step's level: validation and held-out evaluation then skip the denoising loss)
    single_level_loss: bool = True

    @abc.abstractmethod
    def encode(self, video: Tensor) -> Tensor:
        """Pixel video ``(B, T, 3, H, W)`` in ``[0, 1]`` -> latents ``(B, T, C, h, w)``."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, T, C, h, w)`` -> pixel video ``(B, T, 3, H, W)`` in ``[0, 1]``."""

    @abc.abstractmethod
    def encode_condition(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Condition tensors (batch-first) from a data batch."""

    @abc.abstractmethod
    def training_loss(self, x0: Tensor, cond: dict[str, Tensor], sigma: Tensor, noise: Tensor) -> Tensor:
        """The model's native denoising loss per sample, shape ``(B,)``."""

    @abc.abstractmethod
    def sample_sigma(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Training noise levels, shape ``(B,)``."""

    @abc.abstractmethod
    def rollout(
        self,
        cond: dict[str, Tensor],
        sampler: str,
        num_steps: int,
        guidance: float | tuple[float, float],
        generator: torch.Generator | None,
        keep_trajectory: bool = False,
    ) -> Trajectory:
        """Sample videos from the current policy."""

    # ------------------------------------------ settings from the checkpoint (issue 32)
    #: the settings this backbone uses and where each came from: ``{name: {"value": ..., "source": str}}``
    #: (text lengths, default guidance and sampling steps, flow shift, expert boundary, ...; :meth:`record_setting`)
    settings: dict[str, dict[str, Any]]

    def record_setting(self, name: str, value: Any, source: str) -> Any:
        """Record (and return) the value of a setting with its source, for :meth:`default_setting`, the start-up
        log and ``vidalign check-model``."""
        if "settings" not in self.__dict__:
            self.settings = {}
        self.settings[name] = {"value": value, "source": source}
        return value

    def default_setting(self, name: str, fallback: Any = None) -> Any:
        """The value of a recorded setting (:meth:`record_setting`), or ``fallback`` when this backbone has none."""
        entry = self.__dict__.get("settings", {}).get(name)
        return fallback if entry is None else entry["value"]

    def set_compute_dtype(self, dtype: str | None) -> None:
        """Store and run the frozen base weights of every denoiser (:meth:`denoisers`) in ``dtype`` while the
        trained LoRA weights (the master copy the optimizer updates) stay float32 (our choice, the usual mixed-precision
        LoRA recipe, e.g. diffusers' training scripts' ``cast_training_params(..., dtype=torch.float32)``; flow_grpo's
        Wan script instead keeps the LoRA transformer float32 under accelerate's bf16 autocast). The submodules a
        diffusers class keeps in fp32 (``_keep_in_fp32_modules``: Wan's time embedder, norms, ...) stay float32,
        as ``from_pretrained(torch_dtype=...)`` does. A checkpoint is loaded in ``dtype`` already (:func:`load_dtype`);
        LoRA weights that peft created in the base's dtype are cast to float32 here. peft runs each LoRA branch in the
        LoRA's dtype and adds it to the base layer's output in the base dtype; the families' ``predict`` cast inputs
        to the denoiser's dtype (timesteps stay float32) and the velocity back to float32, so the sampling maths and
        log-probs stay float32.

        Args:
            dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``/None (nothing changes).

        Raises:
            ValueError: an unknown name, or a low-precision dtype with ``finetune="full"`` (the trained weights
                would be stored in it: use ``precision: bf16-mixed`` or ``fsdp_param_dtype`` for that).
        """
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{type(self).__name__}: dtype must be one of {sorted(DTYPES)} or null, got {dtype!r}")
        self.compute_dtype = dtype or "float32"
        self.record_setting("dtype", self.compute_dtype, "config" if dtype else "as loaded (float32)")
        if dtype in (None, "float32"):
            return
        if getattr(self, "finetune", "lora") == "full":
            raise ValueError(f"{type(self).__name__}: dtype={dtype!r} stores the base weights in {dtype}, but finetune='full' trains "
                             "them: keep dtype float32 (and use trainer.precision bf16-mixed or fsdp_param_dtype)")
        for model in self.denoisers():
            for name, param in model.named_parameters():
                if "lora_" in name and param.dtype != torch.float32:
                    param.data = param.data.float()  # LoRA masters float32
            keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
            for module_name, module in model.named_modules():
                if "lora_" in module_name:
                    continue
                for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    if not tensor.is_floating_point() or any(k in f"{module_name}.{name}".split(".") for k in keep):
                        continue  # diffusers' rule for _keep_in_fp32_modules: a name component of the parameter
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.to(DTYPES[dtype])
                    else:
                        setattr(module, name, tensor.to(DTYPES[dtype]))

    # ------------------------------------------------- frozen parts (issue 24)
    #: frozen modules moved to the compute device only while used (``offload_frozen``)
    offload_frozen: bool = False

    def vae_modules(self) -> list[nn.Module]:
        """The VAE(s) that ``vae_dtype`` casts (default: ``[self.vae]``)."""
        return [self.vae]

    def encoder_modules(self) -> list[nn.Module]:
        """The frozen condition encoders that ``encoder_dtype`` casts: text encoder(s) and image encoder."""
        return []

    def configure_frozen_parts(self, vae_dtype: str | None, encoder_dtype: str | None, offload_frozen: bool) -> None:
        """Run the frozen VAE and condition encoders in another dtype and/or keep them on CPU between uses.

        ``vae_dtype`` / ``encoder_dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``; None keeps the loaded dtype)
        cast :meth:`vae_modules` / :meth:`encoder_modules`; inputs are cast to the module's dtype at each call and
        outputs back to float32 (every family's ``encode`` / ``decode`` / condition encoders), so the trained
        parameters (LoRA, or the denoiser with ``finetune="full"``) and everything downstream stay float32.
        ``offload_frozen``: those modules stay on CPU — moving the backbone (Lightning's ``.to(device)`` at fit start)
        skips them — and :meth:`frozen_on_device` moves them to the denoiser's device for each use and back
        (peak GPU memory without them; costs a host-device copy of their weights per use). bf16 runs on CPU
        too (slowly). Source: our choice (issue 24).

        Raises:
            ValueError: an unknown dtype name, or a VAE option with ``train_vae`` (trained weights stay float32
                and on the device).
        """
        for name, value in (("vae_dtype", vae_dtype), ("encoder_dtype", encoder_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{type(self).__name__}: {name} must be one of {sorted(DTYPES)} or null, got {value!r}")
        if getattr(self, "train_vae", False) and (vae_dtype not in (None, "float32") or offload_frozen):
            raise ValueError(f"{type(self).__name__}: train_vae trains the VAE: vae_dtype must stay float32 and offload_frozen false")
        if vae_dtype is not None:
            for module in self.vae_modules():
                module.to(DTYPES[vae_dtype])
        if encoder_dtype is not None:
            for module in self.encoder_modules():
                module.to(DTYPES[encoder_dtype])
        self.vae_dtype, self.encoder_dtype, self.offload_frozen = vae_dtype, encoder_dtype, bool(offload_frozen)

    @property
    def compute_device(self) -> torch.device:
        """The device the denoiser runs on (where offloaded frozen modules are moved for a use)."""
        return next(self.denoiser.parameters()).device

    @contextlib.contextmanager
    def frozen_on_device(self, *modules: nn.Module | None):
        """With ``offload_frozen``: ``modules`` on :attr:`compute_device` inside the block, back on CPU after it
        (also on error); otherwise nothing happens. A module already on the device (an enclosing block moved it)
        is left to that block."""
        if not self.offload_frozen:
            yield
            return
        device = self.compute_device
        moved = [m for m in modules if m is not None and next(m.parameters()).device != device]
        for m in moved:
            m.to(device)
        try:
            yield
        finally:
            for m in moved:
                m.to("cpu")

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.float`` ...) skipping the offloaded frozen modules, which stay
        on CPU in their own dtype (:meth:`configure_frozen_parts`)."""
        if not self.offload_frozen:
            return super()._apply(fn, recurse)
        frozen = {id(m) for m in self.vae_modules() + self.encoder_modules() if m is not None}
        stash = {name: m for name, m in self._modules.items() if m is not None and id(m) in frozen}
        for name in stash:
            del self._modules[name]
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules.update(stash)

    # ------------------------------------------------ encoding a batch (cache)
    def cacheable_condition_keys(self) -> tuple[str, ...]:
        """Condition keys that depend on one clip only, deterministically: stored by the latent cache and computed
        clip by clip (default: :attr:`condition_keys` except the ``negative_*`` ones, which are the same for every
        clip and come from :meth:`complete_condition`)."""
        return tuple(k for k in self.condition_keys if not k.startswith("negative_"))

    def cacheable_condition(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The :meth:`cacheable_condition_keys` part of the condition of ``batch`` (default: from
        :meth:`encode_condition` without a generator: only for families whose condition draws no noise)."""
        cond = self.encode_condition(batch, None)
        return {k: cond[k] for k in self.cacheable_condition_keys() if k in cond}

    def complete_condition(self, batch: dict[str, Any], parts: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The full condition dict from the clip-wise ``parts`` (:meth:`encode_clips`, or the cache) plus what is
        drawn or shared per step (default: the ``negative_*`` keys from :meth:`negative_condition`)."""
        b = next(iter(parts.values())).shape[0]
        cond = {k: parts[k] for k in self.cacheable_condition_keys() if k in parts}
        if any(k.startswith("negative_") for k in self.condition_keys):
            device = next(iter(parts.values())).device
            cond.update({k: v.to(device) for k, v in self.negative_condition(b).items()})
        return cond

    def negative_condition(self, batch_size: int) -> dict[str, Tensor]:
        """The ``negative_*`` condition tensors (unconditional prompt) for ``batch_size`` clips."""
        raise NotImplementedError(f"{type(self).__name__} has no negative condition")

    def encode_clips(self, batch: dict[str, Any], latents: bool = True) -> dict[str, Tensor]:
        """What the latent cache stores, computed clip by clip: ``latents`` (:meth:`encode` of ``batch["video"]``)
        when ``latents``, and the :meth:`cacheable_condition` tensors, each ``(B, ...)``.

        Clip by clip (batches of one) so that a clip's tensors do not depend on its batch mates (a batched
        convolution or matmul may differ in the last bit with the batch size): the cache, written clip by clip,
        then holds exactly what this returns for any batch, and training from it gives bit-identical losses.
        Our choice (issue 24).
        """
        b = len(batch["video"]) if "video" in batch else len(batch["first_frame"])
        rows = []
        for i in range(b):
            one = {k: (v[i : i + 1] if (torch.is_tensor(v) or isinstance(v, (list, tuple))) and len(v) == b else v) for k, v in batch.items()}
            row = {"latents": self.encode_clipwise(one["video"])} if latents else {}
            row.update(self.cacheable_condition(one))
            rows.append(row)
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def encode_clipwise(self, video: Tensor) -> Tensor:
        """:meth:`encode` one clip at a time (the latents of :meth:`encode_clips`, without the conditions)."""
        return torch.cat([self.encode(video[i : i + 1]) for i in range(video.shape[0])])

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(x0 latents (B, T', C, h, w), condition)`` of a training batch of real clips: from the latent cache when
        the batch carries ``batch["cached"]`` (:class:`~lightning_vidalign.cache.CachedClipDataset`), else encoded
        now (:meth:`encode_clips`); then :meth:`complete_condition` (noise drawn from ``generator``, e.g. SVD's
        conditioning-frame augmentation, identically in both cases)."""
        parts = batch["cached"] if "cached" in batch else self.encode_clips(batch)
        return parts["latents"], self.complete_condition(batch, parts, generator)

    def condition_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The condition of a batch (rollouts: no latents needed), from the cache when present (:meth:`encode_batch`)."""
        parts = batch["cached"] if "cached" in batch else self.encode_clips(batch, latents=False)
        return self.complete_condition(batch, parts, generator)

    def encoder_identity(self) -> dict[str, Any]:
        """What the cached tensors depend on besides the data: the backbone class and mode, the base path, a content
        fingerprint of the VAE and condition encoders' weights (:func:`~lightning_vidalign.checkpointing.base_weights_fingerprint`
        over them), their dtypes, and the family's encoding settings (:meth:`encoding_settings`). Compared field by
        field when training from a cache (a difference makes the cache stale)."""
        from lightning_vidalign.checkpointing import base_weights_fingerprint

        modules = nn.ModuleList([m for m in self.vae_modules() + self.encoder_modules() if m is not None])
        ident = {"backbone": f"{type(self).__module__}.{type(self).__qualname__}", "mode": str(getattr(self, "mode", None)),
                 "pretrained_path": str(getattr(self, "pretrained_path", None)), "encoders.weights": base_weights_fingerprint(modules),
                 "vae_dtype": str(next(self.vae.parameters()).dtype).replace("torch.", ""),
                 "encoder_dtype": ",".join(sorted({str(next(m.parameters()).dtype).replace("torch.", "") for m in self.encoder_modules() if m is not None})) or "none"}
        ident.update({f"settings.{k}": v for k, v in self.encoding_settings().items()})
        return ident

    def encoding_settings(self) -> dict[str, Any]:
        """Settings of the family that change the cached tensors (e.g. the text length)."""
        return {}

    # ------------------------------------------------------------- sharding
    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained network (UNet / DiT) that FSDP2 shards."""
        raise NotImplementedError

    def denoisers(self) -> list[torch.nn.Module]:
        """Every trained network, each sharded as one FSDP2 unit after its blocks: ``[self.denoiser]``
        unless a backbone has several (Wan 2.2 A14B's two experts)."""
        return [self.denoiser]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Per-block activation checkpointing of every denoiser (:meth:`denoisers`), on or off.

        Through diffusers' own ``ModelMixin.enable_gradient_checkpointing()`` / ``disable_gradient_checkpointing()``:
        each block the model class checkpoints is run under ``torch.utils.checkpoint.checkpoint(block.__call__, ...,
        use_reentrant=False)`` when grad is enabled (its ``_gradient_checkpointing_func``), so only the block inputs
        are kept for backward and the block is recomputed there. Non-reentrant checkpointing calls the block's
        ``__call__`` again, so peft's LoRA layers inside it and FSDP2's per-block all-gather hooks run in the
        recomputation too; no-grad calls (rollouts, reference forwards) are unaffected. Which blocks are checkpointed
        is the model class's choice: every DiT block for Wan and HunyuanVideo 1.5 (not the latter's token refiner);
        for the SVD UNet the ResNet blocks and spatial transformer blocks, not the temporal transformer blocks
        (diffusers' ``TransformerSpatioTemporalModel``).

        Args:
            enabled: checkpoint (True) or keep every activation (False).
        """
        for model in self.denoisers():
            if enabled:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()
        self.activation_checkpointing = bool(enabled)

    #: Ulysses sequence-parallel degree applied by :meth:`enable_sequence_parallel` (1: off)
    sequence_parallel_size: int = 1

    def context_parallel_plan(self, model: torch.nn.Module) -> dict | None:
        """The diffusers context-parallel plan (``{module: split/gather}``) for a denoiser: its class's ``_cp_plan``
        (None: not splittable). A backbone overrides it to supply its own (HunyuanVideo 1.5)."""
        return getattr(type(model), "_cp_plan", None) or None

    def prepare_sequence_parallel(self, model: torch.nn.Module, size: int) -> None:
        """Called for each denoiser before diffusers' ``enable_parallelism``: e.g. install attention processors
        that run under Ulysses (HunyuanVideo 1.5). Default: nothing."""

    def enable_sequence_parallel(self, size: int, mesh=None) -> None:
        """Ulysses sequence parallelism of degree ``size`` for every denoiser (:meth:`denoisers`), through diffusers'
        context parallelism (:func:`lightning_vidalign.sequence_parallel.enable_sequence_parallel`) with the plan of
        :meth:`context_parallel_plan`; ``mesh`` from
        :func:`~lightning_vidalign.sequence_parallel.sequence_parallel_mesh`. ``VideoAlignModule`` calls it in
        ``configure_model`` for ``sequence_parallel_size > 1``; every rank of a group must then call the denoiser
        with the same inputs.

        Raises:
            ValueError: a denoiser without a context-parallel plan (the SVD UNet: diffusers has none), or a head
                count not divisible by ``size`` — each naming ``sequence_parallel_size`` and the value.
        """
        from lightning_vidalign.sequence_parallel import SETTING, check_divisible, enable_sequence_parallel

        for model in self.denoisers():
            if not self.context_parallel_plan(model):
                import diffusers

                raise ValueError(
                    f"sequence_parallel_size={size}: {type(self).__name__}'s denoiser {type(model).__name__} has no diffusers "
                    f"context-parallel plan (_cp_plan) in diffusers {diffusers.__version__}, so its tokens cannot be split: "
                    f"set {SETTING} 1 (sequence parallelism is available for WanBackbone and HunyuanVideo15Backbone)"
                )
            heads = getattr(model.config, "num_attention_heads", None)
            if heads is not None:
                check_divisible(f"attention heads of {type(model).__name__} (num_attention_heads)", int(heads), size)
        for model in self.denoisers():
            self.prepare_sequence_parallel(model, size)
            enable_sequence_parallel(model, size, mesh, cp_plan=self.context_parallel_plan(model))
        self.sequence_parallel_size = int(size)

    def fsdp_modules(self) -> list[torch.nn.Module]:
        """The denoiser's blocks that FSDP2 wraps one by one (each is gathered only for its forward)."""
        raise NotImplementedError

    # ------------------------------------------------------ base pretraining
    def vae_reconstruct(self, video: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable VAE pass for VAE training: ``(reconstruction, posterior mean, posterior logvar)``.

        ``video (B, T, 3, H, W)`` in ``[0, 1]``; the reconstruction is in ``[-1, 1]`` units with the
        input's shape; mean/logvar are unscaled latents ``(B, T', C, h, w)``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support VAE training")

    def set_latent_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Set the latent normalisation of the VAE from per-channel statistics ``(C,)`` of unscaled latents."""
        raise NotImplementedError(f"{type(self).__name__} does not support latent statistics")

    def save_pretrained(self, directory: str, dtype: torch.dtype = torch.float32) -> str:
        """Write the base model (adapters excluded) in the diffusers layout; returns ``directory``."""
        raise NotImplementedError(f"{type(self).__name__} cannot save a base model")

    # ----------------------------------------------------------------- adapters
    def setup_finetuning(self, denoiser: nn.Module, finetune: str, train_vae: bool, lora_config, add_adapter, seed: int) -> int:
        """Make the trainable parameters of a freshly loaded (all-frozen) backbone.

        ``finetune="lora"``: ``add_adapter(lora_config)`` under the RNG seed ``seed`` (deterministic
        LoRA init), only ``lora_`` parameters of ``denoiser`` trainable; ``"full"``: no adapter, every
        ``denoiser`` parameter trainable (``self.lora_config = None``). ``train_vae`` makes ``self.vae``
        trainable too. Sets ``self.finetune``, ``self.train_vae``, ``self.lora_config``.

        Returns:
            The number of LoRA parameters (0 for ``"full"``).

        Raises:
            ValueError: for an unknown ``finetune``, or a LoRA that matched no module of ``denoiser``.
        """
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"{type(self).__name__}: finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
        self.finetune, self.train_vae = finetune, train_vae
        self.lora_config = lora_config if finetune == "lora" else None
        n_lora = 0
        if self.lora_config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                add_adapter(self.lora_config)
            n_lora = sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" in n)
            if n_lora == 0:
                raise ValueError(f"lora_target_modules={lora_config.target_modules!r} matched no module of the {type(denoiser).__name__}")
        for name, param in denoiser.named_parameters():
            param.requires_grad_(finetune == "full" or "lora_" in name)
        self.vae.requires_grad_(train_vae)
        return n_lora

    def adapter_modules(self) -> Iterator[nn.Module]:
        """The peft LoRA layers of this backbone."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.modules():
            if isinstance(module, BaseTunerLayer):
                yield module

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Context in which the LoRA adapters are bypassed: the reference policy, no weight copy."""
        layers = list(self.adapter_modules())
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield self
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (the adapters)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """State of the trainable parameters only (keys as in ``self.state_dict()``)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}


#: Shipped demo bases (issue 8): ``pretrained_path: demo:<name>`` resolves to this package folder.
DEMO_BASES = {"svd_tiny": "SVD", "wan_tiny": "Wan 2.2 TI2V"}
DEMO_PREFIX = "demo:"


def demo_base_dir(name: str) -> str:
    """Directory of a demo base shipped inside the package (``lightning_vidalign/demo_bases/<name>``).

    Args:
        name: one of :data:`DEMO_BASES` (``"svd_tiny"``, ``"wan_tiny"``).

    Raises:
        ValueError: for an unknown name.
        FileNotFoundError: if the folder is missing, naming it and the config that makes it.
    """
    if name not in DEMO_BASES:
        raise ValueError(f"unknown demo base {name!r}; shipped: {sorted(DEMO_BASES)}")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_bases", name)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"demo base {name!r}: {path}/model_index.json does not exist; it is made by "
            f"`vidalign fit --config configs/pretrain/{name}.yaml`"
        )
    return path


def resolve_pretrained_path(path: str) -> str:
    """``"demo:<name>"`` -> the shipped directory (:func:`demo_base_dir`); any other path unchanged.

    The directory is then loaded with ``from_pretrained`` exactly as a real checkpoint.

    Raises:
        ValueError: for the placeholder ``"<set: ...>"`` of a model-zoo config (``configs/models/``), naming the option to set.
    """
    if path.startswith("<") and path.endswith(">"):
        raise ValueError(f"pretrained_path is still the model-zoo placeholder {path!r}: download the checkpoint and set "
                         "--model.init_args.backbone.init_args.pretrained_path /path/to/its/folder (check it first: vidalign check-model /path/to/its/folder)")
    if path.startswith(DEMO_PREFIX):
        return demo_base_dir(path[len(DEMO_PREFIX) :])
    return path


#: the key of ``model_index.json`` under which a folder of the tiny family (the demo bases, written by a backbone's
#: ``save_pretrained``) records the settings it was trained with (text length, guidance, steps). diffusers ignores
#: ``model_index.json`` keys that start with ``_``, so the folder still loads with ``DiffusionPipeline.from_pretrained``.
FOLDER_DEFAULTS_KEY = "_vidalign_defaults"


def read_model_index(path: str) -> dict[str, Any]:
    """``<path>/model_index.json`` as a dict ({} when the file does not exist)."""
    import json

    file = os.path.join(path, "model_index.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def read_folder_defaults(path: str | None) -> dict[str, Any]:
    """The settings a checkpoint folder records for itself under :data:`FOLDER_DEFAULTS_KEY` of its
    ``model_index.json`` ({} for a real checkpoint, which records none, or no folder)."""
    return dict(read_model_index(path).get(FOLDER_DEFAULTS_KEY) or {}) if path else {}


def folder_or_default(name: str, own: dict[str, Any], own_source: str, default: tuple[Any, str]) -> dict[str, Any]:
    """``{"value", "source"}`` of a setting: the folder's own record ``own[name]`` (source ``own_source``), else
    ``default`` = ``(value, source)`` (e.g. :func:`pipeline_default`'s)."""
    value, source = (own[name], own_source) if name in own else default
    return {"value": value, "source": source}


def pipeline_default(pipeline: str, parameter: str, method: str = "__call__") -> tuple[Any, str]:
    """The default value of ``parameter`` of ``diffusers.<pipeline>.<method>`` (read from the installed diffusers by
    ``inspect.signature``, so it follows the library) and a source string naming it.

    Raises:
        KeyError: if the installed diffusers has no such parameter (naming pipeline, method and parameter).
    """
    import inspect

    import diffusers

    params = inspect.signature(getattr(getattr(diffusers, pipeline), method)).parameters
    if parameter not in params or params[parameter].default is inspect.Parameter.empty:
        raise KeyError(f"diffusers {diffusers.__version__}: {pipeline}.{method} has no default for {parameter!r}")
    return params[parameter].default, f"{pipeline}.{method} default (diffusers {diffusers.__version__})"


def load_dtype(dtype: str | None, finetune: str) -> torch.dtype | None:
    """The dtype to load a checkpoint's denoiser in for the backbone option ``dtype`` (see
    :meth:`VideoBackbone.set_compute_dtype`): the low-precision dtype itself with LoRA (the frozen base is loaded in it
    directly, diffusers keeping ``_keep_in_fp32_modules`` float32: no float32 copy of a 14 B model in host memory), else
    None (as stored; ``finetune="full"`` keeps float32 masters and is refused a low-precision ``dtype``)."""
    return DTYPES[dtype] if finetune == "lora" and dtype in ("bfloat16", "float16") else None


FINETUNE_MODES = ("lora", "full")


def export_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of a diffusers model cast to ``dtype`` for writing, with the submodules the model
    class lists in ``_keep_in_fp32_modules`` (e.g. Wan's rope, time embedder, norms) kept in fp32,
    as diffusers' own ``from_pretrained(torch_dtype=...)`` does."""
    import copy

    return _cast_for_export(copy.deepcopy(module), dtype)


def _cast_for_export(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` cast to ``dtype`` in place, its ``_keep_in_fp32_modules`` kept in fp32 (see :func:`export_copy`)."""
    module.to(dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32 and keep:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                sub.float()
    return module


def merged_copy(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of a diffusers model with its peft LoRA fused into the base weights, as a plain model of
    the original class (no adapter layers, no ``peft_config``), cast as :func:`export_copy` does.

    Each LoRA layer is merged with peft's ``BaseTunerLayer.merge(safe_merge=True)`` (``W ← W + (α/r)·B·A``,
    computed on the fp32 copy before the cast) and then replaced by its base layer with diffusers'
    ``recurse_remove_peft_layers`` (what ``fuse_lora`` + ``unload_lora`` do for models that have them;
    the SVD UNet has no ``fuse_lora``). The given ``module`` and its adapters are untouched.

    Raises:
        ValueError: peft's, if a merged weight is not finite.
    """
    import copy

    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(module).float()
    for layer in out.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge(safe_merge=True)
    recurse_remove_peft_layers(out)
    if hasattr(out, "peft_config"):
        del out.peft_config
    if getattr(out, "_hf_peft_config_loaded", False):
        out._hf_peft_config_loaded = False  # else diffusers' save_pretrained would treat it as an adapter holder
    return _cast_for_export(out, dtype)


class CheckpointLoadError(ValueError):
    """A checkpoint folder whose files exist but do not load (a truncated download, a corrupt header or config), naming
    the folder, the library's error and the command that checks the folder (``vidalign check-model``)."""


@contextlib.contextmanager
def loading_checkpoint(path: str, what: str):
    """Context of a family's ``from_pretrained`` calls: a library error while reading the folder becomes a
    :class:`CheckpointLoadError` naming ``what``, ``path`` and ``vidalign check-model`` (our refusals pass through)."""
    try:
        yield
    except (FileNotFoundError, CheckpointLoadError):
        raise
    except Exception as e:  # noqa: BLE001 - any library failure to read the files is this folder's problem, named
        raise CheckpointLoadError(f"{what} in {path!r} does not load ({error_summary(e)}); check the folder: vidalign check-model {path}") from e


def error_summary(error: BaseException, limit: int = 300) -> str:
    """``"<Type>: <first line of the message>"`` (at most ``limit`` characters of it; an empty message gives the type alone
    with a colon): a library error named in one line of ours."""
    first = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {first}"


def require_weight_files(root: str, subfolders: list[str], what: str) -> None:
    """Raise ``FileNotFoundError`` naming the first of ``subfolders`` of ``root`` that holds no
    ``*.safetensors`` or ``*.bin`` weight file."""
    for sub in subfolders:
        folder = os.path.join(root, sub)
        if not glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin")):
            raise FileNotFoundError(f"{what}: no weight file (*.safetensors or *.bin) in {folder!r}")
