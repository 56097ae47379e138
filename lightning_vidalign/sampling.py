"""Sampling steps and the rollout record (pure functions, fp32 inside).

EDM / variance-exploding convention (SVD): the noisy latent is ``x = x0 + sigma * eps`` and the
network gives the denoised estimate ``D(x, sigma)``. Steps follow Karras et al. 2022 (EDM, Alg. 1,
Euler) and k-diffusion's Euler-ancestral step, which is what diffusers'
``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` compute for SVD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

EDM_SAMPLERS = ("euler", "euler_ancestral")


def edm_preconditioning(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning for v-prediction with ``sigma_data = 1`` (SVD).

    Args:
        sigma: noise levels, any shape, ``> 0``.

    Returns:
        ``(c_skip, c_out, c_in, c_noise)`` with ``c_skip = 1/(s²+1)``, ``c_out = -s/sqrt(s²+1)``,
        ``c_in = 1/sqrt(s²+1)``, ``c_noise = 0.25·ln s`` (same shape as ``sigma``).
        Source: Karras et al. 2022, Table 1, and diffusers' ``EulerDiscreteScheduler``
        (``prediction_type="v_prediction"``, ``timestep_type="continuous"``).
    """
    s2 = sigma * sigma
    c_skip = 1.0 / (s2 + 1.0)
    c_out = -sigma / torch.sqrt(s2 + 1.0)
    c_in = 1.0 / torch.sqrt(s2 + 1.0)
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def euler_step(sample: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Deterministic Euler step of the probability-flow ODE (EDM Alg. 1 without the 2nd order).

    ``x' = x + (sigma_next - sigma) · (x - D) / sigma``.

    Args:
        sample: ``x`` at level ``sigma``, any shape.
        denoised: ``D(x, sigma)``, same shape.
        sigma: current noise level (``> 0``).
        sigma_next: next noise level (``0 <= sigma_next < sigma``).

    Returns:
        The sample at ``sigma_next`` (same shape and dtype as ``sample``).
    """
    x = sample.float()
    d = (x - denoised.float()) / sigma
    return (x + (sigma_next - sigma) * d).to(sample.dtype)


def euler_ancestral_step(
    sample: Tensor,
    denoised: Tensor,
    sigma: float,
    sigma_next: float,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Stochastic Euler-ancestral step (k-diffusion ``sample_euler_ancestral``).

    ``sigma_up = min(sigma_next, eta·sqrt(sigma_next²(sigma²-sigma_next²)/sigma²))``,
    ``sigma_down = sqrt(sigma_next² - sigma_up²)``;
    ``x' = x + (sigma_down - sigma)·(x - D)/sigma + sigma_up·z``, ``z ~ N(0, I)``.
    With ``eta = 0`` this is exactly :func:`euler_step`.

    Args:
        sample, denoised: as in :func:`euler_step`.
        sigma, sigma_next: noise levels, ``0 <= sigma_next < sigma``.
        eta: ancestral noise scale in ``[0, 1]`` (1 = the diffusers/SVD sampler).
        generator: RNG for ``z`` (ignored when ``noise`` is given).
        noise: optional pre-drawn ``z`` (same shape as ``sample``).

    Returns:
        The sample at ``sigma_next``.
    """
    x = sample.float()
    if sigma_next == 0.0 or eta == 0.0:
        return euler_step(sample, denoised, sigma, sigma_next)
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    d = (x - denoised.float()) / sigma
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (x + (sigma_down - sigma) * d + sigma_up * noise.float()).to(sample.dtype)


@dataclass
class Trajectory:
    """One batch of rollouts.

    Attributes:
        latents: final ``x0`` latents ``(B, T, C, h, w)``.
        video: decoded video ``(B, T, 3, H, W)`` in ``[0, 1]`` (None if not decoded).
        x_t: per-step inputs ``(B, S, T, C, h, w)`` when kept, else None.
        x_next: per-step outputs, same shape as ``x_t``, when kept.
        sigmas: the ``S + 1`` noise levels of the schedule (1-D, last is 0).
        log_prob: per-step log-probabilities ``(B, S)`` when the sampler defines them, else None.
    """

    latents: Tensor
    video: Tensor | None = None
    x_t: Tensor | None = None
    x_next: Tensor | None = None
    sigmas: Tensor | None = None
    log_prob: Tensor | None = None
    extras: dict = field(default_factory=dict)
