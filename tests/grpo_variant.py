"""A new method on the round's phases (docs: Extend, "A GRPO variant"): a GRPO variant that changes only the policy loss."""
import torch

from lightning_vidalign.algorithms import GRPO


class UnclippedGRPO(GRPO):
    """GRPO without the PPO clip: ``L = -A·ρ``, ``ρ = exp(log π_θ - log π_old)`` (an example, not a paper's method).

    Generation, rewards, group advantages, KL, minibatching and checkpoints are GRPO's, unchanged.
    """

    def policy_loss(self, log_prob, old_log_prob, advantages, x_next, mean, std):
        ratio = torch.exp(log_prob - old_log_prob.detach())
        return -advantages * ratio, {"ratio": ratio.detach().mean()}
