"""The ``VideoBackbone`` contract: the policy that every algorithm owns (DESIGN §2)."""
from __future__ import annotations

import abc
import contextlib
import os
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lightning_vidalign.sampling import Trajectory


class VideoBackbone(nn.Module, abc.ABC):
    """A diffusers denoiser + VAE + condition encoders with LoRA adapters.

    Video tensors at the pixel level are ``(B, T, C, H, W)`` float in ``[0, 1]``; latents are
    ``(B, T, C_lat, h, w)``. Only the adapter parameters are trainable; the frozen base with the
    adapters disabled is the reference policy.
    """

    #: keys of the condition dict produced by :meth:`encode_condition`
    condition_keys: tuple[str, ...] = ()

    @abc.abstractmethod
    def encode(self, video: Tensor) -> Tensor:
        """Pixel video ``(B, T, 3, H, W)`` in ``[0, 1]`` -> latents ``(B, T, C, h, w)``."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, T, C, h, w)`` -> pixel video ``(B, T, 3, H, W)`` in ``[0, 1]``."""

    @abc.abstractmethod
    def encode_condition(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Condition tensors (batch-first) from a data batch."""

    @abc.abstractmethod
    def training_loss(self, x0: Tensor, cond: dict[str, Tensor], sigma: Tensor, noise: Tensor) -> Tensor:
        """The model's native denoising loss per sample, shape ``(B,)``."""

    @abc.abstractmethod
    def sample_sigma(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Training noise levels, shape ``(B,)``."""

    @abc.abstractmethod
    def rollout(
        self,
        cond: dict[str, Tensor],
        sampler: str,
        num_steps: int,
        guidance: float | tuple[float, float],
        generator: torch.Generator | None,
        keep_trajectory: bool = False,
    ) -> Trajectory:
        """Sample videos from the current policy."""

    # ------------------------------------------------------------- sharding
    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained network (UNet / DiT) that FSDP2 shards."""
        raise NotImplementedError

    def fsdp_modules(self) -> list[torch.nn.Module]:
        """The denoiser's blocks that FSDP2 wraps one by one (each is gathered only for its forward)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- adapters
    def adapter_modules(self) -> Iterator[nn.Module]:
        """The peft LoRA layers of this backbone."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.modules():
            if isinstance(module, BaseTunerLayer):
                yield module

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Context in which the LoRA adapters are bypassed: the reference policy, no weight copy."""
        layers = list(self.adapter_modules())
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield self
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (the adapters)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """State of the trainable parameters only (keys as in ``self.state_dict()``)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}


def require_files(root: str, relative_paths: list[str], what: str) -> None:
    """Raise ``FileNotFoundError`` naming every missing file of a local checkpoint.

    Args:
        root: local directory of the checkpoint.
        relative_paths: files that must exist under ``root``.
        what: a human name for the checkpoint (for the message).

    Raises:
        FileNotFoundError: if ``root`` or any listed file is missing (nothing is downloaded).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what}: local directory {root!r} does not exist (nothing is downloaded at run time)")
    missing = [os.path.join(root, p) for p in relative_paths if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise FileNotFoundError(f"{what}: missing file(s) in {root!r}: " + ", ".join(missing))
