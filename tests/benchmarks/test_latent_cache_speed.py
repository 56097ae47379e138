"""Benchmark: SFT steps/s from the latent cache vs from the videos (issue 24 item 3).

Run: ``python -m pytest -m bench tests/benchmarks/test_latent_cache_speed.py -s``. configs/sft.yaml's setting (SVD demo
base ``demo:svd_tiny``, LoRA rank 8, the default data: the three shipped clips, 8 frames at 7 fps, 64x64, batch 2,
``num_workers`` 0), one process on CPU. Each fit runs 12 batches; the time of a batch is the interval between two
consecutive ``on_train_batch_start`` (the step plus fetching the next batch: decoding the videos, or reading the
cache files), the median over batches 2-12 (the first is warm-up). The two variants run interleaved (video, cache,
video, cache, ...; ``interleaved_medians``), 3 repeats, median of the per-fit medians. From video the batch pays
decoding (PyAV, resampling, resizing) and the VAE + CLIP encoders; from the cache it reads two small safetensors
files and encodes only SVD's noise-augmented conditioning frame (drawn anew each step). The losses of both are
bit-identical (tests/test_latent_cache.py). Measured figures: README, "Latent cache".
"""
import statistics
import tempfile
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_vidalign.algorithms import SFT
from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.cache import build_cache
from lightning_vidalign.datamodules import VideoClipDataModule
from benchmarks.common import interleaved_medians

pytestmark = pytest.mark.bench
SVD_DEMO = dict(pretrained_path="demo:svd_tiny", lora_rank=8, lora_alpha=8, fps=7)
STEPS = 12


class BatchTimes(Callback):
    def __init__(self):
        self.starts = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def _fit(cache_dir, out: list) -> None:
    module = SFT(SVDBackbone(**SVD_DEMO), val_num_videos=0, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-4))
    dm = VideoClipDataModule(batch_size=2, cache_dir=cache_dir)
    times = BatchTimes()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[times], default_root_dir=run_dir)
        trainer.fit(module, datamodule=dm)
    out.append(statistics.median(b - a for a, b in zip(times.starts[1:], times.starts[2:])))


def test_sft_steps_per_second_from_cache_vs_from_video():
    with tempfile.TemporaryDirectory() as root:
        cache = f"{root}/cache"
        t = time.perf_counter()
        manifest = build_cache(SVDBackbone(**SVD_DEMO), VideoClipDataModule(batch_size=2), cache)
        build_s = time.perf_counter() - t
        per_batch = {"video": [], "cache": []}
        walls, _ = interleaved_medians({"video": lambda: _fit(None, per_batch["video"]), "cache": lambda: _fit(cache, per_batch["cache"])}, repeats=3)
    med = {k: statistics.median(v) for k, v in per_batch.items()}
    ratio = med["video"] / med["cache"]
    print(f"\nSFT (configs/sft.yaml setting), s/batch median of batches 2-{STEPS}: from video {med['video']:.3f} "
          f"({1 / med['video']:.2f} steps/s), from cache {med['cache']:.3f} ({1 / med['cache']:.2f} steps/s): {ratio:.2f}x steps/s from the cache; "
          f"per-fit medians video {[round(x, 3) for x in per_batch['video']]}, cache {[round(x, 3) for x in per_batch['cache']]}; "
          f"whole fits (setup included) video {[round(x, 1) for x in walls['video']]} s, cache {[round(x, 1) for x in walls['cache']]} s; "
          f"cache build of {len(manifest['clips'])} clips {build_s:.1f} s")
    assert ratio > 1.0
