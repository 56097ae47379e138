"""Optical-flow estimators behind one interface, and the transport residual (SHIFT Eq. 6)."""
from __future__ import annotations

import abc

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class FlowEstimator(abc.ABC):
    """``(frames_a, frames_b) -> (flow, confidence)``.

    Inputs are grayscale ``(B, 1, H, W)`` in ``[0, 1]``; ``flow (B, 2, H, W)`` is ``(u, v)`` in pixels
    such that ``frames_b(x + flow(x)) ≈ frames_a(x)``; ``confidence (B, 1, H, W)`` in ``[0, 1]``.
    """

    @abc.abstractmethod
    def __call__(self, frames_a: Tensor, frames_b: Tensor) -> tuple[Tensor, Tensor]: ...


def forward_backward_confidence(flow_fw: np.ndarray, flow_bw: np.ndarray) -> np.ndarray:
    """Soft forward–backward consistency ``exp(-|w + ŵ|² / (0.01(|w|² + |ŵ|²) + 0.5))``.

    ``ŵ`` is the backward flow sampled at ``x + w``. The denominator is the consistency bound of
    Sundaram et al. 2010 (ECCV, Eq. 5); the soft exponential is our choice (1 where consistent,
    ``< e^-1`` beyond the bound).

    Args:
        flow_fw, flow_bw: ``(H, W, 2)`` float32 flows a→b and b→a in pixels.

    Returns:
        ``(H, W)`` float32 in ``(0, 1]``.
    """
    import cv2

    h, w = flow_fw.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    bw = cv2.remap(flow_bw, gx + flow_fw[..., 0], gy + flow_fw[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    err = ((flow_fw + bw) ** 2).sum(-1)
    bound = 0.01 * ((flow_fw**2).sum(-1) + (bw**2).sum(-1)) + 0.5
    return np.exp(-err / bound).astype(np.float32)


class DISFlow(FlowEstimator):
    """OpenCV DIS optical flow (Kroeger et al. 2016) with forward–backward confidence.

    Args:
        preset: ``"ultrafast" | "fast" | "medium"`` (OpenCV presets).
        confidence: compute the backward flow for the confidence map (else all ones).
    """

    PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}

    def __init__(self, preset: str = "medium", confidence: bool = True):
        if preset not in self.PRESETS:
            raise ValueError(f"DISFlow preset must be one of {sorted(self.PRESETS)}, got {preset!r}")
        self.preset = preset
        self.confidence = confidence
        self._dis = None

    def _get(self):
        import cv2

        if self._dis is None:
            self._dis = cv2.DISOpticalFlow_create(self.PRESETS[self.preset])
        return self._dis

    def __getstate__(self):  # cv2 objects do not pickle (DataLoader workers, checkpoints)
        return {"preset": self.preset, "confidence": self.confidence, "_dis": None}

    @torch.no_grad()
    def __call__(self, frames_a: Tensor, frames_b: Tensor) -> tuple[Tensor, Tensor]:
        if frames_a.shape != frames_b.shape or frames_a.ndim != 4 or frames_a.shape[1] != 1:
            raise ValueError(f"DISFlow expects two (B, 1, H, W) tensors, got {tuple(frames_a.shape)} and {tuple(frames_b.shape)}")
        dis = self._get()
        a8 = (frames_a[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        b8 = (frames_b[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        flows, confs = [], []
        for a, b in zip(a8, b8):
            fw = dis.calc(a, b, None)
            if self.confidence:
                bw = dis.calc(b, a, None)
                confs.append(forward_backward_confidence(fw, bw))
            else:
                confs.append(np.ones(fw.shape[:2], np.float32))
            flows.append(fw)
        flow = torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).to(frames_a.device)
        conf = torch.from_numpy(np.stack(confs))[:, None].to(frames_a.device)
        return flow, conf


def to_gray(video: Tensor) -> Tensor:
    """ITU-R BT.601 luma of ``(..., 3, H, W)`` RGB in ``[0, 1]`` -> ``(..., 1, H, W)``."""
    w = video.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (video * w).sum(-3, keepdim=True)


def video_flow(video: Tensor, estimator: FlowEstimator) -> tuple[Tensor, Tensor]:
    """Flow between adjacent frames of a video batch.

    Args:
        video: ``(B, T, 3, H, W)`` RGB or ``(B, T, 1, H, W)`` gray in ``[0, 1]``.
        estimator: a :class:`FlowEstimator`.

    Returns:
        ``flow (B, T-1, 2, H, W)`` in pixels, ``confidence (B, T-1, 1, H, W)``.
    """
    gray = to_gray(video) if video.shape[2] == 3 else video
    b, t = gray.shape[:2]
    a = gray[:, :-1].flatten(0, 1)
    n = gray[:, 1:].flatten(0, 1)
    flow, conf = estimator(a, n)
    return flow.unflatten(0, (b, t - 1)), conf.unflatten(0, (b, t - 1))


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def sobel_gradients(images: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel derivatives ``(I_x, I_y)`` per pixel (kernel / 8, replicate padding).

    Args:
        images: ``(N, 1, H, W)``.

    Returns:
        Two ``(N, 1, H, W)`` tensors: d/dx (columns) and d/dy (rows), intensity per pixel.
    """
    kx = _SOBEL_X.to(images)[None, None]
    ky = kx.transpose(-1, -2)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kx), F.conv2d(padded, ky)


def transport_residual(frames: Tensor, flow: Tensor) -> Tensor:
    """Advective transport residual ``R = I_t + u·I_x + v·I_y`` (SHIFT §4.1, Eq. 6).

    ``I_t = I_{t+1} - I_t``; the spatial gradients are the Sobel derivatives averaged over the two
    frames of the pair (a centred estimate, our choice); the divergence term of the continuity
    equation is omitted as in the paper. For brightness-constant motion with its true flow,
    ``R ≈ 0``.

    Args:
        frames: ``(B, T, 1, H, W)`` grayscale in ``[0, 1]``.
        flow: ``(B, T-1, 2, H, W)`` flow ``(u, v)`` in pixels between adjacent frames.

    Returns:
        ``(B, T-1, 1, H, W)`` residual (intensity units).

    Raises:
        ValueError: on mismatched shapes.
    """
    if frames.ndim != 5 or frames.shape[2] != 1:
        raise ValueError(f"transport_residual: frames must be (B, T, 1, H, W), got {tuple(frames.shape)}")
    b, t, _, h, w = frames.shape
    if flow.shape != (b, t - 1, 2, h, w):
        raise ValueError(f"transport_residual: flow must be {(b, t - 1, 2, h, w)}, got {tuple(flow.shape)}")
    gx, gy = sobel_gradients(frames.flatten(0, 1).float())
    gx, gy = gx.unflatten(0, (b, t)), gy.unflatten(0, (b, t))
    ix = 0.5 * (gx[:, 1:] + gx[:, :-1])
    iy = 0.5 * (gy[:, 1:] + gy[:, :-1])
    it = frames[:, 1:].float() - frames[:, :-1].float()
    return it + flow[:, :, 0:1].float() * ix + flow[:, :, 1:2].float() * iy
