"""Pure loss functions of every algorithm (exact-value tested)."""
from __future__ import annotations

import torch
from torch import Tensor


def _check_per_sample(name: str, *tensors: Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"{name}: expected per-sample tensors of one shape (B,), got {[tuple(t.shape) for t in tensors]}")


def sft_loss(loss_real: Tensor, weights: Tensor | None = None) -> Tensor:
    """Supervised fine-tuning loss ``mean_b w_b·ℓ(x0_b)`` (TeleBoost §2.3 for weights; 1 by default).

    Args:
        loss_real: per-sample denoising losses ``(B,)``.
        weights: optional per-sample weights ``(B,)``.
    """
    if weights is None:
        return loss_real.mean()
    _check_per_sample("sft_loss", loss_real, weights)
    return (weights * loss_real).mean()


def shift_loss(loss_fake: Tensor, loss_real: Tensor, advantages: Tensor, lam: float, w_sft: float = 1.0) -> Tensor:
    """SHIFT objective (SHIFT Eq. 10 with the first-order AWR weight, App. A.3 / C):

    ``L = lam · mean_b(A_b · ℓ(x̃0_b)) + w_sft · mean_b ℓ(x0_b)``, ``lam = 1/β`` (paper: 0.01).

    Minimising ``A·ℓ`` raises the likelihood of rollouts with positive advantage and lowers it
    for negative ones; with all-zero advantages this is exactly ``w_sft``·SFT.

    Args:
        loss_fake: per-sample denoising losses of rollouts ``x̃0`` ``(B_f,)``.
        loss_real: per-sample denoising losses of real clips ``(B_r,)``.
        advantages: ``(B_f,)`` clipped group-relative advantages (treated as constants).
        lam: weight of the advantage term (``1/β``).
        w_sft: weight of the SFT anchor.

    Returns:
        Scalar loss.

    Raises:
        ValueError: on mismatched shapes. FloatingPointError: on non-finite advantages.
    """
    _check_per_sample("shift_loss", loss_fake, advantages)
    if loss_real.ndim != 1:
        raise ValueError(f"shift_loss: loss_real must be (B,), got {tuple(loss_real.shape)}")
    if not torch.isfinite(advantages).all():
        raise FloatingPointError(f"shift_loss: non-finite advantages {advantages.tolist()}")
    return lam * (advantages.detach() * loss_fake).mean() + w_sft * loss_real.mean()


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss per sample (Schulman et al. 2017; Flow-GRPO's per-step form).

    ``ρ = exp(log π_θ - log π_old)``; ``L = max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))``.

    Args:
        log_prob: ``(N,)`` log-probabilities under the current policy (with grad).
        old_log_prob: ``(N,)`` log-probabilities recorded at rollout.
        advantages: ``(N,)``.
        clip_range: ``ε > 0`` (Flow-GRPO: 1e-4 on per-element-averaged log-probs).

    Returns:
        ``(loss (N,), {"ratio", "clip_frac", "approx_kl"})``, metrics detached means:
        ``clip_frac`` = share of samples with ``|ρ - 1| > ε``; ``approx_kl`` = ``0.5·mean((Δ log π)²)``.
    """
    _check_per_sample("ppo_clip_loss", log_prob, old_log_prob, advantages)
    if clip_range <= 0:
        raise ValueError(f"ppo_clip_loss: clip_range must be > 0, got {clip_range}")
    diff = log_prob - old_log_prob.detach()
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        metrics = {
            "ratio": ratio.mean(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (diff**2).mean(),
        }
    return loss, metrics


def diffusion_dpo_loss(loss_w: Tensor, loss_l: Tensor, ref_loss_w: Tensor, ref_loss_l: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss (Wallace et al. 2024, Eq. 14 and its reference code; TeleBoost §4).

    ``inside = -0.5·β·((ℓ_w - ℓ_ref,w) - (ℓ_l - ℓ_ref,l))``, ``L = mean(-log σ(inside))``: the
    policy's denoising loss should drop more than the reference's on the winner than on the loser.

    Args:
        loss_w, loss_l: ``(B,)`` policy denoising losses of winner and loser at one shared ``(σ, ε)``.
        ref_loss_w, ref_loss_l: ``(B,)`` reference-policy losses (no grad) at the same ``(σ, ε)``.
        beta: ``β > 0`` (Diffusion-DPO: 5000 for SD-scale models; scale with the loss magnitudes).

    Returns:
        ``(loss (0-dim), {"implicit_acc", "reward_margin", "inside"})``: ``implicit_acc`` = share of
        pairs with ``inside > 0``; ``reward_margin`` = mean implicit reward margin ``mean(inside)``
        (implicit reward ``r(x) = -0.5·β·(ℓ_θ(x) - ℓ_ref(x))``); ``inside`` per pair ``(B,)``; all detached.

    Raises:
        ValueError: on shape mismatch or ``beta <= 0``.
    """
    _check_per_sample("diffusion_dpo_loss", loss_w, loss_l, ref_loss_w, ref_loss_l)
    if beta <= 0:
        raise ValueError(f"diffusion_dpo_loss: beta must be > 0, got {beta}")
    inside = -0.5 * beta * ((loss_w - ref_loss_w.detach()) - (loss_l - ref_loss_l.detach()))
    loss = -torch.nn.functional.logsigmoid(inside).mean()
    with torch.no_grad():
        metrics = {"implicit_acc": (inside > 0).float().mean(), "reward_margin": inside.mean(), "inside": inside.detach()}
    return loss, metrics


def dpo_pair_weights(loss_w: Tensor, loss_l: Tensor, ref_loss_w: Tensor, ref_loss_l: Tensor, beta: float) -> Tensor:
    """The scalar ``η_b = 0.5·β·σ(-inside_b)`` of each pair, computed without grad (TeleBoost Eq. 12).

    ``∂L/∂ℓ_w,b = η_b/B`` and ``∂L/∂ℓ_l,b = -η_b/B`` for :func:`diffusion_dpo_loss`, so backward
    passes of ``η_b·ℓ_w,b/B`` and ``-η_b·ℓ_l,b/B`` (separately) give exactly its gradient.

    Returns:
        ``(B,)`` non-negative weights (detached).
    """
    _check_per_sample("dpo_pair_weights", loss_w, loss_l, ref_loss_w, ref_loss_l)
    with torch.no_grad():
        inside = -0.5 * beta * ((loss_w - ref_loss_w) - (loss_l - ref_loss_l))
        return 0.5 * beta * torch.sigmoid(-inside)


def vae_loss(recon: Tensor, target: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """VAE training loss ``mean|x̂ - x| + kl_weight · mean KL(N(μ, σ²) || N(0, 1))``.

    The KL is averaged over latent elements, ``KL = ½(μ² + σ² - 1 - ln σ²)`` per element (the
    Gaussian posterior of the diffusers VAEs). L1 reconstruction as the SD/SVD VAE recipe, without its
    perceptual and adversarial terms (no LPIPS/discriminator weights offline): our choice.

    Args:
        recon: reconstruction, any shape, in the units of ``target`` (``[-1, 1]``).
        target: the input, same shape.
        mean, logvar: posterior parameters, one shape.
        kl_weight: weight of the KL term (>= 0).

    Returns:
        ``(loss, {"recon_l1", "kl"})``, scalars.

    Raises:
        ValueError: on shape mismatches or a negative ``kl_weight``.
    """
    if recon.shape != target.shape or mean.shape != logvar.shape:
        raise ValueError(f"vae_loss: recon {tuple(recon.shape)} vs target {tuple(target.shape)}, mean {tuple(mean.shape)} vs logvar {tuple(logvar.shape)}")
    if kl_weight < 0:
        raise ValueError(f"vae_loss: kl_weight must be >= 0, got {kl_weight}")
    rec = (recon.float() - target.float()).abs().mean()
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).mean()
    return rec + kl_weight * kl, {"recon_l1": rec.detach(), "kl": kl.detach()}


def latent_moments(sums: Tensor, sq_sums: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std from running sums: ``μ = S/n``, ``σ = sqrt(Q/n - μ²)``.

    Args:
        sums, sq_sums: ``(C,)`` sums of values and of squares.
        count: values per channel (> 0).

    Raises:
        ValueError: for ``count <= 0``.
    """
    if count <= 0:
        raise ValueError("latent_moments: no value accumulated (count 0)")
    mean = sums.double() / count
    var = (sq_sums.double() / count - mean**2).clamp_min(0)
    return mean.float(), var.sqrt().float()


# ============================================================================ forward-process RL (NFT, AWM)
def nft_loss(
    velocity: Tensor,
    old_velocity: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    space: str = "x0",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's negative-aware loss on a noised copy of the model's own sample (Zheng et al. 2025).

    Implicit policies ``v⁺ = β·v_θ + (1-β)·v_old``, ``v⁻ = (1+β)·v_old - β·v_θ``; optimality
    probability ``r = clip(0.5 + 0.5·clip(A, ±Z)/Z, 0, 1)`` with ``Z = adv_clip_max``;
    ``L = Z·(r·ℓ⁺ + (1-r)·ℓ⁻)/β`` per sample.

    ``space="x0"`` (default: NVlabs' ``train_nft_sd3.py`` and UniRL's ``diffusionnft.py``): the
    errors are taken on ``x̂0± = x_t - s·v±`` against the sample ``x0``, each divided by its adaptive
    weight ``w± = max(mean|x̂0± - x0|, 1e-5)`` (no gradient): ``ℓ± = mean((x̂0± - x0)²/w±)``.
    ``space="velocity"`` (the paper's plain form): ``ℓ± = mean((v± - (ε - x0))²)`` with
    ``ε = (x_t - (1-s)·x0)/s``, no weights.

    Args:
        velocity: ``v_θ(x_t, s)`` ``(n, ...)`` of the trained policy (with grad).
        old_velocity: ``v_old(x_t, s)`` of the old policy (treated as a constant).
        x_t: ``(1-s)·x0 + s·ε`` ``(n, ...)``.
        x0: the clean samples ``(n, ...)``.
        sigma: ``(n,)`` levels ``s`` in ``(0, 1]``.
        advantages: ``(n,)`` (clipped here to ``±adv_clip_max``).
        beta: ``β > 0`` (NVlabs: 1.0; 0.1 for OCR).
        adv_clip_max: ``Z > 0`` (NVlabs: 5).
        space: ``"x0"`` | ``"velocity"``.

    Returns:
        ``(loss (n,), {"r", "loss_pos", "loss_neg"})`` (metrics: detached means).

    Raises:
        ValueError: on mismatched shapes, ``beta <= 0``, ``adv_clip_max <= 0`` or an unknown ``space``.
    """
    if not (velocity.shape == old_velocity.shape == x_t.shape == x0.shape):
        raise ValueError(f"nft_loss: velocity {tuple(velocity.shape)}, old_velocity {tuple(old_velocity.shape)}, x_t {tuple(x_t.shape)}, x0 {tuple(x0.shape)} must match")
    _check_per_sample("nft_loss", sigma, advantages)
    if beta <= 0 or adv_clip_max <= 0:
        raise ValueError(f"nft_loss: beta and adv_clip_max must be > 0, got {beta}, {adv_clip_max}")
    if space not in ("x0", "velocity"):
        raise ValueError(f"nft_loss: space must be 'x0' or 'velocity', got {space!r}")
    v, v_old = velocity.float(), old_velocity.float().detach()
    a = advantages.detach().float().clamp(-adv_clip_max, adv_clip_max)
    r = (a / adv_clip_max / 2 + 0.5).clamp(0, 1)
    v_pos, v_neg = beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v
    s = sigma.float().view(-1, *([1] * (v.dim() - 1)))
    if space == "x0":
        errors = [(x_t.float() - s * u) - x0.float() for u in (v_pos, v_neg)]
        weights = [e.detach().double().abs().flatten(1).mean(1).clamp(min=1e-5).float().view_as(s) for e in errors]
        pos, neg = ((e**2 / w).flatten(1).mean(1) for e, w in zip(errors, weights))
    else:
        target = (x_t.float() - x0.float()) / s  # ε - x0 = (x_t - x0)/s
        pos, neg = (((u - target) ** 2).flatten(1).mean(1) for u in (v_pos, v_neg))
    loss = adv_clip_max * (r * pos + (1 - r) * neg) / beta
    with torch.no_grad():
        metrics = {"r": r.mean(), "loss_pos": pos.mean(), "loss_neg": neg.mean()}
    return loss, metrics


AWM_WEIGHTINGS = ("ghuber", "uniform", "t", "t2", "huber")


def awm_log_likelihood(mse: Tensor, sigma: Tensor, weighting: str = "ghuber", power: float = 0.25) -> Tensor:
    """AWM's surrogate log-likelihood of a sample from its flow-matching error (scxue/advantage_weighted_matching,
    ``train_sd3_awm.py`` ``compute_log_prob_awm``).

    ``mse = mean((v_θ(x_t) - (ε - x0))²)`` per sample; ``log p = -((mse + 1e-10)^p - 1e-10^p)·s/p`` (``ghuber``,
    the reference default with ``p = 0.25``), ``-mse`` (``uniform``), ``-mse·s`` (``t``), ``-mse·s²`` (``t2``),
    ``-(sqrt(mse + 1e-10) - 1e-5)·s`` (``huber``).

    Args:
        mse: ``(n,)`` per-sample flow-matching errors (with grad).
        sigma: ``(n,)`` the levels ``s = t``.
        weighting: one of :data:`AWM_WEIGHTINGS`.
        power: ``p`` of ``ghuber`` (> 0).

    Returns:
        ``(n,)`` fp64 (the reference computes it in float64).

    Raises:
        ValueError: on an unknown ``weighting``, ``power <= 0`` or mismatched shapes.
    """
    _check_per_sample("awm_log_likelihood", mse, sigma)
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"awm_log_likelihood: weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")
    if power <= 0:
        raise ValueError(f"awm_log_likelihood: power must be > 0, got {power}")
    m, t = mse.double(), sigma.double().detach()
    if weighting == "ghuber":
        return -((m + 1e-10) ** power - 1e-10**power) * t / power
    if weighting == "uniform":
        return -m
    if weighting == "t":
        return -m * t
    if weighting == "t2":
        return -m * t**2
    return -(torch.sqrt(m + 1e-10) - 1e-5) * t


# ============================================================================ GRPO-Guard, Flow-DPPO
def ratio_norm_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor | float, eps: float = 1e-6) -> Tensor:
    """GRPO-Guard's RatioNorm: the per-step log importance ratio re-centred and rescaled (Wang et al. 2025, GRPO-Guard
    Eq. 8; TeleBoost ``teleboost/algorithms/grpo_guard.py`` ``compute_ratio_norm_bias`` and its actor).

    ``log ρ̂ = (log π_θ - log π_old + mean((μ_θ - μ_old)²)/(2·(std² + eps)))·std``. With mean-reduced Gaussian
    log-probs and ``x = μ_old + std·ε`` this is ``mean(ε·(μ_θ - μ_old))``: zero-mean at every step whatever its noise
    scale, where the plain log-ratio's mean ``-mean(Δμ²)/(2std²)`` drifts negative at low-noise steps.

    Args:
        log_prob: ``(n,)`` mean-reduced step log-probs under the current policy (with grad).
        old_log_prob: ``(n,)`` the same under the rollout policy.
        mean: ``(n, ...)`` current transition means (with grad: the bias term is differentiated too, as every reference
            form — TeleBoost, verl-omni, Flow-Factory — so ``∇ log ρ̂ = ∇ mean(ε·μ_θ)`` exactly).
        old_mean: ``(n, ...)`` the rollout's transition means.
        std: the step's full transition std ``σ_t·sqrt(Δ)`` (a float, ``(n,)`` or broadcastable ``(n, 1, ...)``).
        eps: added to ``std²`` (TeleBoost: 1e-6).

    Returns:
        ``(n,)`` normalised log-ratios (``ρ̂ = exp`` of it goes into the PPO clip).

    Raises:
        ValueError: on mismatched shapes.
    """
    _check_per_sample("ratio_norm_log_ratio", log_prob, old_log_prob)
    if mean.shape != old_mean.shape or mean.shape[0] != log_prob.shape[0]:
        raise ValueError(f"ratio_norm_log_ratio: mean {tuple(mean.shape)} and old_mean {tuple(old_mean.shape)} must match (n={log_prob.shape[0]})")
    scale = torch.as_tensor(std, dtype=torch.float32, device=log_prob.device).reshape(-1)
    scale = scale.expand(log_prob.shape[0]) if scale.numel() == 1 else scale
    bias = ((mean.float() - old_mean.float().detach()) ** 2).flatten(1).mean(1) / (2 * (scale**2 + eps))
    return (log_prob - old_log_prob.detach() + bias) * scale


def grpo_guard_step_weight(sigma: Tensor, sigma_next: Tensor, form: str = "flow_grpo", eta: float = 0.7, eps: float = 1e-6) -> Tensor:
    """GRPO-Guard's per-step gradient reweighting ``δ_t`` (GRPO-Guard Eq. 12; TeleBoost ``compute_grad_reweight_delta``):
    ``1/(Δ + eps)`` (``flow_grpo`` SDE) or ``(1 + η²(1-s)/(2s))/(Δ + eps)`` (``dance_grpo`` SDE), ``Δ = s - s'``; it
    cancels the ``Δ`` in ``∂μ/∂θ`` so no step's gradient dominates.

    Args:
        sigma, sigma_next: ``(n,)`` levels ``s > s'``.
        form: ``"flow_grpo"`` | ``"dance_grpo"``.
        eta: the SDE's ``η`` (``dance_grpo`` form).
        eps: stabiliser (TeleBoost: 1e-6; ``s`` is clamped to it too).

    Returns:
        ``(n,)`` fp32 weights.

    Raises:
        ValueError: on an unknown ``form``.
    """
    if form not in ("flow_grpo", "dance_grpo"):
        raise ValueError(f"grpo_guard_step_weight: form must be 'flow_grpo' or 'dance_grpo', got {form!r}")
    s, sn = torch.as_tensor(sigma, dtype=torch.float32), torch.as_tensor(sigma_next, dtype=torch.float32)
    dt = s - sn
    if form == "flow_grpo":
        return 1.0 / (dt + eps)
    s = s.clamp(min=eps, max=1.0)
    return (1 + eta**2 * (1 - s) / (2 * s)) / (dt + eps)


def dppo_masked_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, kl: Tensor, threshold: float = 1e-5) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-DPPO's divergence-masked policy loss (UniRL ``unirl/algorithms/flowdppo.py`` ``_flowdppo_kl_adv_loss``;
    Flow-DPPO Eq. 14/18).

    ``ρ = exp(log π_θ - log π_old)``; a sample is dropped when its step KL ``≥ threshold`` **and** the ratio moves
    further the way its advantage pushes (``ρ > 1, A > 0`` or ``ρ < 1, A < 0``); the others keep the *unclipped*
    ``-A·ρ``. No ratio clip.

    Args:
        log_prob, old_log_prob, advantages: ``(n,)``.
        kl: ``(n,)`` the exact Gaussian KL between the old and current step distributions,
            ``mean((μ_old - μ_θ)²)/(2·std²)`` (:func:`~lightning_vidalign.sampling.gaussian_kl`: mean over elements, as
            the reference, whose threshold is calibrated to the mean).
        threshold: ``τ`` (UniRL: 1e-5).

    Returns:
        ``(loss (n,), {"ratio", "mask_frac", "step_kl", "approx_kl"})``; ``mask_frac``: share of dropped samples.

    Raises:
        ValueError: on mismatched shapes or ``threshold < 0``.
    """
    _check_per_sample("dppo_masked_loss", log_prob, old_log_prob, advantages, kl)
    if threshold < 0:
        raise ValueError(f"dppo_masked_loss: threshold must be >= 0, got {threshold}")
    diff = log_prob - old_log_prob.detach()
    ratio = torch.exp(diff)
    a = advantages.detach()
    with torch.no_grad():
        high = kl.detach() >= threshold
        drop = high & (((ratio > 1) & (a > 0)) | ((ratio < 1) & (a < 0)))
    loss = torch.where(drop, torch.zeros_like(ratio), -a * ratio)
    with torch.no_grad():
        metrics = {"ratio": ratio.mean(), "mask_frac": drop.float().mean(), "step_kl": kl.detach().mean(), "approx_kl": 0.5 * (diff**2).mean()}
    return loss, metrics
