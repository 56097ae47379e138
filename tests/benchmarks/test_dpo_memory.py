"""Benchmark: peak activation memory and time of one DPO step, joint vs decoupled backward.

Run: ``python -m pytest -m bench tests/benchmarks/test_dpo_memory.py -s``. Writes
``runs/bench/dpo_memory.json``.

Memory method (meaningful on CPU, where torch has no allocator statistics): the peak bytes of the
tensors the autograd graph holds for backward, counted per distinct storage with
``torch.autograd.graph.saved_tensors_hooks`` (:class:`lightning_vidalign.utils.SavedActivationTracker`);
parameters, buffers and the step's inputs are excluded. Time: the policy forward+backward part of the
step (the reference forward and optimizer step are identical in both modes), interleaved repeats,
median. Two model sizes: the tiny SVD UNet at width 1 (default) and width 3, one pair per step (the
regime DGB targets: one pair per device) and two pairs.
"""
import json
import os
import time

import pytest
import torch

from lightning_vidalign.algorithms import DPO
from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.backbones.svd import tiny_svd_components
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.utils import SavedActivationTracker

pytestmark = pytest.mark.bench


def _backbone(width, tmp_path):
    if width == 1:
        return SVDBackbone(lora_rank=8, lora_alpha=8)
    root = tmp_path / f"svd_w{width}"
    if not root.exists():
        parts = tiny_svd_components(0, width=width)
        for name in ("unet", "vae", "image_encoder"):
            parts[name].save_pretrained(root / name)
        from diffusers import EulerDiscreteScheduler

        EulerDiscreteScheduler(**{k: v for k, v in parts["scheduler_config"].items() if not k.startswith("_")}).save_config(root / "scheduler")
    return SVDBackbone(pretrained_path=str(root), lora_rank=8, lora_alpha=8)


def test_dpo_memory_joint_vs_decoupled(tmp_path):
    dm = VideoClipDataModule(batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    report = {"method": __doc__.split("Memory method")[1].split("Two model sizes")[0].strip(), "results": {}}
    for width in (1, 3):
        backbone = _backbone(width, tmp_path)
        module = DPO(backbone=backbone, beta=500.0)
        module.backward_pass = lambda loss, last=True: loss.backward()
        n_params = sum(p.numel() for p in backbone.unet.parameters())
        for pairs in (1, 2):
            sub = {k: v[:pairs] for k, v in batch.items()}
            gen = torch.Generator().manual_seed(0)
            x_w, x_l, cond, weights, _ = module.make_pairs(sub, gen)
            sigma, noise = module.sample_noise(x_w, gen)
            with torch.no_grad(), backbone.adapters_disabled():
                ref_w = backbone.training_loss(x_w, cond, sigma, noise)
                ref_l = backbone.training_loss(x_l, cond, sigma, noise)
            exclude = list(backbone.parameters()) + list(backbone.buffers()) + [x_w, x_l, sigma, noise, ref_w, ref_l, *cond.values()]
            peaks, times = {}, {"joint": [], "decoupled": []}
            for rep in range(6):
                for mode in ("joint", "decoupled"):
                    for p in backbone.trainable_parameters():
                        p.grad = None
                    step = module.decoupled_step if mode == "decoupled" else module.joint_step
                    with SavedActivationTracker(exclude=exclude) as tracker:
                        start = time.perf_counter()
                        step(x_w, x_l, cond, sigma, noise, ref_w, ref_l, weights, 500.0)
                        times[mode].append(time.perf_counter() - start)
                    peaks[mode] = tracker.peak_bytes
            med = {m: sorted(t[1:])[len(t[1:]) // 2] for m, t in times.items()}  # first repeat = warm-up
            report["results"][f"unet {n_params / 1e6:.1f}M params, {pairs} pair(s)"] = {
                "peak_activation_MiB": {m: v / 2**20 for m, v in peaks.items()},
                "memory_ratio_decoupled_over_joint": peaks["decoupled"] / peaks["joint"],
                "median_policy_step_s": med,
                "time_ratio_decoupled_over_joint": med["decoupled"] / med["joint"],
                "repeats_s": times,
            }
    report["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/dpo_memory.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "repeats_s"} for k, v in report["results"].items()}, indent=2))
    for r in report["results"].values():
        assert r["memory_ratio_decoupled_over_joint"] <= 0.6
