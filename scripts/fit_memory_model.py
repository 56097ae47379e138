#!/usr/bin/env python
"""Refit the activation coefficients of ``vidalign estimate`` (``lightning_vidalign.memory.ACTIVATION_COEFFICIENTS``).

Each measurement is one diffusers block of a tiny build of the family, in the dtypes our backbones train it in: the
base weights bf16 with the class's ``_keep_in_fp32_modules`` float32 (as ``from_pretrained(torch_dtype=bf16)`` loads
a checkpoint) and, for LoRA, the adapter weights **float32** (the master copy :meth:`set_compute_dtype
<lightning_vidalign.backbones.base.VideoBackbone.set_compute_dtype>` keeps; peft then runs each LoRA branch in fp32
and autograd saves an fp32 copy of its input, ~1.4× the bytes of an all-bf16 block: the 2026-12-07 review of the GPU
kit found the earlier fit, made with the LoRA cast to bf16, 30 % low). Full fine-tuning: the whole model cast to bf16
(``fsdp_param_dtype`` compute). The bytes the last block saves for backward (:class:`~lightning_vidalign.utils.
SavedActivationTracker`) are fitted by least squares on :data:`FIT_SHAPES` to the memory model's terms
(``memory.block_activation_bytes``); ``tests/test_memory_estimate.py`` checks the shipped coefficients on other
shapes with :func:`measure`.

Usage: ``python scripts/fit_memory_model.py`` prints the coefficients to paste into ``memory.py``. Our design.
"""
from __future__ import annotations

import lightning_vidalign  # noqa: F401  (the torchvision shim first)
import torch

from lightning_vidalign.utils import SavedActivationTracker

#: fitting shapes per family: Wan ``(heads, head_dim, ffn, T', h, w, text)``, HunyuanVideo 1.5 ``(heads, head_dim, T', h, w, text)``
FIT_SHAPES = {
    "wan": [(2, 16, 128, 3, 8, 8, 8), (4, 16, 256, 5, 8, 8, 16), (4, 32, 128, 3, 12, 12, 32), (8, 16, 512, 4, 16, 8, 8),
            (2, 32, 384, 6, 8, 12, 24), (6, 32, 256, 2, 16, 16, 12)],
    "hunyuan15": [(2, 16, 3, 8, 8, 8), (4, 16, 4, 8, 8, 16), (4, 32, 2, 12, 12, 32), (8, 16, 3, 8, 8, 8), (2, 32, 5, 8, 12, 24), (6, 32, 2, 8, 16, 12)],
}


def _as_trained(model: torch.nn.Module, finetune: str) -> None:
    """Cast ``model`` as our backbones train it (module docstring)."""
    model.to(torch.bfloat16)
    if finetune != "lora":
        return
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()


def measure(family: str, finetune: str, shape: tuple) -> tuple[int, dict[str, float]]:
    """Bytes the last of 2 blocks saves for backward, and the model's terms ``{n, D, F, H, L}`` (Wan: ``n`` video
    tokens; HunyuanVideo 1.5: ``n`` video tokens, ``L`` the joint text tokens), for one tiny build."""
    from diffusers import HunyuanVideo15Transformer3DModel, WanTransformer3DModel
    from peft import LoraConfig

    from lightning_vidalign.backbones.hunyuan_video15 import hunyuan15_lora_targets
    from lightning_vidalign.backbones.wan import WAN_ATTN_LORA

    torch.manual_seed(0)
    bf = torch.bfloat16
    if family == "wan":
        heads, hd, ffn, t, h, w, text = shape
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd, in_channels=8, out_channels=8, text_dim=32,
                                  freq_dim=32, ffn_dim=ffn, num_layers=2, rope_max_seq_len=64)
        inputs = [torch.randn(1, 8, t, h, w, dtype=bf), torch.tensor([500.0]), torch.randn(1, text, 32, dtype=bf)]
        forward = lambda: m(*inputs, return_dict=False)[0]  # noqa: E731
        blocks, regex = m.blocks, WAN_ATTN_LORA
        terms = {"n": t * h * w // 4, "D": heads * hd, "F": ffn, "H": heads, "L": text}
    else:
        heads, hd, t, h, w, text = shape
        m = HunyuanVideo15Transformer3DModel(in_channels=17, out_channels=8, num_attention_heads=heads, attention_head_dim=hd, num_layers=2, num_refiner_layers=1,
                                             text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=32, rope_axes_dim=(hd // 4, 3 * hd // 8, 3 * hd // 8),
                                             target_size=64, task_type="t2v")
        inputs = [torch.randn(1, 17, t, h, w, dtype=bf), torch.tensor([500.0], dtype=bf), torch.randn(1, text, 32, dtype=bf), torch.ones(1, text),
                  torch.randn(1, 8, 32, dtype=bf), torch.ones(1, 8), torch.zeros(1, 16, 32, dtype=bf)]
        forward = lambda: m(*inputs[:4], encoder_hidden_states_2=inputs[4], encoder_attention_mask_2=inputs[5], image_embeds=inputs[6],  # noqa: E731
                            return_dict=False)[0]
        blocks, regex = m.transformer_blocks, hunyuan15_lora_targets(2)
        terms = {"n": t * h * w, "D": heads * hd, "F": 4 * heads * hd, "H": heads, "L": text + 8 + 16}  # MLLM + ByT5 + image tokens
    m.requires_grad_(False)
    if finetune == "lora":
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=regex, init_lora_weights="gaussian"))
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        m.requires_grad_(True)
    _as_trained(m, finetune)
    tracker = SavedActivationTracker(exclude=list(m.parameters()) + list(m.buffers()) + inputs)
    out, start = [], {}
    blocks[-1].register_forward_pre_hook(lambda mod, *a: start.__setitem__("b", tracker.current_bytes))
    blocks[-1].register_forward_hook(lambda mod, *a: out.append(tracker.current_bytes - start["b"]))
    with tracker:
        forward().float().pow(2).mean().backward()
    return out[0], terms


def features(family: str, terms: dict[str, float]) -> list[float]:
    """The memory model's terms for one block: Wan ``(n·D, n·F, n·H, L·D)``; HunyuanVideo 1.5 (double stream:
    ``n_s = n + L`` through the block) ``(n_s·D, n_s·H, (n + L)²)``."""
    n, d, f, h, L = (terms[k] for k in "nDFHL")
    if family == "wan":
        return [n * d, n * f, n * h, L * d]
    ns = n + L
    return [ns * d, ns * h, (n + L) ** 2]


def fit(family: str, finetune: str) -> tuple[float, float, float, float, float]:
    """Least-squares coefficients ``(a, b, c, d, e)`` of ``memory.ACTIVATION_COEFFICIENTS`` on :data:`FIT_SHAPES`."""
    rows, ys = [], []
    for shape in FIT_SHAPES[family]:
        y, terms = measure(family, finetune, shape)
        rows.append(features(family, terms))
        ys.append(float(y))
    sol = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()
    if family == "wan":
        a, b, c, d = sol
        return round(a, 1), round(b, 1), round(c, 1), round(d, 1), 0.0
    a, c, e = sol
    return round(a, 1), 0.0, round(c, 1), 0.0, round(e, 2)


if __name__ == "__main__":
    for key in (("wan", "lora"), ("wan", "full"), ("hunyuan15", "lora"), ("hunyuan15", "full")):
        print(f"{key}: {fit(*key)},")
