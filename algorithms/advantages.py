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


def grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-4, clip: float | None = 5.0, global_std: bool = False) -> tuple[Tensor, Tensor]:
    """Group-normalised advantages ``A_i = (r_i - μ_g)/(σ_g + ε)``, clipped to ``±clip``
    (DeepSeekMath GRPO; TeleBoost Eq. 1; SAGE-GRPO Eq. 10/35 with the population std).
    With ``global_std``: ``A_i = (r_i - μ_g)/(σ + ε)`` with ``σ`` the population std of all ``N`` rewards
    (flow_grpo's ``PerPromptStatTracker(global_std=True)``, the setting of DiffusionNFT's and AWM's configs).

    A group whose rewards are all equal (zero variance) gets advantage exactly 0 for every member: it
    carries no preference and contributes no policy gradient (documented handling; its share is
    returned for logging).

    Args:
        rewards: ``(N,)`` finite rewards.
        group_ids: ``(N,)`` integer condition ids (rollouts of one prompt share an id; ids may
            come from several ranks after an all-gather).
        eps: the stabiliser ``ε`` (flow_grpo: 1e-4).
        clip: advantage clip ``c`` (DESIGN: 5) or None.
        global_std: divide by the std of all the rewards instead of the group's.

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
    scale = r.std(unbiased=False).expand_as(r) if global_std else std
    adv = torch.where(zero, torch.zeros_like(r), (r - mean) / (scale + eps))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    _, first = torch.unique(group_ids, return_inverse=True)
    n_groups = int(first.max()) + 1 if first.numel() else 0
    zero_groups = torch.zeros(n_groups, dtype=torch.bool, device=r.device).index_put_((first,), zero)
    return adv, zero_groups.float().mean()


# ============================================================================ GRPO extensions
def bpgo_group_weights(group_mean: Tensor, prior: Tensor, alpha: float = 0.5, k: float = 1.0) -> Tensor:
    """BPGO Reliability-Adaptive Scaling, the paper's form (arXiv 2511.18919; ``ras="paper"``;
    the reference code's form is :func:`ras_bayes_weight`):
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


def crt_rerange(rewards: Tensor, prior: Tensor | float, a: float = 50.0, temperature: float = 5.0, exp_clamp: float = 30.0) -> Tensor:
    """BPGO Contrastive Reward Transformation, TeleBoost's reference form (``teleboost/algorithms/
    bgpo.py``, ``binary_rerange_group_rewards``; the default of :class:`BPGO`):

    ``R̃ = (a·(R - R_prior) + 1[R > R_prior]) · R / (1 + exp(-R/τ))``, the exponent clamped to
    ``±exp_clamp``; ``1[R > R_prior]`` is 0 at equality. The rearranged rewards *replace* the rewards
    before the group advantage.

    Where it keeps the order, and where not (``a > 0``, ``τ > 0``):

    - above the prior and above 0 (``R > max(R_prior, 0)``) it is increasing, and ``R̃ > 0``;
    - for a non-negative prior, every ``0 <= R <= R_prior`` maps to ``R̃ <= 0``: samples that beat
      the prior stay separated from those that do not;
    - **below the prior it is not monotone**: ``a(R - R_prior)·R·sigmoid(R/τ)`` is 0 at ``R = 0`` and
      at the prior and negative between (``R_prior = 0.3``: ``R = 0 → 0``, ``R = 0.15 → -0.57``);
      for **negative rewards** both factors are negative and a worse reward can be mapped far
      *higher* — above the samples that beat the prior (``R_prior = 0``, ``a = 50``, ``τ = 5``:
      ``R = -2 → 80.3``, ``R = -1 → 22.5``).

    Shift rewards that can be negative to be non-negative first (the reference's reward models
    score ``>= 0``), or use ``crt="paper"`` (:func:`contrastive_reward_transform`).

    Args:
        rewards: ``(G,)`` (or ``(N,)``) rewards.
        prior: the prior reward of each sample's condition, ``(N,)`` or a scalar.
        a: slope ``a`` of the gap (reference recipes: 50).
        temperature: ``τ > 0`` of the sigmoid gate (reference recipes: 5).
        exp_clamp: clamp of the exponent (reference: 30).

    Returns:
        Rearranged rewards, shape of ``rewards``.

    Raises:
        ValueError: if ``temperature <= 0``.
    """
    if temperature <= 0:
        raise ValueError(f"crt_rerange: temperature must be > 0, got {temperature}")
    flag = rewards - prior
    numerator = a * flag + torch.clamp(torch.sign(flag), min=0.0)
    gate = 1.0 + torch.exp(torch.clamp(-rewards / temperature, min=-exp_clamp, max=exp_clamp))
    return numerator / gate * rewards


def ras_bayes_weight(rewards: Tensor, prior: Tensor | float, prior_var: float = 1.0, weight_range: tuple[float, float] = (0.5, 1.5)) -> Tensor:
    """BPGO Reliability-Adaptive Scaling, TeleBoost's reference ``bayes`` form (``teleboost/
    algorithms/bgpo.py``, ``bayes_reliability_weight``; the default of :class:`BPGO`).

    A Normal prior ``N(R_prior, prior_var)`` on the condition's expected reward, ``G``
    observations with the group's unbiased sample variance ``s² (+1e-8)`` (1 when ``G = 1``):
    posterior ``var = 1/(G/s² + 1/prior_var)``, ``mean = var·(G·mean(r)/s² + R_prior/prior_var)``;
    ``P = P(posterior mean > R_prior) = 1 - Φ((R_prior - mean)/sqrt(var))``;
    ``w_bayes = w_min + (w_max - w_min)·P``. The group's advantage scale is then
    ``clamp(1 + α·(w_bayes - 1), min_scale, max_scale)`` (:class:`BPGO`).

    For the same gap above the prior, a higher-variance group gets a lower weight (its posterior
    stays closer to the prior and is wider). At the prior ``P = 1/2`` and ``w_bayes`` is the middle
    of the range.

    Args:
        rewards: ``(G,)`` rewards of one group (the reference passes the CRT-rearranged ones).
        prior: the group's prior reward (scalar or 0-dim tensor).
        prior_var: prior variance (reference: 1.0), ``> 0``.
        weight_range: ``(w_min, w_max)`` (reference: (0.5, 1.5)).

    Returns:
        ``w_bayes``, a 0-dim float tensor in ``[w_min, w_max]``.

    Raises:
        ValueError: if ``rewards`` is not 1-D or ``prior_var <= 0``.
    """
    if rewards.dim() != 1 or prior_var <= 0:
        raise ValueError(f"ras_bayes_weight: rewards must be (G,) and prior_var > 0, got {tuple(rewards.shape)}, {prior_var}")
    r = rewards.float()
    n = r.numel()
    prior = torch.as_tensor(prior, dtype=r.dtype, device=r.device)
    var = r.var(unbiased=True) + 1e-8 if n > 1 else torch.ones((), dtype=r.dtype, device=r.device)
    post_var = 1.0 / (n / var + 1.0 / prior_var)
    post_mean = post_var * (n * r.mean() / var + prior / prior_var)
    z = (prior - post_mean) / torch.sqrt(post_var)
    prob_better = 1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    w_min, w_max = weight_range
    return w_min + (w_max - w_min) * prob_better


def contrastive_reward_transform(rewards: Tensor, prior: Tensor, lam: float = 1.0) -> Tensor:
    """BPGO Contrastive Reward Transformation, the paper's form (arXiv 2511.18919; ``crt="paper"``):
    ``r̃ = (λ_c·(r - r_prior) + 1[r > r_prior])·exp(r)``.

    Near the prior (``r_prior - 1/λ_c < r``) the order of rewards is kept (``∂r̃/∂r > 0`` there);
    rewards above the prior jump by ``exp(r)``, so samples that beat the prior separate from the rest.
    **Not monotone below** ``r_prior - 1/λ_c``: there ``∂r̃/∂r = λ_c·exp(r)·(1 + r - r_prior) < 0``
    (e.g. prior 0, ``λ_c = 1``: ``r = [-3, -1] → [-0.149, -0.368]``): a far worse sample is ranked
    higher. Use it with rewards that stay within ``1/λ_c`` below the prior, or the reference form
    :func:`crt_rerange`.

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


def group_saturation(rewards: Tensor) -> Tensor:
    """Saturation of a group's rewards: the Hoyer sparsity of the group-centred deviations
    ``S(|r - mean r|)`` over the last dimension, and 1 for a zero-variance group.

    1 when all rollouts score the same (nothing left to learn from this component); high when the
    spread sits in few rollouts (most score alike); 0 when every rollout deviates equally (e.g. any
    two different rewards of a group of 2). Independent of a constant offset of the rewards
    (centring) and of their scale (Hoyer). Our reading of Self-Paced GRPO's "saturation (low
    variance) / sparsity" signal (arXiv 2511.19356; TeleBoost §3.4; DESIGN: group-centred rewards).

    Args:
        rewards: ``(..., G)``, ``G >= 2``.

    Returns:
        ``(...)`` in ``[0, 1]``.
    """
    deviation = (rewards - rewards.mean(-1, keepdim=True)).abs()
    flat = deviation.amax(-1) <= 1e-12 * rewards.abs().amax(-1).clamp(min=1.0)
    return torch.where(flat, torch.ones_like(flat, dtype=rewards.dtype), hoyer_sparsity(deviation))


def self_paced_weights(components: Tensor, tau: Tensor, beta: float = 1.0, temperature: float = 1.0) -> Tensor:
    """Self-Paced GRPO curriculum weights (arXiv 2511.19356; TeleBoost §3.4; DESIGN §3 as corrected
    2026-11-29).

    For reward components ``j = 1..K`` in curriculum order (e.g. visual, motion, text), per group:
    competence ``c_j = sigmoid((mean r_j - τ_j)/T)``, saturation ``S_j`` (:func:`group_saturation`),
    mastery ``m_j = 1 - (1 - c_j)·(1 - β·S_j)`` (mastered when competent *or* saturated), and the
    weights pass down the curriculum stage by stage ("stick-breaking"):

    ``w_1 = 1 - m_1``, ``w_j = m_1···m_{j-1}·(1 - m_j)``, ``w_K = m_1···m_{K-1}``,

    which sum to 1. Mastering stage ``j`` closes it and opens stage ``j+1``: raising ``mean r_1``
    above ``τ_1`` lowers ``w_1`` and raises ``w_2``; a saturated (zero-variance) ``r_1`` with
    ``β = 1`` hands all of stage 1's weight on. Adding a constant to a component's rewards and to its
    ``τ`` leaves ``w`` unchanged. The paper gives the signals (competence against a threshold,
    saturation as low variance / sparsity) but no closed formula that we could check against code:
    this product form is our choice.

    Args:
        components: ``(G, K)`` rewards of one group, or ``(N, G, K)`` for ``N`` groups, ``G >= 2``.
        tau: ``(K,)`` competence thresholds ``τ_j`` (in each component's units).
        beta: weight ``β ∈ [0, 1]`` of saturation in the mastery (0: competence only).
        temperature: ``T > 0`` (reward units).

    Returns:
        ``(K,)`` or ``(N, K)`` weights on the simplex.

    Raises:
        ValueError: on ``temperature <= 0``, ``beta`` outside ``[0, 1]`` or a wrong ``tau`` shape.
    """
    if temperature <= 0:
        raise ValueError(f"self_paced_weights: temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"self_paced_weights: beta must be in [0, 1], got {beta}")
    squeeze = components.dim() == 2
    c = components.unsqueeze(0) if squeeze else components
    tau = torch.as_tensor(tau, dtype=c.dtype, device=c.device)
    if tau.shape != (c.shape[-1],):
        raise ValueError(f"self_paced_weights: tau must have shape ({c.shape[-1]},), got {tuple(tau.shape)}")
    competence = torch.sigmoid((c.mean(1) - tau) / temperature)  # (N, K)
    saturation = group_saturation(c.transpose(1, 2))  # (N, K)
    mastery = 1.0 - (1.0 - competence) * (1.0 - beta * saturation)
    reached = torch.cumprod(torch.cat([torch.ones_like(mastery[:, :1]), mastery[:, :-1]], dim=1), dim=1)  # m_1···m_{j-1}
    stay = torch.cat([1.0 - mastery[:, :-1], torch.ones_like(mastery[:, :1])], dim=1)
    w = reached * stay
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


def _unit_interval(x: Tensor, constant: float) -> Tensor:
    """Min–max to ``[0, 1]``; a constant input (range ``<= 1e-8``) gives ``constant`` everywhere."""
    lo, hi = x.min(), x.max()
    return torch.full_like(x, constant) if float(hi - lo) <= 1e-8 else (x - lo) / (hi - lo)


def vipo_advantage_map(
    features: Tensor, latent_size: tuple[int, int, int], blur_sigma: float = 1.0, components: int = 3, sign_rule: str = "none"
) -> Tensor:
    """ViPO's Perceptual Structuring Module map for one video (arXiv 2511.18719), step by step as
    TeleBoost's reference code (``teleboost/algorithms/vipo.py``, ``compute_dinov2_feature_map_reverse``
    with ``pca_method="weighted"``):

    1. per frame, patch features ``(h·w, C)`` centred over the patches; top-``components`` PCA by
       ``numpy.linalg.svd`` (float64 here; the reference runs it on float32 features);
       ``explained = s_k² / (Σ_{top} s² + 1e-8)``;
    2. each component reversed and min–max'd over the frame, ``(max - x)/(max - min)`` (0.5 for a
       constant component), summed with the ``explained`` weights, clipped to ``[0, 1]``;
    3. Gaussian blur ``σ = blur_sigma`` in patch cells (``scipy.ndimage.gaussian_filter``, its
       defaults: mode ``reflect``, truncate 4), then min–max over the frame (constant → 0.5);
    4. bilinear resize to the latent grid (``align_corners=False``, ``antialias=True``), min–max over
       the frame (constant → all ones);
    5. if the frame count differs from the latent frames, trilinear resampling in time
       (``align_corners=False``); finally min–max over the whole volume (constant → all ones: the
       map then reduces ViPO to GRPO).

    ``sign_rule="none"`` (reference): the components keep LAPACK's signs, as the reference does (the
    ``max - x`` reversal then follows that sign); ``"svd_flip"``: sklearn's rule (largest-|loading|
    positive), a deterministic sign independent of the LAPACK build (our option).

    Args:
        features: ``(T, C, h, w)`` frozen-backbone patch features of the video's frames.
        latent_size: ``(T', h', w')`` of the latents the map weights.
        blur_sigma: Gaussian blur std in feature-grid cells (paper and reference: 1; 0 disables).
        components: PCA components kept (reference: 3).
        sign_rule: ``"none"`` or ``"svd_flip"``.

    Returns:
        ``M`` of shape ``(T', h', w')`` in ``[0, 1]``, float32, on the features' device.

    Raises:
        ValueError: on an unknown ``sign_rule`` or features that are not 4-D.
    """
    import numpy as np
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    if sign_rule not in ("none", "svd_flip"):
        raise ValueError(f"vipo_advantage_map: sign_rule must be 'none' or 'svd_flip', got {sign_rule!r}")
    if features.dim() != 4:
        raise ValueError(f"vipo_advantage_map: features must be (T, C, h, w), got {tuple(features.shape)}")
    t, c, h, w = features.shape
    t_lat, h_lat, w_lat = latent_size
    frames = []
    for feats in features.detach().double().cpu().reshape(t, c, h * w).transpose(1, 2).numpy():  # (P, C) per frame
        centered = feats - feats.mean(axis=0, keepdims=True)
        _, sv, vt = np.linalg.svd(centered, full_matrices=False)
        k = min(components, vt.shape[0])
        if sign_rule == "svd_flip":
            vt = vt * np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(1)])[:, None]
        proj = centered @ vt[:k].T  # (P, k)
        explained = np.pad(sv[:k] ** 2, (0, components - k))
        explained = explained / (explained.sum() + 1e-8)
        weights = np.zeros(h * w)
        for j in range(k):
            lo, hi = proj[:, j].min(), proj[:, j].max()
            weights += explained[j] * ((hi - proj[:, j]) / (hi - lo) if hi > lo else np.full(h * w, 0.5))
        m = np.clip(weights, 0.0, 1.0).reshape(h, w)
        if blur_sigma > 0:
            m = gaussian_filter(m, sigma=blur_sigma)
        m = _unit_interval(torch.from_numpy(m), 0.5)
        m = F.interpolate(m[None, None], size=(h_lat, w_lat), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        frames.append(_unit_interval(m, 1.0))
    maps = torch.stack(frames)
    if t != t_lat:
        maps = F.interpolate(maps[None, None], size=(t_lat, h_lat, w_lat), mode="trilinear", align_corners=False)[0, 0]
    return _unit_interval(maps, 1.0).float().to(features.device)
