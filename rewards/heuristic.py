"""Heuristic video scorers as reward callbacks (no learned weights): motion magnitude and flicker."""
from __future__ import annotations


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


__all__ = ["MotionMagnitudeReward", "FlickerReward"]
