"""Benchmark: ViPO's overhead over GRPO per round (paper: +4.8% training time on video).

Run: ``python -m pytest -m bench tests/benchmarks/test_vipo_overhead.py -s``. Writes
``runs/bench/vipo_overhead.json``. Same tiny Wan, rewards, SAGE SDE, 8 rollouts x 8 steps, CFG 2;
ViPO adds the Perceptual Structuring Module (TransNetV2 features + PCA maps, the ``prepare_round``
stage), the recorded transition means and the per-element log-densities. Interleaved repeats, median.
"""
import json
import os

import pytest
import torch

from lightning_vidalign.algorithms import GRPO, ViPO
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from benchmarks.common import timed_fit

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def test_vipo_overhead():
    dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))
    dm.setup("fit")
    kw = dict(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sampler="ode", num_inference_steps=8, guidance=2.0, rollouts_per_condition=4,
              sde_type="sage", timestep_fraction=0.5, minibatches_per_round=2, val_num_videos=0)
    timed_fit(ViPO(backbone=WanBackbone(lora_rank=8, lora_alpha=8), **kw), dm, 1)  # warm-up (TransNetV2 load)
    rows = []
    for _ in range(5):
        g = GRPO(backbone=WanBackbone(lora_rank=8, lora_alpha=8), **kw)
        t_g = timed_fit(g, dm, 3)
        v = ViPO(backbone=WanBackbone(lora_rank=8, lora_alpha=8), log_map_every=0, **kw)
        t_v = timed_fit(v, dm, 3)
        rows.append({"grpo_round_s": t_g, "vipo_round_s": t_v, "overhead": t_v / t_g - 1, "vipo_psm_s_per_round": v.timer.seconds["prepare_round"] / 3})
    rows.sort(key=lambda r: r["overhead"])
    med = rows[len(rows) // 2]
    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "median": med, "overheads": [r["overhead"] for r in rows]}
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/vipo_overhead.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    assert med["vipo_round_s"] > 0
