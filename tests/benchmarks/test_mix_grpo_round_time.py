"""Benchmark (issue 34, MixGRPO's claim): wall time of a training round of the shipped recipes — MixGRPO (SDE and
training in a 3-step window of 8), MixGRPO-Flash (the same, steps after the window compressed and taken with
DPM-Solver++ 2M, ratio 0.4), Flow-GRPO and DanceGRPO (half of the 8 steps trained) — built from
``configs/recipes/<name>.yaml`` as ``vidalign fit`` builds them (held-out evaluation off), one after the other and
interleaved, 3 rounds each, 3 repeats; the rollout and update phases from the module's stage timer.

Run: ``python -m pytest -m bench tests/benchmarks/test_mix_grpo_round_time.py -s`` (alone on the machine). Writes
``runs/bench/mix_grpo_round_time.json``. The held-out reward at equal rounds is the claims table's
(``scripts/learning_runs.py --claims mix_grpo_time``).
"""
import json
import os
import statistics

import pytest
import torch

from benchmarks.common import timed_fit
from lightning_vidalign.cli import VidAlignCLI
from lightning_vidalign.rewards import LuminanceReward

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {"MixGRPO": ("mix_grpo", []), "MixGRPO-Flash (0.4)": ("mix_grpo", ["--model.init_args.flash_ratio", "0.4"]),
            "Flow-GRPO": ("flow_grpo", []), "DanceGRPO": ("dance_grpo", [])}


def _build(recipe, args):
    cli = VidAlignCLI(args=["--config", os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml"), "--model.init_args.heldout_conditions", "0",
                            "--model.init_args.val_num_videos", "0", *args], run=False)
    return cli.model, cli.datamodule


def test_mix_grpo_round_time_against_flow_grpo_and_dance_grpo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rounds, repeats = 3, 3
    timed_fit(*_build("flow_grpo", []), 1, callbacks=[LuminanceReward()])  # warm-up
    samples = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, (recipe, args) in VARIANTS.items():
            module, dm = _build(recipe, args)
            total = timed_fit(module, dm, rounds, callbacks=[LuminanceReward()])
            samples[name].append({"round_s": total, **{f"{k}_s": v / rounds for k, v in module.timer.seconds.items()}})
    medians = {name: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for name, rows in samples.items()}
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "setting": "the recipes' settings (tiny Wan TI2V, 9 frames 64x64, 2 conditions x 4 rollouts, 8 steps, 2 optimizer steps per round), luminance reward",
        "medians": medians,
        "ratios_vs_dance_grpo": {n: {k: medians[n][k] / medians["DanceGRPO"][k] for k in ("round_s", "rollout_s", "update_s")} for n in medians},
        "ratios_vs_flow_grpo": {n: {k: medians[n][k] / medians["Flow-GRPO"][k] for k in ("round_s", "rollout_s", "update_s")} for n in medians},
        "samples": samples,
    }
    os.makedirs(os.path.join(ROOT, "runs", "bench"), exist_ok=True)
    with open(os.path.join(ROOT, "runs", "bench", "mix_grpo_round_time.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("medians", "ratios_vs_dance_grpo", "ratios_vs_flow_grpo")}, indent=1))
    assert all(m["round_s"] > 0 for m in medians.values())
