"""Optical-flow estimators behind one interface, and the transport residual (SHIFT Eq. 6)."""
from __future__ import annotations

import abc
import logging
import math

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


def _load_state(path: str, what: str) -> dict:
    """A state dict from a local file (plain, ``{"state_dict": ...}`` or ``{"model": ...}``).

    Raises:
        FileNotFoundError: naming ``path``.
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: checkpoint {path!r} does not exist (weights are never downloaded; give a local file)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("model.").removeprefix("module."): v for k, v in state.items()}


class LearnedFlow(FlowEstimator):
    """Shared resizing for learned flow networks that need inputs of at least ``min_size`` pixels
    and sides divisible by 8 (RAFT-family correlation pyramids).

    Frames are resized (bilinear) to the smallest size ``>= min_size`` per side with sides divisible by
    8 and the aspect kept as far as that allows; the flow is resized back and its ``(u, v)`` scaled by
    the size ratio (our choice; SEA-RAFT and RAFT cannot run below 128 px).

    Args:
        min_size: smallest side fed to the network.
        batch_size: frame pairs per network call.
        device: where the network runs (None: the frames' device).
    """

    def __init__(self, min_size: int = 128, batch_size: int = 16, device: str | None = None):
        self.min_size, self.batch_size, self.device = min_size, batch_size, device
        self.model: torch.nn.Module

    def _size(self, h: int, w: int) -> tuple[int, int]:
        scale = max(1.0, self.min_size / min(h, w))
        return int(math.ceil(h * scale / 8) * 8), int(math.ceil(w * scale / 8) * 8)

    def network(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor | None]:
        """RGB ``(N, 3, h, w)`` in ``[0, 1]`` at network size -> ``flow (N, 2, h, w)``, confidence or None."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, frames_a: Tensor, frames_b: Tensor) -> tuple[Tensor, Tensor]:
        if frames_a.shape != frames_b.shape or frames_a.ndim != 4 or frames_a.shape[1] not in (1, 3):
            raise ValueError(f"{type(self).__name__} expects two (B, 1|3, H, W) tensors, got {tuple(frames_a.shape)} and {tuple(frames_b.shape)}")
        h, w = frames_a.shape[-2:]
        nh, nw = self._size(h, w)
        device = torch.device(self.device) if self.device else frames_a.device
        self.model.to(device).eval()

        def prep(x: Tensor) -> Tensor:
            x = x.float().to(device)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            return F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False) if (nh, nw) != (h, w) else x

        flows, confs = [], []
        for i in range(0, frames_a.shape[0], self.batch_size):
            a, b = prep(frames_a[i : i + self.batch_size]), prep(frames_b[i : i + self.batch_size])
            flow, conf = self.network(a, b)
            if conf is None:  # forward–backward consistency, as DIS
                back, _ = self.network(b, a)
                conf = torch.from_numpy(np.stack([forward_backward_confidence(f.permute(1, 2, 0).cpu().numpy(), r.permute(1, 2, 0).cpu().numpy()) for f, r in zip(flow, back)]))[:, None].to(flow)
            flows.append(flow)
            confs.append(conf)
        flow, conf = torch.cat(flows), torch.cat(confs)
        if (nh, nw) != (h, w):
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * flow.new_tensor([w / nw, h / nh]).view(1, 2, 1, 1)
            conf = F.interpolate(conf, size=(h, w), mode="bilinear", align_corners=False)
        return flow.to(frames_a.device), conf.clamp(0, 1).to(frames_a.device)


class SEARAFTFlow(LearnedFlow):
    """SEA-RAFT (Wang, Lipson, Deng 2024) through ``ptlflow``, from a local checkpoint.

    Confidence is SEA-RAFT's own uncertainty: its flow head predicts a two-component Laplace mixture
    per pixel (mixture logits, log-scales ``log b``; the scales are in pixels, as in its loss); we take
    the expected absolute error ``E = Σ_k π_k b_k`` of the final iteration and report
    ``exp(-E / tau)`` (1 = certain; ``tau`` in pixels, our choice), upsampled from 1/8 resolution.

    Args:
        checkpoint: a ptlflow SEA-RAFT checkpoint file (e.g. ``sea_raft_s-things-*.ckpt``), or None
            for random initialisation (tests only: the flow is then meaningless; a warning is logged).
        variant: ``"s" | "m" | "l"`` (ptlflow ``sea_raft_s`` / ``_m`` / ``_l``).
        iters: refinement iterations (ptlflow default 4).
        tau: confidence scale in pixels.
        **kwargs: :class:`LearnedFlow` arguments.

    Raises:
        ImportError: when ``ptlflow`` is not installed. FileNotFoundError: naming a missing checkpoint.
    """

    def __init__(self, checkpoint: str | None = None, variant: str = "s", iters: int = 4, tau: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        try:
            from ptlflow.models.sea_raft.sea_raft import SEARAFT_L, SEARAFT_M, SEARAFT_S
        except ImportError as err:
            raise ImportError("SEARAFTFlow needs ptlflow: pip install --no-deps ptlflow==0.4.2 && pip install 'lightning-vidalign[flow]'") from err
        classes = {"s": SEARAFT_S, "m": SEARAFT_M, "l": SEARAFT_L}
        if variant not in classes:
            raise ValueError(f"SEARAFTFlow: variant must be one of {sorted(classes)}, got {variant!r}")
        cls = classes[variant]
        import inspect

        dims = inspect.signature(cls.__init__).parameters["block_dims"].default
        self.model = cls(iters=iters, block_dims=list(dims))  # ptlflow 0.4.2 mutates block_dims in place: give a list
        if checkpoint is None:
            logging.getLogger(__name__).warning("SEARAFTFlow: no checkpoint, random initialisation (the flow is meaningless)")
        else:
            self.model.load_state_dict(_load_state(checkpoint, "SEARAFTFlow"))
        self.tau = tau
        self._info: list[Tensor] = []
        self.model.flow_head.register_forward_hook(lambda module, args, out: self._info.append(out[:, 2:].detach()))

    def network(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        self._info.clear()
        out = self.model({"images": torch.stack([a, b], 1)})
        flow = out["flows"][:, 0]
        info = self._info[-1]  # final iteration: [mixture logits (2), raw log b (2)] at 1/8 resolution
        log_b = torch.stack([info[:, 2].clamp(0, self.model.var_max), info[:, 3].clamp(self.model.var_min, 0)], 1)
        expected = (info[:, :2].softmax(1) * log_b.exp()).sum(1, keepdim=True)
        conf = torch.exp(-expected / self.tau)
        return flow, F.interpolate(conf, size=flow.shape[-2:], mode="bilinear", align_corners=False)


class TorchvisionRAFTFlow(LearnedFlow):
    """torchvision RAFT (Teed & Deng 2020) from local weights; confidence from forward–backward consistency.

    Args:
        weights: a local ``state_dict`` file of ``raft_small``/``raft_large`` (torchvision's own
            weight files work), or None for random initialisation (tests only; a warning is logged).
        variant: ``"small" | "large"``.
        num_flow_updates: refinement iterations (torchvision default 12).
        **kwargs: :class:`LearnedFlow` arguments.

    Raises:
        FileNotFoundError: naming a missing weights file.
    """

    def __init__(self, weights: str | None = None, variant: str = "small", num_flow_updates: int = 12, **kwargs):
        super().__init__(**kwargs)
        from torchvision.models.optical_flow import raft_large, raft_small

        if variant not in ("small", "large"):
            raise ValueError(f"TorchvisionRAFTFlow: variant must be 'small' or 'large', got {variant!r}")
        self.model = (raft_small if variant == "small" else raft_large)(weights=None)
        if weights is None:
            logging.getLogger(__name__).warning("TorchvisionRAFTFlow: no weights, random initialisation (the flow is meaningless)")
        else:
            self.model.load_state_dict(_load_state(weights, "TorchvisionRAFTFlow"))
        self.num_flow_updates = num_flow_updates

    def network(self, a: Tensor, b: Tensor) -> tuple[Tensor, None]:
        return self.model(2 * a - 1, 2 * b - 1, num_flow_updates=self.num_flow_updates)[-1], None
