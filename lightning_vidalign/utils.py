"""Small helpers: stage timers, GIF encoding, TensorBoard video summaries."""
from __future__ import annotations

import io
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor


class StageTimer:
    """Accumulates wall-clock seconds per named stage (for the cost split of a training step)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self.calls[stage] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def video_to_gif(video: Tensor, fps: float = 7.0) -> bytes:
    """Encode one video ``(T, 3, H, W)`` in ``[0, 1]`` as an animated GIF (Pillow).

    Returns:
        The GIF file bytes (loops forever, ``1000/fps`` ms per frame).
    """
    from PIL import Image

    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def add_gif_summary(writer, tag: str, video: Tensor, step: int, fps: float = 7.0) -> None:
    """Write a video to TensorBoard as an animated GIF image summary (needs no moviepy).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``.
        tag: summary tag.
        video: ``(T, 3, H, W)`` in ``[0, 1]``.
        step: global step.
        fps: playback rate.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    t, c, h, w = video.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=video_to_gif(video, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
