"""``vidalign estimate`` (lightning_vidalign/memory.py): real configurations on the meta device, the activation model
against SavedActivationTracker on held-out tiny shapes, the command as a user runs it, and the table of docs/scale.md equal
to its output."""
import os
import re
import subprocess
import sys

import pytest
import torch

from lightning_vidalign.memory import REAL_MODELS, block_activation_bytes, build_on_meta, shapes_of
from lightning_vidalign.utils import SavedActivationTracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("key,low,high", [("wan2.1-1.3b", 1.3e9, 1.5e9), ("wan2.1-14b", 13.5e9, 15e9), ("hunyuanvideo1.5", 8.0e9, 8.6e9)])
def test_real_configs_build_on_meta_with_the_published_sizes(key, low, high):
    """Published sizes: Wan 2.1 1.3B / 14B, HunyuanVideo 1.5 8.3B parameters."""
    model = build_on_meta(REAL_MODELS[key])
    assert next(model.parameters()).device.type == "meta"
    assert low <= shapes_of(model, REAL_MODELS[key]).params <= high


def _tracked_last_block(model, blocks, forward, lora_regex, finetune, inputs):
    """Bytes the last block saves for backward (SavedActivationTracker's running total around it), bf16."""
    from peft import LoraConfig

    model.requires_grad_(False)
    if finetune == "lora":
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=lora_regex, init_lora_weights="gaussian"))
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        model.requires_grad_(True)
    model.to(torch.bfloat16)
    tracker = SavedActivationTracker(exclude=list(model.parameters()) + list(model.buffers()) + inputs)
    out, start = [], {}
    blocks[-1].register_forward_pre_hook(lambda m, *a: start.__setitem__("b", tracker.current_bytes))
    blocks[-1].register_forward_hook(lambda m, *a: out.append(tracker.current_bytes - start["b"]))
    with tracker:
        forward().float().pow(2).mean().backward()
    return out[0]


# shapes not among the fitting ones (memory.py's docstring)
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_activation_model_matches_the_tracker_on_tiny_builds(finetune):
    from diffusers import HunyuanVideo15Transformer3DModel, WanTransformer3DModel

    from lightning_vidalign.backbones.hunyuan_video15 import hunyuan15_lora_targets
    from lightning_vidalign.backbones.wan import WAN_ATTN_LORA

    errors = {}
    for heads, hd, ffn, t, h, w, text in [(6, 16, 384, 5, 12, 12, 20), (3, 32, 256, 4, 16, 8, 12)]:
        torch.manual_seed(0)
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd, in_channels=8, out_channels=8, text_dim=32,
                                  freq_dim=32, ffn_dim=ffn, num_layers=2, rope_max_seq_len=64)
        x, ts, e = torch.randn(1, 8, t, h, w, dtype=torch.bfloat16), torch.tensor([500.0]), torch.randn(1, text, 32, dtype=torch.bfloat16)
        measured = _tracked_last_block(m, m.blocks, lambda: m(x, ts, e, return_dict=False)[0], WAN_ATTN_LORA, finetune, [x, ts, e])
        n = t * h * w // 4
        model = block_activation_bytes("wan", finetune, n, heads * hd, ffn, heads, text)
        errors[f"wan H{heads} D{heads * hd} F{ffn} N{n} L{text}"] = model / measured - 1
    for heads, hd, t, h, w, text in [(6, 16, 4, 8, 8, 20), (3, 32, 3, 12, 8, 12)]:
        torch.manual_seed(0)
        m = HunyuanVideo15Transformer3DModel(in_channels=17, out_channels=8, num_attention_heads=heads, attention_head_dim=hd, num_layers=2, num_refiner_layers=1,
                                             text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=32, rope_axes_dim=(hd // 4, 3 * hd // 8, 3 * hd // 8),
                                             target_size=64, task_type="t2v")
        bf = torch.bfloat16
        ins = [torch.randn(1, 17, t, h, w, dtype=bf), torch.tensor([500.0], dtype=bf), torch.randn(1, text, 32, dtype=bf), torch.ones(1, text),
               torch.randn(1, 8, 32, dtype=bf), torch.ones(1, 8), torch.zeros(1, 16, 32, dtype=bf)]
        fwd = lambda: m(*ins[:4], encoder_hidden_states_2=ins[4], encoder_attention_mask_2=ins[5], image_embeds=ins[6], return_dict=False)[0]  # noqa: E731
        measured = _tracked_last_block(m, m.transformer_blocks, fwd, hunyuan15_lora_targets(2), finetune, ins)
        n, n_text = t * h * w, text + 8 + 16  # MLLM + ByT5 + image tokens in the joint sequence
        model = block_activation_bytes("hunyuan15", finetune, n, heads * hd, 4 * heads * hd, heads, n_text)
        errors[f"hunyuan15 H{heads} D{heads * hd} N{n} L{n_text}"] = model / measured - 1
    for k, v in errors.items():
        print(f"{finetune} {k}: model / tracker - 1 = {v:+.3%}")
    assert max(abs(v) for v in errors.values()) <= 0.05


def _estimate_output():
    script = os.path.join(os.path.dirname(sys.executable), "vidalign")
    out = subprocess.run([script, "estimate"], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_vidalign_estimate_prints_the_table_and_the_scale_page_holds_it():
    text = _estimate_output()
    for spec in REAL_MODELS.values():
        assert f"**{spec.name}**" in text
    assert text.count("| 480p") == text.count("| 720p") == 3 * 2 * 4  # models x frame counts x SP sizes
    assert "✓" in text and "✗" in text
    page = open(os.path.join(ROOT, "docs", "scale.md")).read()
    section = re.search(r"<!-- BEGIN vidalign estimate -->\n(.*?)\n<!-- END vidalign estimate -->", page, re.S)
    assert section, "docs/scale.md lacks the marked section of `vidalign estimate`"
    assert section.group(1).strip() == text, "docs/scale.md's memory table is stale: rerun `vidalign estimate` and paste its output"
