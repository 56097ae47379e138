"""Benchmark: start-up of the default config with and without the shot-cut cache (issue 18).

Run: ``python -m pytest -m bench tests/benchmarks/test_startup_shot_cache.py -s``. Times, side by side and
interleaved (5 repeats, median), the command a user runs, ``vidalign fit --config configs/shift.yaml
--trainer.max_steps 1 --trainer.limit_val_batches 0`` to its end: "cold" with a fresh, empty cache folder
each time (TransNetV2 shot detection of the three default clips runs) and "warm" with a cache filled
once before. Measured on 2 CPU cores (README): cold 13.84 s vs warm 10.41 s (medians; repeats 13.8-14.2 s
and 10.0-11.5 s).
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.bench
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIDALIGN = os.path.join(os.path.dirname(sys.executable), "vidalign")


def _run(cache_dir: str, run_dir: str) -> float:
    env = {**os.environ, "VIDALIGN_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    out = subprocess.run([VIDALIGN, "fit", "--config", "configs/shift.yaml", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                          "--trainer.default_root_dir", run_dir], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return time.perf_counter() - t


def test_startup_with_and_without_shot_cache():
    root = tempfile.mkdtemp(prefix="vidalign-bench-")
    warm = os.path.join(root, "warm")
    _run(warm, os.path.join(root, "fill"))  # fill the cache once
    times = {"cold": [], "warm": []}
    for i in range(5):
        cold = os.path.join(root, f"cold{i}")
        times["cold"].append(_run(cold, os.path.join(root, f"run_cold{i}")))
        times["warm"].append(_run(warm, os.path.join(root, f"run_warm{i}")))
    shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nvidalign fit configs/shift.yaml, 1 step, to the end: cold {med['cold']:.2f} s, warm {med['warm']:.2f} s "
          f"(saved {med['cold'] - med['warm']:.2f} s; repeats cold {[round(x, 2) for x in times['cold']]}, warm {[round(x, 2) for x in times['warm']]})")
    assert med["warm"] < med["cold"]
