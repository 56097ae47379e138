"""BPGO: Bayesian Prior-Guided Optimization (arXiv 2511.18919; TeleBoost §3.3; DESIGN §3)."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from lightning_vidalign.algorithms.advantages import (
    bpgo_group_weights,
    bpgo_posterior_gap,
    contrastive_reward_transform,
    group_mean,
    group_std,
    grpo_advantages,
)
from lightning_vidalign.algorithms.grpo import GRPO


class BPGO(GRPO):
    """GRPO whose advantages are anchored to a prior reward per condition.

    ``A = w_g · (A_grpo(r) + ς·A_grpo(r̃))``, clipped to ``±advantage_clip``, where

    - ``r_prior``: the reference policy's expected reward for the condition — the mean reward of
      ``prior_rollouts`` rollouts of the base model (adapters disabled, the training SDE), computed
      the first time a condition is seen and cached with the run (checkpointed; the draw is seeded
      by ``(seed, condition id)`` only, so every rank and every resume gets the same prior);
      or ``batch["prior"]`` when the data provides it;
    - ``w_g`` (Reliability-Adaptive Scaling, :func:`bpgo_group_weights`): ``ras="paper"``:
      ``1 + α(2σ(k(mean_g r - r_prior)) - 1)``; ``ras="posterior"``: the same of the
      reliability-shrunk gap of :func:`bpgo_posterior_gap` (our reading of TeleBoost's Bayesian form);
    - ``r̃`` (Contrastive Reward Transformation, :func:`contrastive_reward_transform`), whose own group
      advantage enters with weight ``ς`` (``crt_weight``).

    Logged: ``bpgo/group_weight_{mean,min,max}``, ``bpgo/prior_mean``, ``bpgo/gap_mean``,
    ``bpgo/priors_cached``.

    Args:
        alpha, k: RAS range and slope (paper α = 0.5; k our default 1).
        ras: ``"paper"`` or ``"posterior"``; prior_var: prior variance of the posterior form.
        crt_lambda: ``λ_c`` of CRT; crt_weight: ``ς`` (0 disables CRT).
        prior_rollouts: rollouts of the reference policy per condition for its prior.
        **kwargs: :class:`GRPO` arguments.
    """

    def __init__(
        self,
        *args,
        alpha: float = 0.5,
        k: float = 1.0,
        ras: str = "paper",
        prior_var: float = 1.0,
        crt_lambda: float = 1.0,
        crt_weight: float = 0.5,
        prior_rollouts: int = 4,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if ras not in ("paper", "posterior"):
            raise ValueError(f"BPGO: ras must be 'paper' or 'posterior', got {ras!r}")
        if prior_rollouts < 1:
            raise ValueError(f"BPGO: prior_rollouts must be >= 1, got {prior_rollouts}")
        self.alpha, self.k, self.ras, self.prior_var = alpha, k, ras, prior_var
        self.crt_lambda, self.crt_weight, self.prior_rollouts = crt_lambda, crt_weight, prior_rollouts
        self.priors: dict[int, float] = {}

    @torch.no_grad()
    def condition_priors(self, batch: dict) -> Tensor:
        """``(B,)`` prior rewards of the batch's conditions (cached, or from ``batch["prior"]``)."""
        if "prior" in batch:
            return torch.as_tensor(batch["prior"], dtype=torch.float32).view(-1)
        ids = self.condition_ids(batch).tolist()
        missing = [i for i, cid in enumerate(ids) if int(cid) not in self.priors]
        # every rank must run the same number of (sharded) forwards: pad with throw-away rollouts up to
        # the largest number of missing priors on any rank
        n_max = len(missing)
        if self._trainer is not None and self.trainer.world_size > 1:
            n_max = int(self.trainer.strategy.reduce(torch.tensor(float(len(missing)), device=self.device), reduce_op="max"))
        video = batch["video"]
        for j in range(n_max):
            i = missing[j] if j < len(missing) else 0
            cid = int(ids[i])
            key = f"bpgo-prior/{self.seed}/{cid}".encode()
            gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))
            one = {k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in batch.items()}
            with self.backbone.adapters_disabled():
                cond = self.backbone.encode_condition(one, gen)
                cond = {k: v.repeat_interleave(self.prior_rollouts, 0) for k, v in cond.items()}
                traj = self.backbone.rollout(cond, self.sde_type, self.num_inference_steps, self.guidance, gen,
                                             num_frames=video.shape[1], height=video.shape[-2], width=video.shape[-1], eta=self.eta)
            if j >= len(missing):
                continue  # padding rollout: keeps the ranks' collective calls aligned
            reward, _ = self.score_rewards(traj.video, self.reward_names, log=False)
            self.priors[cid] = float(reward.mean())
        return torch.tensor([self.priors[int(c)] for c in ids], dtype=torch.float32)

    def compute_advantages(self, rewards: Tensor, group_ids: Tensor, batch: dict) -> Tensor:
        g = self.rollouts_per_condition
        prior = self.gather(self.condition_priors(batch).to(rewards.device).repeat_interleave(g))
        base = self.group_advantages(rewards, group_ids)
        crt = contrastive_reward_transform(rewards, prior, self.crt_lambda)
        crt_adv, _ = grpo_advantages(crt, group_ids, self.advantage_eps, self.advantage_clip)
        mean = group_mean(rewards, group_ids)
        if self.ras == "posterior":
            gap = bpgo_posterior_gap(mean, group_std(rewards, group_ids) ** 2, g, prior, self.prior_var)
            weights = bpgo_group_weights(gap, torch.zeros_like(gap), self.alpha, self.k)
        else:
            weights = bpgo_group_weights(mean, prior, self.alpha, self.k)
        self.log_dict(
            {
                "bpgo/group_weight_mean": weights.mean(),
                "bpgo/group_weight_min": weights.min(),
                "bpgo/group_weight_max": weights.max(),
                "bpgo/prior_mean": prior.mean(),
                "bpgo/gap_mean": (mean - prior).mean(),
                "bpgo/priors_cached": float(len(self.priors)),
            },
            batch_size=rewards.numel(),
        )
        return (weights * (base + self.crt_weight * crt_adv)).clamp(-self.advantage_clip, self.advantage_clip)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bpgo_priors"] = dict(self.priors)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.priors = {int(k): float(v) for k, v in checkpoint.get("bpgo_priors", {}).items()}
