"""Benchmark: our Wan rollout loop vs diffusers' WanPipeline denoising loop (same tiny model, seed).

Run: ``python -m pytest -m bench tests/benchmarks/test_wan_rollout_vs_pipeline.py -s``. Writes
``runs/bench/wan_rollout_vs_pipeline.json``. Both sample latents only (no VAE decode), with CFG, on
the same prompt embeddings; the ODE outputs must agree and our time must be <= 1.1x theirs.
"""
import json
import os

import pytest
import torch

from benchmarks.common import interleaved_medians
from lightning_vidalign.backbones import WanBackbone

pytestmark = pytest.mark.bench


def test_rollout_matches_and_is_not_slower_than_the_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    bb = WanBackbone(lora_rank=8, lora_alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    prompts = ["a big cartoon rabbit stretches", "a man talks in a car"]
    cond = bb.encode_condition({"caption": prompts})
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=bb.transformer, vae=bb.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=bb.flow_shift))
    pipe.set_progress_bar_config(disable=True)
    steps, guidance, frames = 20, 5.0, 17

    def ours():
        return bb.rollout(cond, "ode", steps, guidance, torch.Generator().manual_seed(1), num_frames=frames, decode=False).latents.permute(0, 2, 1, 3, 4)

    def theirs():
        return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"], guidance_scale=guidance,
                    num_inference_steps=steps, num_frames=frames, height=64, width=64, generator=torch.Generator().manual_seed(1), output_type="latent").frames

    a, b = ours(), theirs()  # warm-up and equality
    max_abs = float((a - b).abs().max())
    times, med = interleaved_medians({"ours": ours, "pipeline": theirs}, 7)
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "setting": f"tiny Wan T2V, batch 2, {frames} frames 64x64 (latents 5x16x16), {steps} steps, CFG {guidance}, latents only",
        "max_abs_diff": max_abs,
        "median_s": med,
        "ratio_ours_over_pipeline": med["ours"] / med["pipeline"],
        "repeats_s": times,
    }
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/wan_rollout_vs_pipeline.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    assert max_abs < 1e-4
    assert report["ratio_ours_over_pipeline"] <= 1.1
