"""Long-term Motion Reward (SHIFT §4.1, App. C): a transformer discriminator over point trajectories.

Pipeline per video: query points in frame 0 (:func:`sample_queries`, random by default) ->
tracks, visibility, confidence from a :class:`PointTracker` (:func:`track_points`) -> per point and
step the state ``[Δtrack, visibility, confidence, NCC]`` (:func:`patch_ncc`, :func:`lmr_features`)
-> :class:`LMRDiscriminator` (one token per point, CLS pooling) -> logit.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vidalign.rewards.motion.flow import to_gray
from lightning_vidalign.rewards.motion.imr import AdversarialDiscriminatorReward
from lightning_vidalign.rewards.motion.tracking import LucasKanadeTracker, PointTracker, track_points

QUERY_SAMPLING = ("random", "grid")
FEATURES = ("dx", "dy", "visibility", "confidence", "ncc", "query_x", "query_y")


def sample_queries(batch: int, num: int, height: int, width: int, mode: str = "random", margin: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Query points ``(x, y)`` in pixels in frame 0.

    ``random``: uniform over ``[margin, W-1-margin] × [margin, H-1-margin]``, drawn independently per
    video (SHIFT §4.1: random queries act as an implicit ensemble; App. C: random beats a grid).
    ``grid``: the centres of a ``gx × gy`` lattice over the same box with ``gx·gy >= num`` and
    ``gx/gy ≈ W/H``; if the lattice has more points than ``num``, ``num`` evenly spaced ones (in raster
    order) are kept; the same points for every video (our choice).

    Args:
        batch, num: videos and points per video. height, width: frame size in pixels.
        mode: ``"random" | "grid"``. margin: distance kept from the border (pixels).
        generator: CPU generator for ``random``.

    Returns:
        ``(batch, num, 2)`` float32 on CPU.

    Raises:
        ValueError: on an unknown mode, ``num < 1``, or a margin that leaves no room.
    """
    if mode not in QUERY_SAMPLING:
        raise ValueError(f"query_sampling must be one of {QUERY_SAMPLING}, got {mode!r}")
    if num < 1:
        raise ValueError(f"number of query points must be >= 1, got {num}")
    span_x, span_y = width - 1 - 2 * margin, height - 1 - 2 * margin
    if span_x <= 0 or span_y <= 0:
        raise ValueError(f"query margin {margin} leaves no room in a {height}x{width} frame")
    if mode == "random":
        u = torch.rand(batch, num, 2, generator=generator)
        return torch.stack([margin + u[..., 0] * span_x, margin + u[..., 1] * span_y], -1)
    gx = max(1, round(math.sqrt(num * span_x / span_y)))
    gy = math.ceil(num / gx)
    xs = margin + (torch.arange(gx) + 0.5) / gx * span_x
    ys = margin + (torch.arange(gy) + 0.5) / gy * span_y
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    if grid.shape[0] > num:
        grid = grid[torch.linspace(0, grid.shape[0] - 1, num).round().long()]
    return grid[None].expand(batch, num, 2).float().clone()


def _pixels_to_unit(points: Tensor, height: int, width: int) -> Tensor:
    """``(..., 2)`` ``(x, y)`` pixels -> ``[-1, 1]`` with pixel centres at the ends (``align_corners=True``)."""
    return torch.stack([2 * points[..., 0] / max(width - 1, 1) - 1, 2 * points[..., 1] / max(height - 1, 1) - 1], -1)


def _sample_patches(frames: Tensor, centres: Tensor, radius: int) -> Tensor:
    """Bilinear patches: ``frames (M, 1, H, W)``, ``centres (M, N, 2)`` pixels -> ``(M, N, P)``, ``P = (2r+1)²``."""
    m, _, h, w = frames.shape
    off = torch.arange(-radius, radius + 1, dtype=frames.dtype, device=frames.device)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    pts = centres[:, :, None, :] + torch.stack([ox, oy], -1).reshape(1, 1, -1, 2)  # (M, N, P, 2)
    return F.grid_sample(frames, _pixels_to_unit(pts, h, w), mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def patch_ncc(gray: Tensor, queries: Tensor, tracks: Tensor, patch_size: int = 7, eps: float = 1e-4) -> Tensor:
    """Normalized cross-correlation of each query patch (frame 0) with its tracked patch (frame t).

    ``NCC = Σ(a-ā)(b-b̄) / (sqrt(Σ(a-ā)²·Σ(b-b̄)²) + eps)`` over a ``patch_size²`` window sampled
    bilinearly (border replicated). The paper's "dense correlation maps between query points and their
    temporal neighbours" (SHIFT §4.1) reduced to this one local score per point and frame (our choice).

    Args:
        gray: ``(B, T, 1, H, W)`` intensities.
        queries: ``(B, N, 2)`` ``(x, y)`` pixels in frame 0.
        tracks: ``(B, N, T, 2)`` pixels.
        patch_size: odd window side.

    Returns:
        ``(B, N, T)`` in ``[-1, 1]`` (≈ 0 on flat patches; 1 at ``t = 0`` unless flat).

    Raises:
        ValueError: on an even patch size or mismatched shapes.
    """
    if patch_size % 2 != 1:
        raise ValueError(f"patch_ncc: patch_size must be odd, got {patch_size}")
    b, t, _, h, w = gray.shape
    if queries.shape[0] != b or tracks.shape[:2] != queries.shape[:2] or tracks.shape[2] != t:
        raise ValueError(f"patch_ncc: gray {tuple(gray.shape)}, queries {tuple(queries.shape)}, tracks {tuple(tracks.shape)} do not match")
    r = patch_size // 2
    ref = _sample_patches(gray[:, 0].float(), queries.float(), r)  # (B, N, P)
    cur = _sample_patches(gray.flatten(0, 1).float(), tracks.float().permute(0, 2, 1, 3).flatten(0, 1), r)
    cur = cur.unflatten(0, (b, t)).permute(0, 2, 1, 3)  # (B, N, T, P)
    a = ref[:, :, None] - ref[:, :, None].mean(-1, keepdim=True)
    c = cur - cur.mean(-1, keepdim=True)
    return (a * c).sum(-1) / ((a.pow(2).sum(-1) * c.pow(2).sum(-1)).sqrt() + eps)


def lmr_features(tracks: Tensor, visibility: Tensor, confidence: Tensor, ncc: Tensor, queries: Tensor, height: int, width: int, max_step: float = 50.0) -> Tensor:
    """Per-point, per-step motion state ``s_t = [Δx, Δy, visibility, confidence, NCC, qx, qy]``.

    ``Δ = track_t - track_{t-1}`` in percent of the longer frame side (so the features do not depend
    on resolution), clamped to ``±max_step``; visibility/confidence/NCC at ``t``; the query position
    in ``[-1, 1]`` repeated over steps (a positional code for the point token). SHIFT §4.1 (state
    ``[velocity, visibility, confidence]`` + correlation); the scaling and position are our choice.

    Args:
        tracks: ``(B, N, T, 2)`` pixels. visibility, confidence, ncc: ``(B, N, T)``.
        queries: ``(B, N, 2)`` pixels. height, width: frame size.

    Returns:
        ``(B, N, T-1, 7)`` float32, channels in :data:`FEATURES` order.

    Raises:
        ValueError: if ``T < 2``.
    """
    if tracks.shape[2] < 2:
        raise ValueError(f"lmr_features: need at least 2 frames, got tracks {tuple(tracks.shape)}")
    scale = 100.0 / max(height, width)
    delta = ((tracks[:, :, 1:] - tracks[:, :, :-1]).float() * scale).clamp(-max_step, max_step)
    steps = delta.shape[2]
    q = _pixels_to_unit(queries.float(), height, width)
    return torch.cat(
        [
            delta,
            visibility[:, :, 1:, None].float(),
            confidence[:, :, 1:, None].float(),
            ncc[:, :, 1:, None].float(),
            q[:, :, None, :].expand(-1, -1, steps, 2),
        ],
        -1,
    )


class LMRDiscriminator(nn.Module):
    """Transformer over point tokens with a CLS token -> one logit per video.

    Token of a point = ``Linear(flatten over steps of s_t)``; a video with a different number of
    steps than ``num_steps`` is linearly resampled along time first (our choice). Encoder: timm
    ViT ``Block``s (pre-norm, MLP ratio 4), final LayerNorm, linear head on the CLS token.
    No positional embedding over tokens: the point set is unordered; the query position is a feature.

    Args:
        num_steps: steps per token (frames - 1 of the training clips).
        num_features: channels of ``s_t`` (7, see :func:`lmr_features`).
        embed_dim, depth, num_heads: encoder size (paper: "trajectory discriminator head" on
            CoTracker3, size not given; tiny default ours).
    """

    def __init__(self, num_steps: int = 7, num_features: int = len(FEATURES), embed_dim: int = 64, depth: int = 2, num_heads: int = 4):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.num_steps, self.num_features = num_steps, num_features
        self.embed = nn.Linear(num_steps * num_features, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, 1)

    def forward(self, feats: Tensor) -> Tensor:
        """``(B, N, S, F)`` point states -> ``(B,)`` logits.

        Raises:
            ValueError: if ``F`` differs from ``num_features``.
        """
        b, n, s, f = feats.shape
        if f != self.num_features:
            raise ValueError(f"LMRDiscriminator expects {self.num_features} features per step, got {f}")
        x = feats.float()
        if s != self.num_steps:
            x = F.interpolate(x.permute(0, 1, 3, 2).reshape(b * n, f, s), size=self.num_steps, mode="linear", align_corners=True)
            x = x.reshape(b, n, f, self.num_steps).permute(0, 1, 3, 2)
        tokens = self.embed(x.reshape(b, n, -1))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)
        return self.head(self.norm(self.blocks(tokens))[:, 0]).squeeze(-1)


class LMRReward(AdversarialDiscriminatorReward):
    """Long-term Motion Reward: trajectories of query points -> :class:`LMRDiscriminator` logit.

    Same contract as :class:`IMRReward` (EMA scorer, adversarial BCE update after each training batch,
    logit clip, state in the checkpoint). Random queries are drawn from a counter-based generator
    (seed, number of feature calls), so a resumed run draws the same points (the counter is in the
    state).

    Args:
        name: metric namespace (default "lmr").
        tracker: a :class:`PointTracker` (default :class:`LucasKanadeTracker`; CoTracker3 through
            :class:`CoTracker3Tracker` from a local checkpoint).
        num_queries: points per video (paper: 1024).
        query_sampling: ``"random"`` (paper) or ``"grid"``.
        patch_size: NCC window (odd).
        num_steps: steps per point token (training clips' frames - 1).
        embed_dim, depth, num_heads: :class:`LMRDiscriminator` size.
        **kwargs: :class:`AdversarialDiscriminatorReward` arguments.
    """

    def __init__(
        self,
        name: str = "lmr",
        tracker: PointTracker | None = None,
        num_queries: int = 1024,
        query_sampling: str = "random",
        patch_size: int = 7,
        num_steps: int = 7,
        embed_dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        **kwargs,
    ):
        if query_sampling not in QUERY_SAMPLING:
            raise ValueError(f"LMRReward: query_sampling must be one of {QUERY_SAMPLING}, got {query_sampling!r}")
        self.tracker = tracker or LucasKanadeTracker()
        self.num_queries, self.query_sampling, self.patch_size = num_queries, query_sampling, patch_size
        self._arch = dict(num_steps=num_steps, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        self.query_seed = kwargs.get("seed", 0)
        self.query_draws = 0
        super().__init__(name=name, **kwargs)

    def build_discriminator(self) -> nn.Module:
        return LMRDiscriminator(**self._arch)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "query_draws": self.query_draws}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.query_draws = int(state.get("query_draws", 0))

    def _query_generator(self) -> torch.Generator:
        key = f"lmr-queries/{self.query_seed}/{self.query_draws}".encode()
        self.query_draws += 1
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))

    def features(self, videos: Tensor) -> Tensor:
        """``(B, T, 3, H, W)`` in ``[0, 1]`` -> ``(B, N, T-1, 7)`` (see :func:`lmr_features`)."""
        b, t, _, h, w = videos.shape
        if t < 2:
            raise ValueError(f"reward '{self.name}': LMR needs at least 2 frames, got videos {tuple(videos.shape)}")
        queries = sample_queries(b, self.num_queries, h, w, self.query_sampling, margin=self.patch_size // 2, generator=self._query_generator()).to(videos.device)
        tracks, vis, conf = track_points(videos, queries, self.tracker)
        ncc = patch_ncc(to_gray(videos.float()), queries, tracks, self.patch_size)
        return lmr_features(tracks, vis, conf, ncc, queries, h, w)


class CoTracker3Tracker(PointTracker):
    """CoTracker3 (Karaev et al. 2024, offline model) from a local checkpoint, behind :class:`PointTracker`.

    CoTracker3's architecture is not published in a maintained package on PyPI: it comes from its
    repository (``pip install`` of a local clone, importable as ``cotracker``). This adapter uses
    that package when it is installed (``cotracker.predictor.CoTrackerPredictor``, offline) and
    otherwise raises ``ImportError`` saying so; it cannot be exercised here (no package, no weights
    offline). Visibility is ``sigmoid-visibility × confidence > 0.6`` as in CoTracker3's own
    predictor; confidence is the model's confidence output.

    Args:
        checkpoint: local ``scaled_offline.pth`` (or another CoTracker3 offline checkpoint).
        iters: refinement iterations (SHIFT App. C: 4).
        device: where the tracker runs.

    Raises:
        FileNotFoundError: naming a missing checkpoint. ImportError: when ``cotracker`` is not installed.
    """

    def __init__(self, checkpoint: str, iters: int = 4, device: str = "cpu"):
        import os

        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"CoTracker3 checkpoint {checkpoint!r} does not exist (download scaled_offline.pth once and give its local path)")
        try:
            from cotracker.predictor import CoTrackerPredictor
        except ImportError as err:
            raise ImportError(
                "CoTracker3Tracker needs the 'cotracker' package (CoTracker3's own repository, installed from a local clone); "
                "it is not on PyPI. Use LucasKanadeTracker (default) otherwise."
            ) from err
        self.predictor = CoTrackerPredictor(checkpoint=checkpoint, offline=True).to(device).eval()
        self.iters, self.device = iters, device

    @torch.no_grad()
    def track(self, frames, queries):
        import numpy as np

        video = torch.from_numpy(frames).float()[None, :, None].expand(-1, -1, 3, -1, -1).to(self.device)  # (1, T, 3, H, W) 0..255
        h, w = video.shape[-2:]
        rh, rw = self.predictor.interp_shape
        video = F.interpolate(video[0], size=(rh, rw), mode="bilinear", align_corners=True)[None]
        q = torch.from_numpy(queries).float().to(self.device)
        q = torch.cat([torch.zeros(q.shape[0], 1, device=self.device), q[:, :1] * (rw - 1) / max(w - 1, 1), q[:, 1:] * (rh - 1) / max(h - 1, 1)], 1)[None]
        tracks, vis, conf, *_ = self.predictor.model(video, q, iters=self.iters)
        tracks = tracks[0].permute(1, 0, 2).cpu().numpy()  # (N, T, 2)
        tracks[..., 0] *= (w - 1) / max(rw - 1, 1)
        tracks[..., 1] *= (h - 1) / max(rh - 1, 1)
        conf = conf[0].permute(1, 0).cpu().numpy()
        visible = ((vis[0].cpu().numpy().T * conf) > 0.6).astype(np.float32)
        return tracks.astype(np.float32), visible, conf.astype(np.float32)
