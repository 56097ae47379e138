"""Benchmark: our rollout loop vs the diffusers pipeline's denoising loop for the two backbones of issue 23, on the same
tiny model, seed and prompt embeddings: Wan 2.2 two experts (``WanPipeline`` with ``transformer_2`` and
``boundary_ratio``) and HunyuanVideo 1.5 T2V (``HunyuanVideo15Pipeline``).

Run: ``python -m pytest -m bench tests/benchmarks/test_new_backbones_rollout_vs_pipeline.py -s``. Writes
``runs/bench/new_backbones_rollout_vs_pipeline.json``. Latents only (no VAE decode), with CFG; timings interleaved
(ours, pipeline, ours, ...) and the median of 5 taken. The latents must agree to 1e-5; the ratio is reported, and
must stay <= 1.5 (our loop also records the trajectory and log-prob inputs the pipeline does not).
"""
import json
import os

import pytest
import torch

from activation_steps import perturb_lora
from benchmarks.common import interleaved_medians

pytestmark = pytest.mark.bench

STEPS, FRAMES, GUIDANCE = 8, 9, 3.0


def _wan_two_experts():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from lightning_vidalign.backbones import WanBackbone

    bb = WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=0.875)
    perturb_lora(bb, 1, 0.3)
    cond = bb.encode_condition({"caption": ["a red car drives on a road"]})
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=bb.transformer, transformer_2=bb.transformer_2, vae=bb.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=bb.flow_shift), boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)

    def theirs():
        return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"], guidance_scale=GUIDANCE,
                    num_inference_steps=STEPS, num_frames=FRAMES, height=64, width=64, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames

    return bb, cond, theirs


def _hunyuan_video15():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    from lightning_vidalign.backbones import HunyuanVideo15Backbone

    bb = HunyuanVideo15Backbone(lora_rank=4, lora_alpha=4)
    perturb_lora(bb.transformer, 1, 0.3)
    cond = bb.encode_condition({"caption": ["a dog runs on the grass"]})
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=bb.transformer, vae=bb.vae, text_encoder_2=None, tokenizer_2=None,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=bb.flow_shift), guider=ClassifierFreeGuidance(guidance_scale=GUIDANCE))
    pipe.set_progress_bar_config(disable=True)
    names = {"prompt_embeds": "prompt_embeds", "prompt_mask": "prompt_embeds_mask", "prompt_embeds_2": "prompt_embeds_2", "prompt_mask_2": "prompt_embeds_mask_2"}
    args = {**{v: cond[k] for k, v in names.items()}, **{f"negative_{v}": cond[f"negative_{k}"] for k, v in names.items()}}

    def theirs():
        return pipe(**args, height=64, width=64, num_frames=FRAMES, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames

    return bb, cond, theirs


@pytest.mark.parametrize("name, build", [("wan22_two_experts", _wan_two_experts), ("hunyuan_video15_t2v", _hunyuan_video15)])
def test_rollout_matches_the_pipeline_and_its_time_ratio(name, build):
    bb, cond, theirs = build()

    def ours():
        return bb.rollout(cond, "ode", STEPS, GUIDANCE, torch.Generator().manual_seed(0), num_frames=FRAMES, decode=False).latents.permute(0, 2, 1, 3, 4)

    with torch.no_grad():
        a, b = ours(), theirs()  # warm-up and equality
        max_abs = float((a - b).abs().max())
        times, med = interleaved_medians({"ours": ours, "pipeline": theirs}, 5)
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "setting": f"{name}: tiny, batch 1, {FRAMES} frames 64x64, {STEPS} steps, CFG {GUIDANCE}, latents only",
        "max_abs_diff": max_abs,
        "median_s": med,
        "ratio_ours_over_pipeline": med["ours"] / med["pipeline"],
        "repeats_s": times,
    }
    os.makedirs("runs/bench", exist_ok=True)
    path = "runs/bench/new_backbones_rollout_vs_pipeline.json"
    old = json.load(open(path)) if os.path.exists(path) else {}
    json.dump({**old, name: report}, open(path, "w"), indent=2)
    print(json.dumps(report, indent=2))
    assert max_abs <= 1e-5
    assert report["ratio_ours_over_pipeline"] <= 1.5
