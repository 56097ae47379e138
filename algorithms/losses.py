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
