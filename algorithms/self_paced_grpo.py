"""Self-Paced GRPO: a competence-aware curriculum over reward components (arXiv 2511.19356 v4;
TeleBoost §3.4; DESIGN §3)."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_vidalign.algorithms.advantages import group_saturation, grpo_advantages, self_paced_weights
from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.rollouts import Rollouts


class SelfPacedGRPO(GRPO):
    """GRPO on a combined reward whose component weights follow the generator's competence.

    Components ``j = 1..K`` are reward callbacks named in curriculum order (paper: visual fidelity,
    temporal/motion, text alignment). Per group of ``G`` rollouts, competence
    ``c_j = sigmoid((mean r_j - τ_j)/T)``, saturation ``S_j`` (Hoyer sparsity of the group-centred
    deviations, 1 for zero variance), mastery ``m_j = 1 - (1 - c_j)(1 - β·S_j)``, and weights passed
    down the curriculum ``w_j = m_1···m_{j-1}·(1 - m_j)`` (:func:`self_paced_weights`); combined reward
    ``Σ_j w_j r_j`` per rollout, then group advantages. A component that is mastered (mean past
    ``τ_j``) or saturated hands its weight to the next one.

    ``τ_j`` are configured (in each component's own units), not calibrated: our choice — set them
    near the reward a competent model reaches (e.g. the real clips' score for that reward).
    Logged over training: ``curriculum/w_<name>`` (mean over groups), ``curriculum/saturation_<name>``.

    Args:
        components: reward-callback names in curriculum order (K >= 1); they are also the rewards
            used (``rewards``).
        tau: ``(K,)`` thresholds. beta: saturation weight ``β ∈ [0, 1]``. temperature: ``T``.
        **kwargs: :class:`GRPO` arguments.
    """

    def __init__(self, *args, components: list[str], tau: list[float], beta: float = 1.0, temperature: float = 1.0, **kwargs):
        kwargs.setdefault("rewards", list(components))
        super().__init__(*args, **kwargs)
        if not components or len(tau) != len(components):
            raise ValueError(f"SelfPacedGRPO: need one tau per component, got components={components}, tau={tau}")
        self.components, self.tau, self.sp_beta, self.temperature = list(components), list(tau), beta, temperature

    def compute_advantages(self, everyone: Rollouts, batch: dict) -> Tensor:
        rewards, group_ids = everyone.rewards, everyone.group_ids
        missing = [c for c in self.components if c not in everyone.components]
        if missing:
            raise KeyError(f"SelfPacedGRPO: component reward(s) {missing} not scored this round (have {sorted(everyone.components)})")
        g = self.rollouts_per_condition
        comps = torch.stack([everyone.components[c] for c in self.components], dim=-1)  # (N, K)
        grouped = comps.view(-1, g, comps.shape[-1])  # rollouts of a condition are contiguous
        weights = self_paced_weights(grouped, torch.tensor(self.tau), self.sp_beta, self.temperature)  # (N/G, K)
        combined = (grouped * weights.unsqueeze(1)).sum(-1).flatten()
        adv, zero_frac = grpo_advantages(combined, group_ids, self.advantage_eps, self.advantage_clip)
        saturation = group_saturation(grouped.transpose(1, 2)).mean(0)
        self.log_dict(
            {
                "train/zero_std_groups": zero_frac,
                **{f"curriculum/w_{c}": weights[:, j].mean() for j, c in enumerate(self.components)},
                **{f"curriculum/saturation_{c}": saturation[j] for j, c in enumerate(self.components)},
            },
            batch_size=rewards.numel(),
        )
        return adv
