"""Heuristic video scorers as reward callbacks (no learned weights): motion magnitude, flicker and
H.264 (in)compressibility."""
from __future__ import annotations

import fractions

import av
import numpy as np
import torch
from torch import Tensor

from lightning_vidalign.rewards.base import RewardCallback
from lightning_vidalign.rewards.motion.flow import DISFlow, FlowEstimator


class MotionMagnitudeReward(RewardCallback):
    """Reward = mean optical-flow magnitude (pixels per frame, DIS flow), or closeness to a target.

    ``target=None``: ``r = m`` with ``m`` the :class:`~lightning_vidalign.metrics.MotionScore` of the
    video (range ``[0, ∞)``; rewards any motion, noise included). ``target=m*``:
    ``r = -|ln((m + 0.01)/(m* + 0.01))|`` (range ``(-∞, 0]``, 0 at the target: neither frozen nor
    jittering videos win; our choice, e.g. ``m*`` = the real clips' motion score).

    Args:
        name, weight: see :class:`RewardCallback`.
        target: target motion in pixels per frame at the evaluated resolution, or None.
        flow: flow estimator (default: DIS ``medium``, no confidence).
    """

    def __init__(self, name: str = "motion", weight: float = 1.0, target: float | None = None, flow: FlowEstimator | None = None):
        super().__init__(name=name, weight=weight)
        if target is not None and target < 0:
            raise ValueError(f"MotionMagnitudeReward: target must be >= 0 pixels/frame, got {target}")
        from lightning_vidalign.metrics import MotionScore  # (metrics imports rewards.motion.flow)

        self.target = target
        self.metric = MotionScore(flow=flow or DISFlow(confidence=False))
        self._last: dict[str, Tensor] = {}

    @torch.no_grad()
    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        m = self.metric.per_video(videos.float().cpu())
        r = m if self.target is None else -torch.abs(torch.log((m + 0.01) / (self.target + 0.01)))
        self._last = {"motion_px": m}
        return r.to(videos.device)

    def score_components(self) -> dict[str, Tensor]:
        return dict(self._last)


class FlickerReward(RewardCallback):
    """Reward = minus the flicker of the video (higher = steadier).

    ``kind="compensated"`` (default): ``r = -MAE`` of predicting each inner frame by flow
    interpolation of its neighbours (:class:`~lightning_vidalign.metrics.MotionSmoothness` minus 1):
    brightness changes that motion does not explain. ``kind="raw"``: ``r = -mean|I_{t+1} - I_t|``
    (VBench temporal flickering minus 1), which also penalises motion. Range ``[-1, 0]``.
    Our choice of form.

    Args:
        name, weight: see :class:`RewardCallback`.
        kind: ``"compensated"`` (needs ``T >= 3``) or ``"raw"``.
    """

    def __init__(self, name: str = "flicker", weight: float = 1.0, kind: str = "compensated", flow: FlowEstimator | None = None):
        super().__init__(name=name, weight=weight)
        if kind not in ("compensated", "raw"):
            raise ValueError(f"FlickerReward: kind must be 'compensated' or 'raw', got {kind!r}")
        from lightning_vidalign.metrics import MotionSmoothness, TemporalFlickering

        self.kind = kind
        self.metric = MotionSmoothness(flow=flow or DISFlow(confidence=False)) if kind == "compensated" else TemporalFlickering()

    @torch.no_grad()
    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        return (self.metric.per_video(videos.float().cpu()) - 1.0).to(videos.device)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 → PyAV's packed ``yuv420p`` array ``(3H/2, W)`` uint8: BT.601 limited
    range (FFmpeg's default for this conversion), chroma from the mean of each 2x2 RGB block.

    Done here in NumPy instead of by swscale: swscale's SIMD paths depend on the input's memory
    alignment, which made the same clip encode to sizes a few bytes apart between calls.
    """
    rgb = frame.astype(np.float64)
    h, w, _ = rgb.shape
    y = 16.0 + rgb @ np.array([0.256788, 0.504129, 0.097906])
    block = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    u = 128.0 + block @ np.array([-0.148223, -0.290993, 0.439216])
    v = 128.0 + block @ np.array([0.439216, -0.367788, -0.071427])
    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v)]
    return np.concatenate([planes[0].reshape(-1), planes[1].reshape(-1), planes[2].reshape(-1)]).reshape(h * 3 // 2, w)


def h264_bytes(video: np.ndarray, crf: int = 23, preset: str = "medium", fps: int = 8) -> int:
    """Size in bytes of the H.264 bitstream of one clip (PyAV ``libx264``, one thread, colour
    conversion in NumPy: the same clip always gives the same size).

    Args:
        video: ``(T, H, W, 3)`` uint8 RGB; ``H`` and ``W`` even (4:2:0 chroma).
        crf: x264 constant rate factor (0–51, lower = finer quantisation).
        preset: x264 speed preset.
        fps: frame rate written in the stream (rate control depends on it only weakly under CRF).

    Returns:
        Total bytes of the encoded packets (stream headers included, no container). Source: our choice of
        encoder settings (x264's default CRF and preset), after DDPO's JPEG compressibility.

    Raises:
        ValueError: on a shape other than ``(T, H, W, 3)`` uint8 or odd ``H``/``W``.
    """
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"h264_bytes: expected a (T, H, W, 3) uint8 clip, got {video.shape} {video.dtype}")
    t, h, w, _ = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"h264_bytes: H and W must be even for yuv420p, got {h}x{w}")
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = w, h, "yuv420p"
    codec.time_base, codec.framerate = fractions.Fraction(1, fps), fps
    codec.options = {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "threads=1:lookahead-threads=1"}
    codec.thread_count = 1
    codec.thread_type = "NONE"
    size = 0
    for i in range(t):
        frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(video[i]), format="yuv420p")
        frame.pts = i
        size += sum(p.size for p in codec.encode(frame))
    size += sum(p.size for p in codec.encode(None))
    return size


class CompressibilityReward(RewardCallback):
    """Reward = minus (or plus) the H.264 size of the clip in kilobytes per frame (DDPO's JPEG
    compressibility / incompressibility objective, Black et al. 2023 §6.1, carried to video).

    ``r = sign · bytes / 1000 / T`` with ``sign = -1`` (``mode="compress"``: smaller files — flatter
    textures, less motion — win) or ``+1`` (``mode="incompress"``). Bytes from :func:`h264_bytes`
    (libx264 at ``crf``, one thread: the same clip always gives the same reward). Frames are
    quantised to uint8 first, so the reward is piecewise constant in the pixels. Fully offline and
    hard to fake: every byte saved is detail or motion the encoder did not need.

    Args:
        name, weight: see :class:`RewardCallback`.
        mode: ``"compress"`` or ``"incompress"``.
        crf: x264 constant rate factor (default 23, x264's default).
        preset: x264 preset (default ``medium``).

    Raises:
        ValueError: on an unknown ``mode`` or a ``crf`` outside 0–51.
    """

    def __init__(self, name: str = "compressibility", weight: float = 1.0, mode: str = "compress", crf: int = 23, preset: str = "medium"):
        super().__init__(name=name, weight=weight)
        if mode not in ("compress", "incompress"):
            raise ValueError(f"CompressibilityReward: mode must be 'compress' or 'incompress', got {mode!r}")
        if not 0 <= crf <= 51:
            raise ValueError(f"CompressibilityReward: crf must be in 0..51, got {crf}")
        self.mode, self.crf, self.preset = mode, crf, preset
        self._last: dict[str, Tensor] = {}

    @torch.no_grad()
    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        clips = (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
        kb = torch.tensor([h264_bytes(c, self.crf, self.preset) / 1000.0 / c.shape[0] for c in clips], dtype=torch.float32)
        self._last = {"kb_per_frame": kb}
        sign = -1.0 if self.mode == "compress" else 1.0
        return (sign * kb).to(videos.device)

    def score_components(self) -> dict[str, Tensor]:
        return dict(self._last)


class LuminanceReward(RewardCallback):
    """Reward = mean luma of the clip, ``r = scale · mean(0.299 R + 0.587 G + 0.114 B)`` (BT.601 weights,
    pixels in ``[0, 1]``; range ``[0, scale]``).

    A sanity-check objective (our choice): linear in the pixels, so every rollout's advantage carries a
    clear signal, and easy for any adapter to raise. A method or configuration that cannot raise the
    held-out luma within a few rounds has a broken learning loop (sign, pairing of advantages with
    rollouts, log-probabilities of the wrong transition), whatever its formulas say. The shipped recipes
    use it to show that each method learns; it is not a quality objective.

    Args:
        name, weight: see :class:`RewardCallback`.
        scale: multiplier (default 10: a 1% brighter clip gains about 0.04 at mid-grey). A negative scale rewards
            darkness (range ``[scale, 0]``; the SHIFT recipe uses -10, a direction its SFT anchor opposes).
    """

    def __init__(self, name: str = "luminance", weight: float = 1.0, scale: float = 10.0):
        super().__init__(name=name, weight=weight)
        self.scale = scale

    @torch.no_grad()
    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=videos.device).view(1, 1, 3, 1, 1)
        return self.scale * (videos.float() * luma).sum(2).flatten(1).mean(1)


__all__ = ["MotionMagnitudeReward", "FlickerReward", "CompressibilityReward", "LuminanceReward", "h264_bytes"]
