"""Flow-DPPO: divergence-masked policy optimization for flow models (UniRL ``unirl/algorithms/flowdppo.py``)."""
from __future__ import annotations

from torch import Tensor

from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.algorithms.losses import dppo_masked_loss
from lightning_vidalign.sampling import gaussian_kl


class FlowDPPO(GRPO):
    """GRPO with the ratio clip replaced by a trust region on the exact Gaussian KL of each step.

    Old and current step distributions share the covariance ``std²·I``, so their KL is exactly
    ``KL = mean((μ_old - μ_θ)²)/(2·std²)`` (:func:`~lightning_vidalign.sampling.gaussian_kl`, ``std = σ_t·sqrt(Δ)`` the
    full transition std; mean over elements, as the reference). A sample is dropped when ``KL ≥ kl_mask_threshold`` and
    its ratio moves further the way its advantage pushes (``ρ > 1, A > 0`` or ``ρ < 1, A < 0``); every other sample keeps
    the unclipped ``-A·ρ`` (:func:`~lightning_vidalign.algorithms.losses.dppo_masked_loss`). ``clip_range`` is not used.

    Reference: Tencent-Hunyuan/UniRL ``unirl/algorithms/flowdppo.py`` (``_flowdppo_kl_adv_loss``; defaults
    ``kl_mask_threshold=1e-5``, ``add_kl_coefficient=True``), matched; verl-omni's ``FlowDPPOLoss`` is the same. The old
    means are the rollout's (UniRL replays them without grad before the first update: the same values up to the
    forward's batch composition). The UniRL recipe trains 3 steps in the first half of 10 (``sde_window``) with 2
    updates per batch (``minibatches_per_round``).

    Logged besides GRPO's: ``train/mask_frac`` (share of dropped samples), ``train/step_kl``.

    Args:
        kl_mask_threshold: ``τ >= 0`` (UniRL: 1e-5).
        **kwargs: :class:`GRPO` arguments (``sde_type`` default ``flow_grpo``).

    Raises:
        ValueError: on ``kl_mask_threshold < 0`` or a min-norm joint reward combined per loss.
    """

    keep_means = True  # the rollout's transition means μ_old

    def __init__(self, *args, kl_mask_threshold: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        if kl_mask_threshold < 0:
            raise ValueError(f"FlowDPPO: kl_mask_threshold must be >= 0, got {kl_mask_threshold}")
        self.kl_mask_threshold = kl_mask_threshold

    def policy_loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, x_next: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, dict]:
        old_mean = self.rollouts.means[self.current_index, self.current_step]
        kl = gaussian_kl(mean.detach(), old_mean, std)
        return dppo_masked_loss(log_prob, old_log_prob, advantages, kl, self.kl_mask_threshold)
