"""Benchmark: motion-reward throughput (videos per second) on 2 CPU cores, split into estimation
(flow / tracking + features) and discriminator time.

Run: ``python -m pytest -m bench tests/benchmarks/test_reward_throughput.py -s``. Writes
``runs/bench/reward_throughput.json``. Default resolution and length of the tiny default
(64x64, 8 frames, real clips), batches of 8 videos scored with the EMA discriminator (``score``, the
call the algorithms make); rewards measured interleaved, 5 repeats, median. IMR with OpenCV DIS
(default) and with SEA-RAFT-S (random weights: same cost as trained ones; runs at 128 px, see
:class:`LearnedFlow`); LMR with Lucas-Kanade at 256 queries (our tiny default) and 1024 (paper).
"""
import json
import os
import statistics

import pytest
import torch

from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import IMRReward, LMRReward
from lightning_vidalign.rewards.motion import SEARAFTFlow

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reward_throughput():
    dm = VideoClipDataModule(clip_stride=0.5, val_fraction=0)
    dm.setup("fit")
    videos = torch.stack([dm.train_set[i]["video"] for i in range(8)])
    rewards = {
        "imr_dis": IMRReward(),
        "imr_searaft_s": IMRReward(flow=SEARAFTFlow(variant="s")),
        "lmr_lk_256": LMRReward(num_queries=256),
        "lmr_lk_1024": LMRReward(num_queries=1024),
    }
    for r in rewards.values():
        r.score(videos[:2])  # warm-up
    samples = {k: [] for k in rewards}
    for _ in range(5):
        for name, r in rewards.items():
            r.timer.reset()
            r.score(videos)
            samples[name].append(dict(r.timer.seconds))
    rows = {}
    for name, runs in samples.items():
        est = statistics.median(s["estimation"] for s in runs)
        disc = statistics.median(s["discriminator"] for s in runs)
        rows[name] = {"videos_per_s": len(videos) / (est + disc), "estimation_s_per_video": est / len(videos), "discriminator_s_per_video": disc / len(videos)}
        print(f"{name:15s} {rows[name]['videos_per_s']:7.2f} videos/s  estimation {1000 * est / len(videos):7.1f} ms/video  "
              f"discriminator {1000 * disc / len(videos):6.1f} ms/video")
    os.makedirs(os.path.join(ROOT, "runs/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "runs/bench/reward_throughput.json"), "w") as f:
        json.dump({"threads": torch.get_num_threads(), "videos": list(videos.shape), "rewards": rows}, f, indent=2)
    assert all(r["videos_per_s"] > 0 for r in rows.values())
