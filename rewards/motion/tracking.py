"""Point tracking behind one interface (LMR's input; SHIFT §4.1, DESIGN §3): pyramidal Lucas–Kanade."""
from __future__ import annotations

import abc
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor


class PointTracker(abc.ABC):
    """``track(frames (T, H, W) uint8 gray, queries (N, 2) float (x, y) in frame 0) ->
    (tracks (N, T, 2) pixels, visibility (N, T) in {0, 1}, confidence (N, T) in [0, 1])``."""

    @abc.abstractmethod
    def track(self, frames: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ...


class LucasKanadeTracker(PointTracker):
    """Pyramidal Lucas–Kanade (OpenCV ``calcOpticalFlowPyrLK``), chained frame to frame, with a
    forward–backward check (Kalal et al. 2010): a point is visible at ``t + 1`` if both directions
    converge and the round trip ``t -> t+1 -> t`` returns within ``fb_threshold`` pixels.
    Confidence ``exp(-fb_error / fb_threshold)``. Once lost a point stays lost (its last position is
    carried, visibility 0): our choice, no re-detection.

    Args:
        window: LK window side in pixels. levels: pyramid levels above the base.
        fb_threshold: forward–backward error (pixels) above which a point is lost.
    """

    thread_safe = True  # stateless: videos of a batch are tracked in parallel threads

    def __init__(self, window: int = 15, levels: int = 3, fb_threshold: float = 1.0):
        if window < 3 or levels < 0 or fb_threshold <= 0:
            raise ValueError(f"LucasKanadeTracker: bad window={window}, levels={levels}, fb_threshold={fb_threshold}")
        self.window, self.levels, self.fb_threshold = window, levels, fb_threshold

    def track(self, frames: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import cv2

        t, n = frames.shape[0], queries.shape[0]
        params = dict(winSize=(self.window, self.window), maxLevel=self.levels,
                      criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
        tracks = np.zeros((n, t, 2), np.float32)
        vis = np.zeros((n, t), np.float32)
        conf = np.zeros((n, t), np.float32)
        tracks[:, 0], vis[:, 0], conf[:, 0] = queries, 1.0, 1.0
        for i in range(t - 1):
            p0 = tracks[:, i].reshape(-1, 1, 2).astype(np.float32)
            p1, st1, _ = cv2.calcOpticalFlowPyrLK(frames[i], frames[i + 1], p0, None, **params)
            back, st2, _ = cv2.calcOpticalFlowPyrLK(frames[i + 1], frames[i], p1, None, **params)
            fb = np.linalg.norm(back.reshape(-1, 2) - tracks[:, i], axis=1)
            ok = (st1.reshape(-1) == 1) & (st2.reshape(-1) == 1) & (fb < self.fb_threshold) & (vis[:, i] > 0)
            tracks[:, i + 1] = np.where(ok[:, None], p1.reshape(-1, 2), tracks[:, i])
            vis[:, i + 1] = ok
            conf[:, i + 1] = np.where(ok, np.exp(-fb / self.fb_threshold), 0.0)
        return tracks, vis, conf


def track_points(video: Tensor, queries: Tensor, tracker: PointTracker | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Track query points through videos.

    Args:
        video: ``(B, T, C, H, W)`` in ``[0, 1]`` (RGB or gray).
        queries: ``(B, N, 2)`` ``(x, y)`` pixel positions in frame 0.
        tracker: a :class:`PointTracker` (default :class:`LucasKanadeTracker`).

    Returns:
        ``tracks (B, N, T, 2)`` pixels, ``visibility (B, N, T)`` in ``{0, 1}``, ``confidence (B, N, T)``
        in ``[0, 1]`` (float32, on the video's device).

    Raises:
        ValueError: on mismatched shapes.
    """
    from lightning_vidalign.rewards.motion.flow import to_gray

    if video.ndim != 5 or queries.ndim != 3 or queries.shape[-1] != 2 or queries.shape[0] != video.shape[0]:
        raise ValueError(f"track_points: video (B, T, C, H, W) and queries (B, N, 2), got {tuple(video.shape)} and {tuple(queries.shape)}")
    tracker = tracker or LucasKanadeTracker()
    gray = (to_gray(video.float()) if video.shape[2] == 3 else video.float())[:, :, 0]
    frames = (gray.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    q = queries.float().cpu().numpy()
    workers = min(video.shape[0], os.cpu_count() or 1)
    if workers > 1 and getattr(tracker, "thread_safe", False):  # OpenCV releases the GIL: one video per thread
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(tracker.track, frames, q))
    else:
        out = [tracker.track(frames[b], q[b]) for b in range(video.shape[0])]
    stack = lambda i: torch.from_numpy(np.stack([o[i] for o in out])).to(video.device)  # noqa: E731
    return stack(0), stack(1), stack(2)
