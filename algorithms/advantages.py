"""Pure advantage transforms (exact-value tested)."""
from __future__ import annotations

import torch
from torch import Tensor


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per-element mean of its group.

    Args:
        values: ``(B,)`` float.
        group_ids: ``(B,)`` integer group labels (any values).

    Returns:
        ``(B,)``: ``mean{values[j] : group_ids[j] == group_ids[i]}`` at position ``i``.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    return (sums / counts)[inverse]


def shift_advantages(rewards: Tensor, group_ids: Tensor, clip: float) -> Tensor:
    """SHIFT advantages: recentred per group, no std division, clipped (SHIFT §4.3, App. C).

    ``A_i = clip(r_i - mean_{j ∈ g(i)} r_j, -clip, clip)``. A group of size 1 gets advantage 0.

    Args:
        rewards: ``(B,)`` float rewards.
        group_ids: ``(B,)`` integer ids of the condition each rollout came from (``G`` per group);
            pass ``torch.zeros(B)`` for the "batch" baseline.
        clip: ``c > 0``; advantages are clipped to ``[-c, c]``.

    Returns:
        ``(B,)`` advantages, same dtype as ``rewards``.

    Raises:
        ValueError: on shape mismatch or ``clip <= 0``. FloatingPointError: on non-finite rewards.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"shift_advantages: rewards and group_ids must both be (B,), got {tuple(rewards.shape)}, {tuple(group_ids.shape)}")
    if clip <= 0:
        raise ValueError(f"shift_advantages: clip must be > 0, got {clip}")
    if not torch.isfinite(rewards).all():
        raise FloatingPointError(f"shift_advantages: non-finite rewards {rewards.tolist()}")
    return (rewards - group_mean(rewards, group_ids)).clamp(-clip, clip)


def failure_weights(rewards: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample SFT loss weights that emphasise low-reward (failure) samples, mean 1.

    ``w = B · softmax(-r / temperature)``. TeleBoost §2.3 reweights the SFT loss so that samples
    with structural failures "receive stronger corrective gradients" and stable ones are
    de-emphasised; it gives no formula: this softmax form is our choice.

    Args:
        rewards: ``(B,)`` finite rewards of the real samples.
        temperature: ``> 0``; large values approach uniform weights.

    Returns:
        ``(B,)`` positive weights with mean 1 (constants: no gradient).

    Raises:
        ValueError: if ``temperature <= 0``. FloatingPointError: on non-finite rewards.
    """
    if temperature <= 0:
        raise ValueError(f"failure_weights: temperature must be > 0, got {temperature}")
    if not torch.isfinite(rewards).all():
        raise FloatingPointError(f"failure_weights: non-finite rewards {rewards.tolist()}")
    return rewards.numel() * torch.softmax(-rewards.detach().float() / temperature, dim=0)


def group_std(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per-element population std (``1/G``, SAGE-GRPO Eq. 34) of its group, shape ``(B,)``."""
    mean = group_mean(values, group_ids)
    return group_mean((values - mean) ** 2, group_ids).sqrt()


def grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-4, clip: float | None = 5.0) -> tuple[Tensor, Tensor]:
    """Group-normalised advantages ``A_i = (r_i - μ_g)/(σ_g + ε)``, clipped to ``±clip``
    (DeepSeekMath GRPO; TeleBoost Eq. 1; SAGE-GRPO Eq. 10/35 with the population std).

    A group whose rewards are all equal (zero variance) gets advantage exactly 0 for every member: it
    carries no preference and contributes no policy gradient (documented handling; its share is
    returned for logging).

    Args:
        rewards: ``(N,)`` finite rewards.
        group_ids: ``(N,)`` integer condition ids (rollouts of one prompt share an id; ids may
            come from several ranks after an all-gather).
        eps: the stabiliser ``ε`` (flow_grpo: 1e-4).
        clip: advantage clip ``c`` (DESIGN: 5) or None.

    Returns:
        ``(advantages (N,), zero_std_fraction)``: the fraction of groups (not samples) with zero
        reward variance, a 0-dim tensor.

    Raises:
        ValueError: on shape mismatch. FloatingPointError: on non-finite rewards (naming their count).
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"grpo_advantages: rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        raise FloatingPointError(f"grpo_advantages: {int(bad.sum())} non-finite reward(s) of {rewards.numel()}")
    r = rewards.float()
    mean, std = group_mean(r, group_ids), group_std(r, group_ids)
    zero = std <= 1e-12
    adv = torch.where(zero, torch.zeros_like(r), (r - mean) / (std + eps))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    _, first = torch.unique(group_ids, return_inverse=True)
    n_groups = int(first.max()) + 1 if first.numel() else 0
    zero_groups = torch.zeros(n_groups, dtype=torch.bool, device=r.device).index_put_((first,), zero)
    return adv, zero_groups.float().mean()
