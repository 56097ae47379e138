"""Pure advantage transforms (exact-value tested)."""
from __future__ import annotations

import math

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


# ============================================================================ GRPO extensions
def bpgo_group_weights(group_mean: Tensor, prior: Tensor, alpha: float = 0.5, k: float = 1.0) -> Tensor:
    """BPGO Reliability-Adaptive Scaling (arXiv 2511.18919; DESIGN §3):
    ``w = 1 + α·(2·sigmoid(k·(mean_g r - r_prior)) - 1)``.

    A group whose rewards beat the prior (the reference policy's expected reward for that
    condition) is up-weighted, one below it down-weighted; ``w ∈ (1 - α, 1 + α)``, increasing in the
    gap, 1 at the prior.

    Args:
        group_mean: ``(N,)`` mean reward of each group (or per sample, broadcastable with ``prior``).
        prior: ``(N,)`` prior reward of the same conditions.
        alpha: ``α ∈ [0, 1)`` (paper: 0.5).
        k: slope ``k > 0`` (reward units⁻¹; our default 1).

    Returns:
        ``(N,)`` group weights.
    """
    if not 0 <= alpha < 1 or k <= 0:
        raise ValueError(f"bpgo_group_weights: need 0 <= alpha < 1 and k > 0, got alpha={alpha}, k={k}")
    return 1.0 + alpha * (2.0 * torch.sigmoid(k * (group_mean - prior)) - 1.0)


def bpgo_posterior_gap(group_mean: Tensor, group_var: Tensor, group_size: int, prior: Tensor, prior_var: float) -> Tensor:
    """Reliability-shrunk gap for BPGO's posterior RAS (our reading; TeleBoost's code is not public).

    Gaussian prior ``N(r_prior, prior_var)`` on the condition's expected reward and ``G`` observations
    with variance ``group_var``: the posterior mean moves from the prior by
    ``(G/s²)/(1/prior_var + G/s²)·(mean_g - r_prior)`` — a noisy (high-variance) group's deviation is
    shrunk towards 0, a consistent group keeps it. Feed it to :func:`bpgo_group_weights` with
    ``prior = 0``.

    Returns:
        ``(N,)`` gaps ``μ_post - r_prior``.
    """
    precision = group_size / group_var.clamp(min=1e-8)
    return precision / (1.0 / prior_var + precision) * (group_mean - prior)


def contrastive_reward_transform(rewards: Tensor, prior: Tensor, lam: float = 1.0) -> Tensor:
    """BPGO Contrastive Reward Transformation (DESIGN §3):
    ``r̃ = (λ_c·(r - r_prior) + 1[r > r_prior])·exp(r)``.

    Near the prior (``|r - r_prior| < 1``) the order of rewards is kept (``∂r̃/∂r > 0`` there);
    rewards above the prior jump by ``exp(r)``, so samples that beat the prior separate from the rest.

    Args:
        rewards: ``(N,)``; prior: ``(N,)`` (or scalar) prior of each sample's condition;
        lam: ``λ_c > 0``.

    Returns:
        ``(N,)`` transformed rewards (their group advantage is added with weight ς by BPGO).
    """
    return (lam * (rewards - prior) + (rewards > prior).to(rewards.dtype)) * torch.exp(rewards)


def hoyer_sparsity(rewards: Tensor) -> Tensor:
    """Hoyer sparsity over the last dimension: ``S(r) = (√G - ||r||₁/||r||₂)/(√G - 1)``
    (Hoyer 2004; Self-Paced GRPO). 0 for a constant vector, 1 for a one-hot one; 0 for all zeros.

    Args:
        rewards: ``(..., G)`` with ``G >= 2``.

    Returns:
        ``(...)`` in ``[0, 1]``.
    """
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError(f"hoyer_sparsity needs G >= 2 values, got {g}")
    l1, l2 = rewards.abs().sum(-1), rewards.norm(dim=-1)
    ratio = torch.where(l2 > 0, l1 / l2.clamp(min=1e-30), torch.full_like(l1, math.sqrt(g)))
    return ((math.sqrt(g) - ratio) / (math.sqrt(g) - 1)).clamp(0.0, 1.0)


def self_paced_weights(components: Tensor, tau: Tensor, beta: float = 1.0, temperature: float = 1.0) -> Tensor:
    """Self-Paced GRPO curriculum weights (arXiv 2511.19356 v4; DESIGN §3).

    For reward components ``j = 1..K`` in curriculum order (e.g. visual, motion, text):
    ``g_j = sigmoid((mean r_j - τ_j)/T) + β·(S(r_j) - S(r_{j+1}))`` with ``S(r_{K+1}) = 0`` and
    ``S`` the Hoyer sparsity over the group; ``w = softmax(g)``.

    Args:
        components: ``(G, K)`` rewards of one group, or ``(N, G, K)`` for ``N`` groups.
        tau: ``(K,)`` competence thresholds ``τ_j`` (in each component's units).
        beta: weight ``β`` of the sparsity difference.
        temperature: ``T > 0``.

    Returns:
        ``(K,)`` or ``(N, K)`` weights on the simplex.
    """
    if temperature <= 0:
        raise ValueError(f"self_paced_weights: temperature must be > 0, got {temperature}")
    squeeze = components.dim() == 2
    c = components.unsqueeze(0) if squeeze else components
    tau = torch.as_tensor(tau, dtype=c.dtype, device=c.device)
    if tau.shape != (c.shape[-1],):
        raise ValueError(f"self_paced_weights: tau must have shape ({c.shape[-1]},), got {tuple(tau.shape)}")
    s = hoyer_sparsity(c.transpose(1, 2))  # (N, K)
    s_next = torch.cat([s[:, 1:], torch.zeros_like(s[:, :1])], dim=1)
    g = torch.sigmoid((c.mean(1) - tau) / temperature) + beta * (s - s_next)
    w = torch.softmax(g, dim=-1)
    return w[0] if squeeze else w


def min_norm_weights(advantages: Tensor, iterations: int = 100) -> Tensor:
    """Joint-reward weights ``c = argmin_{c ∈ simplex} ||Σ_i c_i A_i||²`` (TeleBoost §3.5 Eq. 4;
    the MGDA min-norm problem of Sener & Koltun 2018 at the advantage level).

    Closed form for 2 rewards: ``c_1 = clip((A_2 - A_1)·A_2 / ||A_1 - A_2||², 0, 1)``; for more,
    Frank–Wolfe with exact line search (``iterations`` steps, from the uniform point).

    Args:
        advantages: ``(K, N)``: the advantage of every sample under each of ``K`` rewards.
        iterations: Frank–Wolfe steps for ``K > 2``.

    Returns:
        ``(K,)`` non-negative weights summing to 1.
    """
    a = advantages.double()
    k = a.shape[0]
    if k == 1:
        return torch.ones(1, dtype=advantages.dtype, device=advantages.device)
    gram = a @ a.T  # (K, K)
    if k == 2:
        denom = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        c1 = torch.clamp((gram[1, 1] - gram[0, 1]) / denom, 0.0, 1.0) if denom > 1e-20 else a.new_tensor(0.5)
        return torch.stack([c1, 1 - c1]).to(advantages.dtype)
    c = torch.full((k,), 1.0 / k, dtype=torch.float64, device=a.device)
    for _ in range(iterations):
        grad = gram @ c  # ∇ (1/2) cᵀ M c
        j = int(torch.argmin(grad))
        d = -c.clone()
        d[j] += 1.0  # direction to the vertex e_j
        dmd = d @ gram @ d
        if dmd <= 1e-20:
            break
        step = float(torch.clamp(-(d @ grad) / dmd, 0.0, 1.0))
        if step <= 0:
            break
        c = c + step * d
    return c.clamp(min=0).div(c.clamp(min=0).sum()).to(advantages.dtype)


def vipo_advantage_map(features: Tensor, latent_size: tuple[int, int, int], blur_sigma: float = 1.0, components: int = 3) -> Tensor:
    """ViPO's Perceptual Structuring Module map for one video (arXiv 2511.18719; DESIGN §3).

    Per frame: patch features ``(C, h, w)`` → centred over the ``h·w`` patches → top-``components``
    PCA projections (SVD; each component's sign fixed so its largest-magnitude loading is positive,
    sklearn's ``svd_flip`` rule — the paper leaves the sign open) → per-component min–max to
    ``[0, 1]`` → weighted sum with the components' explained variances (normalised) → Gaussian blur
    ``σ = blur_sigma`` (torchvision) → bilinear resize to the latent grid; frames are then resampled
    linearly in time to the latent frames and the volume is min–max normalised (a constant volume
    gives all ones).

    Args:
        features: ``(T, C, h, w)`` frozen-backbone patch features of the video's frames.
        latent_size: ``(T', h', w')`` of the latents the map weights.
        blur_sigma: Gaussian blur std in feature-grid cells (paper: 1).
        components: PCA components kept (paper: 3).

    Returns:
        ``M`` of shape ``(T', h', w')`` in ``[0, 1]``.
    """
    import torch.nn.functional as F
    from torchvision.transforms.functional import gaussian_blur

    t, c, h, w = features.shape
    x = features.float().reshape(t, c, h * w).transpose(1, 2)  # (T, P, C): patches x channels, per frame
    x = x - x.mean(1, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # batched over frames
    k = min(components, vh.shape[1])
    vh = vh[:, :k]  # (T, k, C)
    signs = torch.sign(vh.gather(2, vh.abs().argmax(2, keepdim=True))).clamp(min=0) * 2 - 1  # (T, k, 1)
    proj = x @ (vh * signs).transpose(1, 2)  # (T, P, k)
    lo, hi = proj.min(1, keepdim=True).values, proj.max(1, keepdim=True).values
    proj = (proj - lo) / (hi - lo).clamp(min=1e-12)
    var = s[:, :k] ** 2
    weight = var / var.sum(1, keepdim=True).clamp(min=1e-12)  # (T, k)
    m = (proj * weight.unsqueeze(1)).sum(2).view(t, 1, h, w)
    if blur_sigma > 0:
        ks = 2 * math.ceil(2 * blur_sigma) + 1
        m = gaussian_blur(m, [ks, ks], [blur_sigma, blur_sigma])
    t_lat, h_lat, w_lat = latent_size
    m = F.interpolate(m, size=(h_lat, w_lat), mode="bilinear", align_corners=False)[:, 0]  # (T, h', w')
    m = F.interpolate(m.permute(1, 2, 0).reshape(1, h_lat * w_lat, t), size=t_lat, mode="linear", align_corners=True)
    m = m.reshape(h_lat, w_lat, t_lat).permute(2, 0, 1)
    lo, hi = m.min(), m.max()
    return torch.ones_like(m) if hi - lo < 1e-12 else (m - lo) / (hi - lo)
