"""Benchmark: one epoch of the training loader of configs/sft.yaml's data (11 clips of 8 x 64 x 64, batches of 2, one
process, no workers) decoded from the videos vs read from its LitData shards (issue 24, item 4).

Run: ``python -m pytest -m bench tests/benchmarks/test_streaming_load.py -s``. Side by side and interleaved
(7 repeats, median; :func:`interleaved_medians`); the shards are written once before (``write_shards``, timed
once). Histogram shot cuts for both (start-up only; the timed part is the loader's epoch). Measured on 2 CPU cores
(2026-12-04): conversion 3.12 s (11 + 3 clips, 1.38 MB); one epoch: video 1106 ms, shards 3.2 ms (ratio 349x; repeats
video 1042-1495 ms, shards 2-9 ms). Figures also in the README, "Streaming data".
"""
import tempfile
import time

import pytest

from lightning_vidalign.datamodules import VideoClipDataModule, write_shards

from benchmarks.common import interleaved_medians

pytestmark = pytest.mark.bench


def test_epoch_from_shards_vs_from_video():
    out = tempfile.mkdtemp(prefix="vidalign-bench-shards-") + "/shards"
    settings = dict(num_frames=8, fps=7.0, height=64, width=64, batch_size=2, shot_detector="histogram")
    t = time.perf_counter()
    summary = write_shards(VideoClipDataModule(**settings), out)
    convert = time.perf_counter() - t
    video, shards = VideoClipDataModule(**settings), VideoClipDataModule(**settings, shards=out)
    video.setup("fit"), shards.setup("fit")

    def epoch(dm):
        return lambda: sum(len(b["index"]) for b in dm.train_dataloader())

    times, med = interleaved_medians({"video": epoch(video), "shards": epoch(shards)}, repeats=7)
    print(f"\nconversion {convert:.2f} s ({summary['train']} + {summary['val']} clips, {summary['bytes'] / 1e6:.2f} MB); one epoch "
          f"({len(video.train_set)} clips): video {med['video'] * 1e3:.1f} ms, shards {med['shards'] * 1e3:.1f} ms, ratio "
          f"{med['video'] / med['shards']:.1f}x (repeats video {[round(x * 1e3) for x in times['video']]}, shards "
          f"{[round(x * 1e3) for x in times['shards']]} ms)")
    assert med["shards"] < med["video"]
