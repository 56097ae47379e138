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


# ============================================================================ flow matching (Wan)
#
# Convention (DESIGN §2): x_s = (1 - s)·x0 + s·noise, s = 1 is pure noise, s' < s is the next level,
# Δ = s - s' > 0, velocity v = noise - x0, x̂0 = x - s·v.

SDE_TYPES = ("ode", "flow_grpo", "dance_grpo", "cps", "sage")

#: SAGE's clamp of the noise level at the pure-noise boundary, ``1 - s >= 3e-3`` (SAGE-GRPO App. A.2)
SAGE_BOUNDARY = 3e-3


def _as_level(value: float | Tensor, like: Tensor) -> Tensor:
    """A noise level as a float64-free fp32 tensor broadcastable to ``like`` (scalar or per sample)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"noise level must be a scalar or shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1)))


def sage_variance(sigma: float | Tensor, sigma_next: float | Tensor, eta: float) -> Tensor:
    """Integrated SDE variance over one step, SAGE-GRPO Eq. 5 / App. A.1 (Eq. 17–21).

    ``Σ = ∫_{s'}^{s_c} ε_u² du = η²·(-(s_c - s') + log((1 - s')/(1 - s_c)))`` with the diffusion
    coefficient ``ε_u = η·sqrt(u/(1-u))`` and ``s_c = min(s, 1 - 3e-3)`` (the SAGE code's clamp at
    pure noise, App. A.2 regime (b); for ``s <= 1 - 3e-3`` this is exactly the paper's Eq. 5). The
    integral over the clamped interval is used in both terms, so it stays the exact integral; it is
    floored at 0 (an interval entirely above the clamp has no variance).

    Args:
        sigma: current level ``s`` in ``(0, 1]`` (float or tensor).
        sigma_next: next level ``s'`` in ``[0, s)``.
        eta: exploration scale ``η >= 0``.

    Returns:
        ``Σ`` (tensor, shape of the broadcast inputs), in latent units squared.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    sn = torch.as_tensor(sigma_next, dtype=torch.float64)
    sc = torch.clamp(s, max=1.0 - SAGE_BOUNDARY)
    sn_c = torch.minimum(sn, sc)
    var = eta**2 * (-(sc - sn_c) + torch.log((1.0 - sn_c) / (1.0 - sc)))
    return torch.clamp(var, min=0.0).to(torch.float32)


def flow_grpo_noise_scale(sigma: Tensor, eta: float, sigma_max: float | Tensor | None, sigma_next: Tensor) -> Tensor:
    """Flow-GRPO's diffusion coefficient ``σ_t = η·sqrt(s/(1 - s))`` (Liu et al. 2025, flow_grpo code).

    At the pure-noise boundary ``s == 1`` the denominator uses ``1 - sigma_max`` instead of 0, as
    flow_grpo does with ``sigma_max = sigmas[1]``; when ``sigma_max`` is None the step's own
    ``sigma_next`` is used, which is ``sigmas[1]`` for the first step of a schedule starting at 1.
    """
    boundary = sigma_next if sigma_max is None else torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device)
    denom = 1.0 - torch.where(sigma >= 1.0, boundary, sigma)
    return eta * torch.sqrt(sigma / denom)


def sde_step_parameters(sigma: Tensor, sigma_next: Tensor, sde_type: str, eta: float, sigma_max=None) -> dict[str, Tensor]:
    """Per-step coefficients of the Gaussian transition ``N(a·x + b·v, std²)``.

    Every SDE type of :func:`sde_step_with_logprob` has a mean that is linear in ``(x, v)``:
    ``mean = a·x + b·v``. Returned as ``{"a", "b", "std", "var"}`` (tensors broadcastable like the
    inputs). Used by the step itself and by the gradient-norm proxy (``|b|/std``).

    Raises:
        ValueError: on an unknown ``sde_type``.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    s, sn = sigma, sigma_next
    delta = s - sn
    zero = torch.zeros_like(delta)
    if sde_type == "ode":
        # no shortcut for eta = 0: each type's own formula must reduce to this step (tested)
        return {"a": torch.ones_like(delta), "b": -delta, "std": zero, "var": zero}
    if sde_type in ("flow_grpo", "dance_grpo", "sage"):
        if sde_type == "flow_grpo":
            var = flow_grpo_noise_scale(s, eta, sigma_max, sn) ** 2 * delta
        elif sde_type == "dance_grpo":
            var = eta**2 * delta
        else:
            var = sage_variance(s, sn, eta).to(s.device)
        # mean = x - Δ·v + (var/2)·score,  score = -(x + (1 - s)·v)/s
        a = 1.0 - var / (2.0 * s)
        b = -delta - var * (1.0 - s) / (2.0 * s)
        return {"a": a, "b": b, "std": torch.sqrt(var), "var": var}
    # cps (Wang & Yu 2025): mean = (1 - s')·x̂0 + sqrt(s'² - std²)·x̂1, x̂0 = x - s·v, x̂1 = x + (1 - s)·v
    std = sn * math.sin(eta * math.pi / 2)
    c = torch.sqrt(torch.clamp(sn * sn - std * std, min=0.0))
    a = (1.0 - sn) + c
    b = -(1.0 - sn) * s + c * (1.0 - s)
    return {"a": a, "b": b, "std": std, "var": std * std}


def gaussian_log_density(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Element-wise log-density of ``x`` under ``N(mean, std²)`` (all constants kept), fp32, the shape
    of ``x``. :func:`gaussian_log_prob` is its mean over the non-batch elements."""
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    return -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of ``x`` under ``N(mean, std²)`` (all constants kept), averaged over all
    non-batch elements (flow_grpo's convention), shape ``(B,)``."""
    return _mean_over_elements(gaussian_log_density(x, mean, std))


def _mean_over_elements(values: Tensor) -> Tensor:
    """Mean over all non-batch elements, shape ``(B,)`` (a ``(B,)`` input is returned as is)."""
    return values.flatten(1).mean(1) if values.dim() > 1 else values


#: forms of the per-step log-probability: ``reference`` (the public reference code of each SDE type)
#: or ``gaussian`` (the true Gaussian log-density for every type)
LOG_PROB_FORMS = ("reference", "gaussian")


def step_log_density(x: Tensor, mean: Tensor, std: Tensor, sde_type: str, log_prob_form: str = "reference") -> Tensor:
    """Element-wise log-probability of a transition ``x ~ N(mean, std²)``, fp32, the shape of ``x``.

    ``log_prob_form="reference"`` (default): what the public code of the SDE type computes —
    for ``cps`` flow_grpo's ``-(x - mean)²`` (``sd3_sde_with_logprob.py``, "remove all constants":
    it drops the ``1/(2·std²)`` factor too, so every CPS log-ratio is the Gaussian one times
    ``2·std²``, ×0.59 … ×927 per step on an 8-step shift-5 schedule, and flow_grpo's clip ranges
    are tuned for that scale); for every other type the full Gaussian log-density (flow_grpo
    ``sde``, SAGE-GRPO). ``"gaussian"``: the full Gaussian log-density for every type, ``cps``
    included (the paper's likelihood; ratios then differ from flow_grpo's by that per-step factor).

    Raises:
        ValueError: on an unknown ``log_prob_form``.
    """
    if log_prob_form not in LOG_PROB_FORMS:
        raise ValueError(f"log_prob_form must be one of {LOG_PROB_FORMS}, got {log_prob_form!r}")
    if sde_type == "cps" and log_prob_form == "reference":
        return -((x.float() - mean.float()) ** 2)
    return gaussian_log_density(x, mean, std)


def sde_step_with_logprob(
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sde_type: str = "flow_grpo",
    eta: float = 0.7,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
    sigma_max: float | None = None,
    log_prob_form: str = "reference",
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One reverse step of a flow-matching sampler, with its Gaussian log-probability (DESIGN §2).

    SDE types (all reduce to the Euler ODE step ``x - Δ·v`` when ``eta = 0``):

    - ``ode``: ``x - Δ·v``; std 0.
    - ``flow_grpo`` (Liu et al. 2025, Flow-GRPO Eq. 9): ``σ_t = η·sqrt(s/(1-s))``,
      ``mean = x·(1 - σ_t²Δ/(2s)) - v·Δ·(1 + σ_t²(1-s)/(2s))``, ``std = σ_t·sqrt(Δ)``; boundary at
      ``s = 1``: see :func:`flow_grpo_noise_scale`.
    - ``dance_grpo`` (Xue et al. 2025): the same mean with constant ``σ_t = η``; ``std = η·sqrt(Δ)``.
    - ``cps`` (Wang & Yu 2025, coefficient-preserving): ``std = s'·sin(ηπ/2)``,
      ``mean = (1-s')·x̂0 + sqrt(s'² - std²)·x̂1`` with ``x̂0 = x - s·v``, ``x̂1 = x + (1-s)·v``.
    - ``sage`` (SAGE-GRPO Eq. 5–7): ``Σ`` from :func:`sage_variance`, ``std = sqrt(Σ)`` (no extra
      ``sqrt(Δ)``), ``mean = x - Δ·v + (Σ/2)·score`` with ``score = -(x + (1-s)·v)/s`` (the SAGE
      code's rectified-flow score; the paper prints ``-(x - x̂0)/s²``, which drops ``(1 - s)``).

    Args:
        velocity: model velocity ``v`` (same shape as ``sample``), batch-first.
        sample: ``x`` at level ``sigma``, ``(B, ...)``.
        sigma: current level ``s`` in ``(0, 1]``, float or ``(B,)``.
        sigma_next: next level ``s'`` in ``[0, s)``, float or ``(B,)``.
        sde_type: one of ``ode | flow_grpo | dance_grpo | cps | sage``.
        eta: noise scale ``η >= 0`` (flow_grpo ``noise_level``).
        generator: CPU RNG for the drawn noise (drawn on CPU in fp32, then moved: device-independent).
        prev_sample: if given, it is scored, not drawn.
        sigma_max: flow_grpo boundary value (see :func:`flow_grpo_noise_scale`).
        log_prob_form: ``"reference"`` (default; for ``cps`` flow_grpo's ``-(x - mean)²`` without
            the ``1/(2·std²)`` factor) or ``"gaussian"``: see :func:`step_log_density`.

    Returns:
        ``(prev_sample, mean, std, log_prob)``: ``prev_sample`` and ``mean`` shaped like ``sample``
        (fp32), ``std`` broadcastable to it, ``log_prob (B,)``: :func:`step_log_density` averaged
        over the non-batch elements, or None when ``std == 0`` (ODE or ``eta = 0``), where no
        density exists.

    Raises:
        ValueError: on an unknown ``sde_type``, shape mismatch or ``sigma_next >= sigma``.
    """
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} must have the same shape")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} must have the shape of sample {tuple(sample.shape)}")
    x, v = sample.float(), velocity.float()
    s, sn = _as_level(sigma, x), _as_level(sigma_next, x)
    if bool((sn >= s).any()):
        raise ValueError(f"sigma_next must be < sigma, got sigma={sigma}, sigma_next={sigma_next}")
    p = sde_step_parameters(s, sn, sde_type, eta, sigma_max)
    mean = p["a"] * x + p["b"] * v
    std = p["std"]
    if bool((torch.as_tensor(std) == 0).all()):
        return mean if prev_sample is None else prev_sample.float(), mean, std, None
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    return prev_sample, mean, std, _mean_over_elements(step_log_density(prev_sample, mean, std, sde_type, log_prob_form))


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: float | Tensor) -> Tensor:
    """KL between two Gaussian transitions with equal covariance ``std²·I``:
    ``||μ_θ - μ_ref||² / (2·std²)``, averaged over the non-batch elements, shape ``(B,)``.

    ``std`` is a scalar or broadcastable to ``mean`` (e.g. ``(B, 1, ...)`` per sample). Which
    ``std`` a run divides by is :func:`kl_std` (the reference codes differ per SDE type).
    Source: SAGE-GRPO Eq. 11/13, Flow-GRPO's per-step KL.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * std**2)
    return kl.flatten(1).mean(1)


#: forms of the per-step KL normaliser: ``reference`` (the public code of the SDE type) or ``exact``
KL_FORMS = ("reference", "exact")


def kl_std(sigma: Tensor, sigma_next: Tensor, sde_type: str, eta: float, kl_form: str = "reference", sigma_max=None) -> Tensor:
    """The ``std`` that the per-step KL ``||μ_θ - μ_ref||²/(2·std²)`` divides by.

    ``kl_form="exact"``: the step's own transition std (the true KL of the two Gaussians).
    ``kl_form="reference"`` (default): what the reference code divides by — for ``flow_grpo``
    the diffusion coefficient ``σ_t = η·sqrt(s/(1-s))`` *without* ``sqrt(Δ)`` (flow_grpo
    ``scripts/train_sd3.py``: ``/ (2 * std_dev_t ** 2)`` with the ``std_dev_t`` that
    ``sde_step_with_logprob`` returns; SAGE-GRPO's ``flow_grpo`` branch does the same), i.e. the
    exact KL times ``Δ``, so a β from flow_grpo's configs transfers; for ``dance_grpo``, ``sage``
    and ``cps`` the full step std (SAGE-GRPO ``grpo_utils.py``; flow_grpo's ``cps`` returns the
    full std), the same as ``exact``.

    Args:
        sigma, sigma_next: levels ``s``, ``s'`` (tensors, scalar or ``(B,)``).
        sde_type, eta, sigma_max: as in :func:`sde_step_with_logprob`.
        kl_form: ``"reference"`` or ``"exact"``.

    Returns:
        The std, shaped like the broadcast levels.

    Raises:
        ValueError: on an unknown ``kl_form``.
    """
    if kl_form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {KL_FORMS}, got {kl_form!r}")
    if sde_type == "flow_grpo" and kl_form == "reference":
        return flow_grpo_noise_scale(sigma, eta, sigma_max, sigma_next)
    return torch.as_tensor(sde_step_parameters(sigma, sigma_next, sde_type, eta, sigma_max)["std"])


def gradient_norm_proxy(sigma: float | Tensor, sigma_next: float | Tensor, sde_type: str, eta: float, sigma_max=None) -> Tensor:
    """Per-step policy-gradient scale proxy ``N_t = |∂mean/∂v| / std`` (SAGE-GRPO Eq. 38, App. A.5).

    For ``sage`` this is ``(Δ + 0.5·Σ·(1-s)/s) / sqrt(Σ)`` (the SAGE code). ``∂log π/∂μ`` has norm
    ``∝ 1/std`` (Eq. 37) and ``μ`` depends on the network through ``v`` with sensitivity ``|b|``.

    Args:
        sigma, sigma_next: levels (floats or 1-D tensors of equal length, one entry per step).
        sde_type, eta, sigma_max: as in :func:`sde_step_with_logprob` (stochastic types only).

    Returns:
        ``N_t`` (tensor shaped like the broadcast levels).

    Raises:
        ValueError: for a deterministic step (``std = 0``), where no policy gradient exists.
    """
    s = torch.as_tensor(sigma, dtype=torch.float32)
    sn = torch.as_tensor(sigma_next, dtype=torch.float32)
    p = sde_step_parameters(s, sn, sde_type, eta, sigma_max)
    std = torch.as_tensor(p["std"])
    if bool((std <= 0).any()):
        raise ValueError(f"gradient_norm_proxy: a step has std 0 (sde_type={sde_type!r}, eta={eta}); no policy gradient")
    return p["b"].abs() / std


def equalizer_scales(proxies: Tensor, eps: float = 1e-8) -> Tensor:
    """Gradient-norm equalizer ``S_t = median_τ(N_τ) / (N_t + ε)`` (SAGE-GRPO Eq. 9 / Eq. 39).

    Args:
        proxies: ``N_t`` for the ``T`` steps of the schedule, shape ``(T,)``, positive.
        eps: the small constant ``ε``.

    Returns:
        ``S_t``, shape ``(T,)``. ``torch.median`` takes the lower middle value for even ``T``.
    """
    proxies = torch.as_tensor(proxies, dtype=torch.float32)
    return torch.median(proxies) / (proxies + eps)


def flow_schedule(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """``(sigmas (S+1,), timesteps (S,))`` of diffusers' ``FlowMatchEulerDiscreteScheduler`` with
    ``shift`` (Wan's ``flow_shift``), from 1 down to 0: ``s' = shift·s/(1 + (shift-1)·s)`` over the
    scheduler's linear grid; timesteps are ``num_train_timesteps·s``.

    Taken from the scheduler itself, so our rollouts use exactly the pipeline's schedule.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    sched.set_timesteps(num_steps)
    return sched.sigmas.float().clone(), sched.timesteps.float().clone()


#: MixGRPO's window strategies (Tencent-Hunyuan/MixGRPO ``fastvideo/utils/grpo_states.py``)
WINDOW_STRATEGIES = ("progressive", "random")


def mix_grpo_window(iteration: int, num_steps: int, window_size: int = 4, shift_interval: int = 25, stride: int = 1,
                    strategy: str = "progressive", generator: torch.Generator | None = None) -> list[int]:
    """The denoising steps taken with the SDE (and trained) at a MixGRPO iteration; every other step is ODE.

    Reference (Tencent-Hunyuan/MixGRPO ``GRPOTrainingStates``, ``--roll_back``): the window
    ``[c, min(c + w, M))`` with ``M = num_steps - 2`` (the last two steps never stochastic) starts at
    ``c = 0`` and moves by ``stride`` every ``shift_interval`` iterations, rolling back to 0 past the end:
    ``c = (⌊iteration / shift_interval⌋ mod P)·stride``. Ours rolls back at ``c ≥ M`` (``P = ⌈M/stride⌉``) where the
    reference rolls back at ``c > M``: its window at ``c = M`` is empty (it trains nothing that iteration and crashes
    its Flash path). ``strategy="random"``: ``c`` uniform in ``[0, M - w]`` each iteration (drawn from ``generator``).

    Args:
        iteration: 0-based training iteration (round).
        num_steps: denoising steps ``S >= 3``.
        window_size: ``w >= 1`` (reference: 4).
        shift_interval: iterations per window position ``τ >= 1`` (reference: 25).
        stride: steps the window moves per shift (``>= 1``; reference: 1).
        strategy: ``"progressive"`` | ``"random"``.
        generator: CPU RNG for ``random``.

    Returns:
        The window's step indices, ascending, non-empty.

    Raises:
        ValueError: on out-of-range arguments or an unknown strategy.
    """
    if strategy not in WINDOW_STRATEGIES:
        raise ValueError(f"mix_grpo_window: strategy must be one of {WINDOW_STRATEGIES}, got {strategy!r}")
    if num_steps < 3 or window_size < 1 or shift_interval < 1 or stride < 1 or iteration < 0:
        raise ValueError(f"mix_grpo_window: need num_steps >= 3, window_size, shift_interval, stride >= 1 and iteration >= 0, "
                         f"got {num_steps}, {window_size}, {shift_interval}, {stride}, {iteration}")
    last = num_steps - 2
    if strategy == "random":
        start = int(torch.randint(0, max(last - window_size, 0) + 1, (1,), generator=generator))
    else:
        positions = -(-last // stride)
        start = ((iteration // shift_interval) % positions) * stride
    return list(range(start, min(start + window_size, last)))


def dpm_solver_pp_step(sample: Tensor, x0: Tensor, sigma: float, sigma_next: float, prev_x0: Tensor | None = None,
                       prev_sigma: float | None = None) -> Tensor:
    """One deterministic DPM-Solver++ step on a flow-matching path ``x_s = (1-s)·x0 + s·ε`` (``α = 1 - s``,
    ``λ = log(α/s)``): 2nd-order multistep (``2M``, midpoint) with the previous step's data prediction, else (no
    history, or the last step to ``s' = 0``: ``lower_order_final``) 1st order.

    ``h = λ' - λ``; 1st order: ``x' = (s'/s)·x - α'·(e^{-h} - 1)·x̂0``; 2nd order with ``r = (λ - λ_prev)/h``,
    ``D1 = (x̂0 - x̂0_prev)/r``: ``x' = (s'/s)·x - α'·(e^{-h} - 1)·x̂0 - ½·α'·(e^{-h} - 1)·D1``
    (MixGRPO-Flash ``fastvideo/utils/sampling_utils.py`` ``dpm_step``; diffusers' ``DPMSolverMultistepScheduler`` with
    ``prediction_type="flow_prediction"``, ``algorithm_type="dpmsolver++"``, ``solver_order=2``, the oracle of its test).

    Args:
        sample: ``x`` at level ``sigma``.
        x0: the data prediction ``x̂0 = x - s·v`` at ``sigma``.
        sigma: ``s`` in ``(0, 1)`` (``s = 1`` has ``λ = -∞``: take an Euler step there).
        sigma_next: ``s'`` in ``[0, s)``.
        prev_x0, prev_sigma: the previous step's data prediction and level (2nd order), or None.

    Returns:
        ``x'`` (fp32), shaped like ``sample``.

    Raises:
        ValueError: on levels outside ``0 <= s' < s < 1``.
    """
    if not 0 <= sigma_next < sigma < 1:
        raise ValueError(f"dpm_solver_pp_step: need 0 <= sigma_next < sigma < 1, got {sigma}, {sigma_next}")
    x, d0 = sample.float(), x0.float()
    if sigma_next == 0:
        return d0  # e^{-h} = 0, α' = 1: the data prediction itself
    lam, lam_next = math.log((1 - sigma) / sigma), math.log((1 - sigma_next) / sigma_next)
    h = lam_next - lam
    alpha_next = 1 - sigma_next
    out = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d0
    if prev_x0 is not None and prev_sigma is not None and prev_sigma < 1:
        r = (lam - math.log((1 - prev_sigma) / prev_sigma)) / h
        out = out - 0.5 * alpha_next * math.expm1(-h) * (d0 - prev_x0.float()) / r
    return out


def compressed_schedule(sigmas: Tensor, last_window_step: int, ratio: float, shift: float) -> Tensor:
    """MixGRPO-Flash's schedule: the steps up to the window's last one unchanged, the rest compressed to
    ``P - 1`` steps, ``P = int((S - l)·ratio)`` levels (at least 2) from ``sigmas[l+1]`` to 0 equally spaced before the
    shift ``s = k·u/(1 + (k-1)·u)`` (MixGRPO ``sampling_utils.py``, the ``post`` DPM path: 25 steps, window 0..3,
    ratio 0.4 give 4 + 7 = 11 steps).

    Args:
        sigmas: the family's ``(S+1,)`` schedule, from 1 to 0.
        last_window_step: ``l``, the last stochastic step.
        ratio: compression (MixGRPO-Flash: 0.4; 0.2 for its fastest script).
        shift: the family's flow shift ``k``.

    Returns:
        ``(l + 1 + P,)`` levels (``l + P`` steps).

    Raises:
        ValueError: on ``ratio`` outside ``(0, 1]`` or a window that ends the schedule.
    """
    n = len(sigmas) - 1
    if not 0 < ratio <= 1 or not 0 <= last_window_step < n - 1:
        raise ValueError(f"compressed_schedule: need 0 < ratio <= 1 and a window ending before the last step, got {ratio}, {last_window_step} of {n}")
    start = float(sigmas[last_window_step + 1])
    u0 = start / (shift - (shift - 1) * start)  # the unshifted level
    points = max(int((n - last_window_step) * ratio), 2)
    u = torch.linspace(u0, 0, points)
    post = shift * u / (1 + (shift - 1) * u)
    post[0] = start
    return torch.cat([sigmas[: last_window_step + 1].float(), post.float()])
