"""AWM: Advantage Weighted Matching (Xue et al. 2025; scxue/advantage_weighted_matching)."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_vidalign.algorithms.forward_process import ForwardProcessGRPO
from lightning_vidalign.algorithms.losses import AWM_WEIGHTINGS, awm_log_likelihood, ppo_clip_loss


class AWM(ForwardProcessGRPO):
    """The flow-matching loss on the model's own clean samples, weighted by the group advantage.

    Per rollout and trained level ``s``: ``mse = mean((v_θ(x_s) - (ε - x0))²)``, the surrogate log-likelihood
    ``log p = -((mse + 1e-10)^p - 1e-10^p)·s/p`` (:func:`~lightning_vidalign.algorithms.losses.awm_log_likelihood`,
    ``weighting="ghuber"``, ``p = 0.25``), and the PPO form ``max(-Â·ρ, -Â·clip(ρ, 1±ε))`` with
    ``Â = clip(A, ±Z)/Z``, ``ρ = exp(log p - sg(log p)) = 1`` (on-policy: the reference's ``off_policy=False``, where
    the clip never acts): the gradient is ``-Â·∇log p``. Plus ``kl_coef·mean((v_θ - v_ref)²)`` (the base model) and
    ``ema_kl_coef·mean((v_θ - v_old)²)`` with ``θ_old`` the adapters' EMA (``d = min(0.001·step, 0.3)``, "KL-EMA,
    mimic TRPO"). The rollouts come from the current policy.

    How it differs from SHIFT's advantage-weighted term (:func:`~lightning_vidalign.algorithms.losses.shift_loss`):
    SHIFT weights the plain denoising MSE by the (group-centred, unscaled) advantage at the backbone's training noise
    distribution and adds an SFT anchor on real clips; AWM has no real data, normalises the advantage (``/Z``), trains at
    levels of the sampling schedule, and — by default — differentiates a concave transform of the MSE
    (``ghuber``: ``∇ = s·mse^(p-1)·∇mse``, which up-weights already well-fitted samples and high noise levels);
    ``weighting="uniform"`` gives ``-Â·∇mse``, SHIFT's advantage term up to the advantage's scale and the level
    distribution.

    Reference (scxue/advantage_weighted_matching ``scripts/train_sd3_awm.py``, matched): ``loss_type="exp_first"``,
    ``weighting="ghuber"``, ``power=0.25``, the levels ``discrete_wo_init`` — one stratified draw of ``k`` schedule
    indices in ``[1, int(0.9·S)]`` (level 1.0 excluded) shared by the rollouts (:meth:`train_steps`; ours once per round,
    the reference's once per micro-batch), the
    advantage over the global std, ``kl_coef`` per task (GenEval 0.001; OCR 0.003; PickScore 1e-4), ``ema_kl_coef = 1``.
    Flow-Factory's port records real old log-probs (ratio ≠ 1 after the first optimizer step); ours keeps the
    reference's on-policy ratio.

    Args:
        weighting: one of :data:`~lightning_vidalign.algorithms.losses.AWM_WEIGHTINGS`.
        power: ``p`` of ``ghuber``.
        num_train_levels: ``k``, levels trained per rollout (reference: 6).
        kl_coef: velocity KL to the base model (reference GenEval: 0.001).
        ema_kl_coef: velocity KL to the EMA policy (reference: 1).
        **kwargs: :class:`~lightning_vidalign.algorithms.forward_process.ForwardProcessGRPO` / :class:`GRPO` arguments.

    Raises:
        ValueError: on an unknown ``weighting``, ``num_train_levels < 1`` or more levels than the schedule's bins
            (``num_train_levels <= int(0.9·num_inference_steps) - 1``).
    """

    def __init__(self, *args, weighting: str = "ghuber", power: float = 0.25, num_train_levels: int = 6, kl_coef: float = 0.001,
                 ema_kl_coef: float = 1.0, old_policy_decay: tuple[int, float, float] = (0, 0.001, 0.3), **kwargs):
        super().__init__(*args, kl_coef=kl_coef, old_policy_decay=old_policy_decay, **kwargs)
        if weighting not in AWM_WEIGHTINGS or num_train_levels < 1:
            raise ValueError(f"AWM: weighting must be one of {AWM_WEIGHTINGS} and num_train_levels >= 1, got {weighting!r}, {num_train_levels}")
        if num_train_levels > int(0.9 * self.num_inference_steps) - 1:
            raise ValueError(f"AWM: num_train_levels={num_train_levels} needs num_inference_steps >= {int((num_train_levels + 1) / 0.9) + 1} "
                             f"(the levels are drawn from the indices 1..int(0.9·S) = 1..{int(0.9 * self.num_inference_steps)}, one per bin), got {self.num_inference_steps}")
        self.weighting, self.power, self.num_train_levels, self.ema_kl_coef = weighting, power, num_train_levels, ema_kl_coef
        self.uses_old_velocity = ema_kl_coef > 0

    def train_steps(self, sigmas: Tensor, generator: torch.Generator, num_samples: int) -> Tensor:
        """``discrete_wo_init``: bins ``b = linspace(1, int(0.9·S), k+1)`` (long), one index uniform in each bin
        ``[b_i, b_{i+1})``, shared by every rollout of the round (the reference draws once per micro-batch)."""
        n_levels = len(sigmas) - 1
        b = torch.linspace(1, int(n_levels * 0.9), self.num_train_levels + 1).long()
        idx = b[:-1] + (torch.rand(self.num_train_levels, generator=generator) * (b[1:] - b[:-1])).long()
        return idx.clamp(max=n_levels - 1).expand(num_samples, -1).clone()

    def forward_loss(self, velocity: Tensor, old_velocity: Tensor | None, x0: Tensor, x_t: Tensor, noise: Tensor, sigma: Tensor,
                     advantages: Tensor) -> tuple[Tensor, dict]:
        mse = ((velocity - (noise.float() - x0.float())) ** 2).flatten(1).mean(1)
        log_p = awm_log_likelihood(mse, sigma, self.weighting, self.power)
        scaled = advantages.clamp(-self.advantage_clip, self.advantage_clip).double() / self.advantage_clip
        loss, metrics = ppo_clip_loss(log_p, log_p.detach(), scaled, 1.0)
        loss = loss.float()
        metrics["mse"] = mse.detach().mean()
        if old_velocity is not None:
            ema_kl = ((velocity - old_velocity) ** 2).flatten(1).mean(1)
            loss = loss + self.ema_kl_coef * ema_kl
            metrics["kl_ema"] = ema_kl.detach().mean()
        return loss, metrics
