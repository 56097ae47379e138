"""Benchmark: SHIFT vs SFT training cost per real sample on the tiny model, side by side.

Run: ``python -m pytest -m bench tests/benchmarks -s``. Prints the ratio and SHIFT's time split and
writes ``runs/bench/shift_vs_sft.json``. Paper (SHIFT Table 1): SHIFT 2.46x SFT per epoch at K=10.
"""
import json
import os
import time

import lightning as L
import pytest
import torch

from lightning_vidalign.algorithms import SFT, SHIFT
from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import IMRReward

pytestmark = pytest.mark.bench


def _opt(params):
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.95))


def _fit(module, dm, steps, callbacks=()):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks))
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


def test_shift_vs_sft_cost_per_real_sample():
    torch.manual_seed(0)
    dm = VideoClipDataModule(batch_size=2)
    dm.setup("fit")
    G, K, steps_inference = 4, 10, 8
    round_steps = K * G  # B conditions x G rollouts / minibatch B, x K passes
    results = {}
    _fit(SFT(SVDBackbone(lora_rank=8, lora_alpha=8), optimizer=_opt), dm, 3)  # warm-up (allocator, caches)
    for rep in range(3):  # interleaved repeats: SFT, SHIFT, SFT, SHIFT, ...
        sft = SFT(SVDBackbone(lora_rank=8, lora_alpha=8), optimizer=_opt)
        t_sft = _fit(sft, dm, round_steps)
        shift = SHIFT(SVDBackbone(lora_rank=8, lora_alpha=8), optimizer=_opt, rollouts_per_condition=G, passes=K,
                      num_inference_steps=steps_inference, sampler="euler_ancestral")
        reward = IMRReward()
        t_shift = _fit(shift, dm, round_steps, [reward])
        split = dict(shift.timer.seconds)
        split.update({f"imr_{k}": v for k, v in reward.timer.seconds.items()})
        results[rep] = {"sft_s": t_sft, "shift_s": t_shift, "ratio": t_shift / t_sft, "split_s": split}
    ratios = sorted(r["ratio"] for r in results.values())
    ratio = ratios[len(ratios) // 2]  # median of the interleaved repeats
    best = min(results.values(), key=lambda r: abs(r["ratio"] - ratio))
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "setting": f"tiny SVD, 64x64x8 frames, batch 2, G={G}, K={K}, {steps_inference} Euler-ancestral steps, one full round = {round_steps} steps",
        "per_real_sample_s": {"sft": best["sft_s"] / (2 * round_steps), "shift": best["shift_s"] / (2 * round_steps)},
        "ratio_shift_over_sft_median": ratio,
        "ratio_shift_over_sft_repeats": [r["ratio"] for r in results.values()],
        "shift_split_s": best["split_s"],
    }
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/shift_vs_sft.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    assert ratio > 1.0  # SHIFT does strictly more work than SFT per real sample
