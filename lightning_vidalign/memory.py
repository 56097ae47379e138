"""Per-GPU memory of one training step at real model sizes (``vidalign estimate``, issue 24).

The transformers of Wan 2.1 T2V 1.3B / 14B and HunyuanVideo 1.5 are built from their diffusers configurations
(written below, sources named) on the meta device: parameter counts, block sizes and LoRA sizes are read off
the real module tree, nothing is allocated or downloaded.

Memory model of one step, one clip per sequence-parallel group, ``G`` GPUs of ``M`` GB, FSDP2 over all ``G`` GPUs
(our ``FSDP2Strategy``), bf16 compute, fp32 LoRA / master weights:

- **parameters**: the bf16 base sharded ``2P/G`` bytes plus two gathered blocks (the one computing and the one
  prefetched, ``2·2·P_block``); full fine-tuning keeps fp32 master shards, ``4P/G`` plus the gathered bf16 blocks.
- **optimizer**: AdamW with fp32 states. LoRA: ``16`` bytes per LoRA parameter (fp32 weight, gradient, two moments;
  rank ``r`` on the family's default targets); full fine-tuning: ``12P/G`` (fp32 gradient and two moments, sharded).
- **activations** of the transformer blocks (the patch embedding, output head, loss and the frozen encoders are
  not counted): per block ``a·n·D + b·n·F + c·n·H + d·L·D + e·n_att²`` bytes for ``n`` video tokens on this GPU,
  width ``D``, MLP width ``F``, ``H`` heads and ``L`` text tokens (HunyuanVideo 1.5's double-stream blocks carry the
  text tokens through the whole block, so there ``n = N/s + L`` and ``d = 0``). The last term is HunyuanVideo 1.5's
  only: diffusers' ``HunyuanVideo15AttnProcessor2_0`` builds a dense ``(B, 1, n_att, n_att)`` boolean mask over the
  whole joint sequence ``n_att = N + L`` in every block and SDPA keeps it (``e ≈ 2`` bytes per element, measured);
  Ulysses does not shrink it (every rank attends over the full sequence for its heads). ``N = T'·(h/p_h)·(w/p_w)``: latent
  frames ``T' = (T - 1)/4 + 1``, latent size ``(H/f, W/f)`` (VAE factor ``f`` = 8 for Wan, 16 for HunyuanVideo
  1.5), patch ``p``; Ulysses sequence parallelism over ``s`` GPUs gives each ``N/s`` tokens (attention runs on all
  ``N`` tokens for ``H/s`` heads, the same bytes), text tokens replicated. The coefficients ``(a, b, c, d)`` are
  the bytes autograd saves per unit, fitted by least squares to :class:`~lightning_vidalign.utils.SavedActivationTracker`
  measurements of single diffusers blocks (bf16, flash-style attention that saves ``q, k, v, out`` and the
  log-sum-exp, no ``N²`` term besides HunyuanVideo 1.5's mask) on tiny builds of each family at 6 shapes
  (``scripts/fit_memory_model.py`` measures and fits them), **in the dtypes our backbones train in**: the base bf16
  with the class's ``_keep_in_fp32_modules`` float32 (as a checkpoint loaded with ``torch_dtype=bfloat16``) and the
  LoRA weights float32 (the master copy ``set_compute_dtype`` keeps: peft runs each LoRA branch in fp32 and autograd
  saves an fp32 copy of its input); full fine-tuning cast to bf16 whole. Checked on held-out shapes by
  ``tests/test_memory_estimate.py`` (relative error printed and bounded there). Correction (2026-12-07): the first fit
  (issue 24) cast the LoRA to bf16 too and gave Wan ``a ≈ 41``: 30 % fewer bytes than a block with float32 LoRA saves
  (measured 1.43×; found by the review of the GPU kit). Interpretation for Wan with LoRA: ``a ≈ 60`` is ~9 bf16 and
  ~6 fp32 copies of the hidden states (diffusers' Wan block runs its norms and residual adds in fp32) plus the fp32
  copies of the LoRA branches' inputs (``d ≈ 19``: mostly the cross-attention key and value on the text), ``b ≈ 2``
  the GELU input in bf16;
  full fine-tuning also saves every frozen-in-LoRA linear's input.
- **activation checkpointing**: per block only its inputs (``2·n·D`` bytes, plus ``2·L·D`` for the text stream)
  stay, and one block's full activations are live during its recomputation.

A setting **fits** when parameters + optimizer + activations <= 90 % of the GPU (10 % left for the CUDA context,
allocator fragmentation, kernels' workspace and the uncounted activations).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any

import torch

GB = 1e9

#: bytes saved per (n·D, n·F, n·H, L·D, n_att²) in a bf16 training step, per family and fine-tuning mode (module
#: docstring). HunyuanVideo 1.5 has F = 4D, so its MLP term is folded into ``a`` (b = 0).
ACTIVATION_COEFFICIENTS: dict[tuple[str, str], tuple[float, float, float, float, float]] = {
    ("wan", "lora"): (60.4, 2.3, 3.9, 19.3, 0.0),
    ("wan", "full"): (68.3, 4.1, 8.5, 13.1, 0.0),
    ("hunyuan15", "lora"): (46.9, 0.0, 18.6, 0.0, 2.15),
    ("hunyuan15", "full"): (56.1, 0.0, 14.2, 0.0, 2.01),
}


@dataclass
class ModelSpec:
    """A real transformer configuration and what the token count needs.

    Attributes:
        name: human name.
        family: ``"wan"`` or ``"hunyuan15"``.
        config: diffusers transformer config (the class's ``__init__`` keywords).
        source: where the config values come from.
        vae_spatial, vae_temporal: the VAE's compression factors.
        text_tokens: text tokens per clip entering the blocks (Wan: UMT5, 512; HunyuanVideo 1.5: 1000 MLLM + 256
            ByT5 + 729 SigLIP image tokens, zeros for T2V but still in the sequence).
        resolutions: ``{"480p": (H, W), "720p": (H, W)}`` the model's pipelines use.
    """

    name: str
    family: str
    config: dict[str, Any]
    source: str
    vae_spatial: int
    vae_temporal: int
    text_tokens: int
    resolutions: dict[str, tuple[int, int]] = field(default_factory=lambda: {"480p": (480, 832), "720p": (720, 1280)})


_WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
REAL_MODELS: dict[str, ModelSpec] = {
    "wan2.1-1.3b": ModelSpec(
        "Wan 2.1 T2V 1.3B", "wan", {**_WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        "diffusers scripts/convert_wan_to_diffusers.py, get_transformer_config('Wan-T2V-1.3B')", 8, 4, 512),
    "wan2.1-14b": ModelSpec(
        "Wan 2.1 T2V 14B", "wan", {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
        "diffusers scripts/convert_wan_to_diffusers.py, get_transformer_config('Wan-T2V-14B')", 8, 4, 512),
    "hunyuanvideo1.5": ModelSpec(
        "HunyuanVideo 1.5 (480p/720p T2V)", "hunyuan15",
        dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54, num_refiner_layers=2, mlp_ratio=4.0,
             patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
             rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v"),
        "diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py, TRANSFORMER_CONFIGS['480p_t2v'] (720p_t2v differs only in target_size)",
        16, 4, 1000 + 256 + 729, {"480p": (480, 848), "720p": (720, 1280)}),
}


def build_on_meta(spec: ModelSpec) -> torch.nn.Module:
    """The diffusers transformer of ``spec`` on the meta device (no memory, no weights)."""
    from diffusers import HunyuanVideo15Transformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if spec.family == "wan" else HunyuanVideo15Transformer3DModel
    with torch.device("meta"):
        return cls(**spec.config)


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The checkpointed / FSDP-wrapped blocks (Wan ``blocks``, HunyuanVideo 1.5 ``transformer_blocks``)."""
    return model.blocks if hasattr(model, "blocks") else model.transformer_blocks


def lora_parameter_count(model: torch.nn.Module, family: str, rank: int) -> int:
    """``r·(in + out)`` over the linears our backbone's default LoRA regex targets for ``family``."""
    from lightning_vidalign.backbones.hunyuan_video15 import hunyuan15_lora_targets
    from lightning_vidalign.backbones.wan import WAN_ATTN_LORA

    pattern = re.compile(WAN_ATTN_LORA if family == "wan" else hunyuan15_lora_targets(len(blocks_of(model))))
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n))


@dataclass
class Shapes:
    """What the activation model needs of a built model."""

    params: int
    block_params: int
    layers: int
    width: int
    heads: int
    mlp: int
    patch: tuple[int, int, int]


def shapes_of(model: torch.nn.Module, spec: ModelSpec) -> Shapes:
    blocks = blocks_of(model)
    c = model.config
    if spec.family == "wan":
        patch, mlp = tuple(c.patch_size), int(c.ffn_dim)
    else:
        patch, mlp = (int(c.patch_size_t), int(c.patch_size), int(c.patch_size)), int(c.mlp_ratio * c.num_attention_heads * c.attention_head_dim)
    return Shapes(sum(p.numel() for p in model.parameters()), sum(p.numel() for p in blocks[0].parameters()), len(blocks),
                  int(c.num_attention_heads * c.attention_head_dim), int(c.num_attention_heads), mlp, patch)


def video_tokens(spec: ModelSpec, shapes: Shapes, height: int, width: int, frames: int) -> int:
    """``N = T'·(H/f/p_h)·(W/f/p_w)`` with ``T' = (T - 1)/f_t + 1``."""
    t_lat = (frames - 1) // spec.vae_temporal + 1
    return (t_lat // shapes.patch[0]) * (height // spec.vae_spatial // shapes.patch[1]) * (width // spec.vae_spatial // shapes.patch[2])


def block_activation_bytes(family: str, finetune: str, tokens: float, width: int, mlp: int, heads: int, text_tokens: int,
                           full_tokens: float | None = None) -> float:
    """Bytes one block saves for backward (bf16 step): ``a·n·D + b·n·F + c·n·H + d·L·D + e·n_att²`` (module docstring).

    Args:
        family: ``"wan"`` or ``"hunyuan15"``; finetune: ``"lora"`` or ``"full"``.
        tokens: video tokens on this GPU ``N/s``; width ``D``; mlp ``F``; heads ``H``; text_tokens ``L``.
        full_tokens: the clip's video tokens ``N`` (the attention mask's size); None: ``tokens`` (no SP).
    """
    full_tokens = tokens if full_tokens is None else full_tokens
    a, b, c, d, e = ACTIVATION_COEFFICIENTS[(family, finetune)]
    n_att = full_tokens + text_tokens
    if family == "hunyuan15":  # double stream: the text tokens go through the whole block
        n = tokens + text_tokens
        return a * n * width + b * n * mlp + c * n * heads + e * n_att**2
    return a * tokens * width + b * tokens * mlp + c * tokens * heads + d * text_tokens * width + e * n_att**2


def checkpointed_block_bytes(family: str, tokens: float, width: int, text_tokens: int) -> float:
    """Bytes a checkpointed block keeps: its bf16 inputs (hidden states; for HunyuanVideo 1.5 also the text stream)."""
    return 2.0 * (tokens + (text_tokens if family == "hunyuan15" else 0)) * width


def estimate_setting(spec: ModelSpec, height: int, width: int, frames: int, gpus: int = 8, gpu_gb: float = 80.0, lora_rank: int = 32,
                     sp: int = 1, ac: bool = False, finetune: str = "lora", experts: int = 1, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """GB per GPU of one training step of ``spec`` at one setting (the module's memory model), as
    ``{"params_GB", "optim_GB", "act_GB", "total_GB", "fits", "tokens", "params_B", "lora_params_M"}``.

    Args:
        spec: the model (e.g. built from a checkpoint folder's ``transformer/config.json`` by ``vidalign check-model``).
        height, width, frames: the clip's pixel size. gpus, gpu_gb: the run's GPUs (FSDP2 over all).
        lora_rank: rank on the family's default targets. sp: sequence-parallel size. ac: activation checkpointing.
        finetune: ``"lora"`` or ``"full"``.
        experts: Wan 2.2 A14B's two experts: parameters, LoRA and optimizer counted for both; activations too
            (under a distributed strategy with grad on both experts run on every call, ``WanBackbone``'s
            ``experts_every_call``).
        model: the transformer on the meta device when already built (else built from ``spec``).
    """
    model = build_on_meta(spec) if model is None else model
    sh = shapes_of(model, spec)
    n_lora = lora_parameter_count(model, spec.family, lora_rank) * experts
    gathered = 2 * 2 * sh.block_params
    params = ((2 if finetune == "lora" else 4) * sh.params * experts / gpus + gathered) / GB
    optim = (16 * n_lora if finetune == "lora" else 12 * sh.params * experts / gpus) / GB
    n = video_tokens(spec, sh, height, width, frames)
    full_block = block_activation_bytes(spec.family, finetune, n / sp, sh.width, sh.mlp, sh.heads, spec.text_tokens, full_tokens=n)
    act = (sh.layers * checkpointed_block_bytes(spec.family, n / sp, sh.width, spec.text_tokens) + full_block) if ac else sh.layers * full_block
    act = act * experts / GB
    total = params + optim + act
    return {"params_GB": params, "optim_GB": optim, "act_GB": act, "total_GB": total, "fits": total <= 0.9 * gpu_gb, "tokens": n,
            "params_B": sh.params * experts / 1e9, "lora_params_M": n_lora / 1e6}


def estimate_rows(gpus: int = 8, gpu_gb: float = 80.0, lora_rank: int = 32, models: list[str] | None = None,
                  frames: tuple[int, ...] = (81, 121), sp_sizes: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict[str, Any]]:
    """One row per model, resolution, frame count, SP size and checkpointing setting (GB per GPU), each setting from
    :func:`estimate_setting` (LoRA and full fine-tuning columns)."""
    rows = []
    for key in models or list(REAL_MODELS):
        spec = REAL_MODELS[key]
        model = build_on_meta(spec)
        for res, (height, width) in spec.resolutions.items():
            for t in frames:
                for sp in sp_sizes:
                    for ac in (False, True):
                        row = dict(model=spec.name, key=key, resolution=f"{res} {height}x{width}", frames=t, sp=sp, ac=ac)
                        for ft in ("lora", "full"):
                            est = estimate_setting(spec, height, width, t, gpus, gpu_gb, lora_rank, sp, ac, ft, model=model)
                            row.update(params_B=est["params_B"], tokens=est["tokens"])
                            if ft == "lora":
                                row["lora_params_M"] = est["lora_params_M"]
                            row.update({f"{ft}_params_GB": est["params_GB"], f"{ft}_optim_GB": est["optim_GB"], f"{ft}_act_GB": est["act_GB"],
                                        f"{ft}_total_GB": est["total_GB"], f"{ft}_fits": est["fits"]})
                        rows.append(row)
    return rows


def format_markdown(rows: list[dict[str, Any]], gpus: int, gpu_gb: float, lora_rank: int) -> str:
    """The memory table of docs/scale.md ("Memory estimate"): per model a header line and one row per (resolution, frames, SP), GB per GPU with and
    without checkpointing, ✓ where the setting fits 90 % of the GPU."""
    out = [f"Per GPU on {gpus} × {gpu_gb:g} GB, FSDP2 over all {gpus} GPUs, bf16 compute, one clip per sequence-parallel group, "
           f"LoRA rank {lora_rank}; GB = 1e9 bytes; ✓ = total <= 90 % of the GPU. Activations: transformer blocks only "
           "(model in `lightning_vidalign/memory.py`); frozen text encoder and VAE not counted (cache or offload them)."]
    for key in dict.fromkeys(r["key"] for r in rows):
        mr = [r for r in rows if r["key"] == key]
        r0 = mr[0]
        out += ["", f"**{r0['model']}**: {r0['params_B']:.2f} B parameters, LoRA {r0['lora_params_M']:.1f} M; parameters per GPU "
                f"{r0['lora_params_GB']:.2f} GB (LoRA, bf16 shard + 2 gathered blocks) / {r0['full_params_GB']:.2f} GB (full, fp32 master shard); "
                f"optimizer {r0['lora_optim_GB']:.2f} GB (LoRA) / {r0['full_optim_GB']:.2f} GB (full).", "",
                "| resolution | frames | tokens | SP | act/GPU LoRA | act/GPU LoRA + AC | total LoRA | total LoRA + AC | total full | total full + AC |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mr:
            if r["ac"]:
                continue
            ac = next(x for x in mr if x["resolution"] == r["resolution"] and x["frames"] == r["frames"] and x["sp"] == r["sp"] and x["ac"])
            mark = lambda x, ft: f"{x[f'{ft}_total_GB']:.1f} {'✓' if x[f'{ft}_fits'] else '✗'}"  # noqa: E731
            out.append(f"| {r['resolution']} | {r['frames']} | {r['tokens']} | {r['sp']} | {r['lora_act_GB']:.1f} | {ac['lora_act_GB']:.1f} | "
                       f"{mark(r, 'lora')} | {mark(ac, 'lora')} | {mark(r, 'full')} | {mark(ac, 'full')} |")
    return "\n".join(out)


def estimate(argv: list[str] | None = None) -> None:
    """``vidalign estimate``: print the per-GPU memory table (markdown) of the real model sizes."""
    parser = argparse.ArgumentParser(prog="vidalign estimate", description="Per-GPU memory (GB) of one training step of the real model sizes, with and without sequence parallelism and activation checkpointing, as a markdown table.")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the run (FSDP2 over all of them; default 8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GB (default 80; 90%% of it is the budget)")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of the LoRA columns (default 32)")
    parser.add_argument("--models", nargs="+", choices=sorted(REAL_MODELS), default=None, help="models to list (default: all)")
    args = parser.parse_args(argv)
    for name, value in (("--gpus", args.gpus), ("--gpu-memory-gb", args.gpu_memory_gb), ("--lora-rank", args.lora_rank)):
        if value <= 0:
            parser.error(f"{name} must be > 0, got {value}")
    # sequence-parallel sizes a run on these GPUs can use (training refuses one that does not divide the world size)
    sp_sizes = tuple(sp for sp in (1, 2, 4, 8) if args.gpus % sp == 0)
    rows = estimate_rows(args.gpus, args.gpu_memory_gb, args.lora_rank, args.models, sp_sizes=sp_sizes)
    print(format_markdown(rows, args.gpus, args.gpu_memory_gb, args.lora_rank))
