"""BPGO: Bayesian Prior-Guided Optimization (arXiv 2511.18919; TeleBoost §3.3; DESIGN §3)."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from lightning_vidalign.algorithms.advantages import (
    bpgo_group_weights,
    contrastive_reward_transform,
    crt_rerange,
    group_mean,
    grpo_advantages,
    ras_bayes_weight,
)
from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.rollouts import Rollouts
from lightning_vidalign.rewards.base import repeat_batch

CRT_FORMS = ("binary", "paper", "none")
RAS_FORMS = ("bayes", "paper", "none")


class BPGO(GRPO):
    """GRPO whose advantages are anchored to a prior reward per condition (Bayesian Prior-Guided
    Optimization, arXiv 2511.18919).

    Defaults follow TeleBoost's released code (``teleboost/algorithms/bgpo.py``, ``programs/wan/
    bgpo.py``; "the paper's equations describe it at a higher level"); the paper's forms are options:

    - ``crt="binary"`` (reference): Contrastive Reward Transformation :func:`crt_rerange`
      ``R̃ = (a(R - R_prior) + 1[R > R_prior])·R·sigmoid(R/τ)`` *replaces* the rewards, then the group
      advantage of ``R̃``. ``crt="paper"``: ``r̃ = (λ_c(r - r_prior) + 1[r > r_prior])·exp(r)``
      (:func:`contrastive_reward_transform`), whose group advantage is *added* with weight ``ς``
      (``crt_weight``) to that of ``r``. ``crt="none"``: no transformation.
    - ``ras="bayes"`` (reference): Reliability-Adaptive Scaling with :func:`ras_bayes_weight` on the
      group's (rearranged) rewards, group scale ``clamp(1 + α(w_bayes - 1), min_scale, max_scale)``.
      ``ras="paper"``: ``1 + α(2σ(k(mean_g r - r_prior)) - 1)`` (:func:`bpgo_group_weights`).
      ``ras="none"``: scale 1.
    - ``r_prior``: the reference policy's expected reward for the condition — the mean reward of
      ``prior_rollouts`` rollouts of the base model (adapters disabled, the training SDE), computed
      the first time a condition is seen and cached with the run (checkpointed; the draw is seeded
      by ``(seed, condition id)`` only, so every rank and every resume gets the same prior);
      or ``batch["prior"]`` when the data provides it (the reference reads it from the data only).

    Final advantage ``clip(scale_g·A, ±advantage_clip)``. The reference's ``bayes`` rule compares the
    *rearranged* rewards with the raw prior (as released; kept). Its group advantage divides by the
    unbiased group std; ours keeps GRPO's population std (flow_grpo, SAGE-GRPO): with ``G`` rollouts
    the two differ by the constant ``sqrt(G/(G-1))``. Combined with a min-norm joint reward per loss,
    BPGO raises (the reference refuses BGPO with a joint reward too).

    Logged: ``bpgo/group_weight_{mean,min,max}``, ``bpgo/prior_mean``, ``bpgo/gap_mean``,
    ``bpgo/priors_cached``.

    Args:
        crt: ``"binary" | "paper" | "none"``.
        crt_a, crt_temperature: ``a`` and ``τ`` of the reference CRT (reference: 50, 5).
        crt_shift: constant added to rewards and prior before the reference CRT, which keeps the
            order only where ``R > max(p, 0)`` and, below the prior, roughly where ``R > p/2``
            (:func:`crt_rerange`; the reference's reward models score ``>= 0``). Set it so that
            shifted rewards are ``>= 0`` (a negative one raises) and, to keep the order of samples far
            below the prior, above half the shifted prior: for rewards ``>= r_min`` and priors ``<= p_max``,
            ``crt_shift >= p_max - 2·r_min``. The share of samples below half the shifted prior is logged
            as ``bpgo/crt_below_half_prior``.
        crt_lambda, crt_weight: ``λ_c`` and ``ς`` of the paper's CRT.
        ras: ``"bayes" | "paper" | "none"``.
        alpha: RAS strength ``α`` (reference ``regularization_term_alpha``: 1.0; paper: 0.5).
        prior_var, weight_range: of the ``bayes`` rule (reference: 1.0, (0.5, 1.5)).
        min_scale, max_scale: clamp of the ``bayes`` group scale (reference: 0.01, 10).
        k: slope of the paper's RAS (our default 1).
        prior_rollouts: rollouts of the reference policy per condition for its prior.
        **kwargs: :class:`GRPO` arguments.

    Raises:
        ValueError: on an unknown ``crt``/``ras``, ``prior_rollouts < 1``, or a joint reward combined
            per loss.
    """

    def __init__(
        self,
        *args,
        crt: str = "binary",
        crt_a: float = 50.0,
        crt_temperature: float = 5.0,
        crt_shift: float = 0.0,
        crt_lambda: float = 1.0,
        crt_weight: float = 0.5,
        ras: str = "bayes",
        alpha: float = 1.0,
        prior_var: float = 1.0,
        weight_range: tuple[float, float] = (0.5, 1.5),
        min_scale: float = 0.01,
        max_scale: float = 10.0,
        k: float = 1.0,
        prior_rollouts: int = 4,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if crt not in CRT_FORMS:
            raise ValueError(f"BPGO: crt must be one of {CRT_FORMS}, got {crt!r}")
        if ras not in RAS_FORMS:
            raise ValueError(f"BPGO: ras must be one of {RAS_FORMS}, got {ras!r}")
        if prior_rollouts < 1:
            raise ValueError(f"BPGO: prior_rollouts must be >= 1, got {prior_rollouts}")
        if self.reward_combination == "min_norm" and self.joint_combination == "loss":
            raise ValueError("BPGO: a min-norm joint reward combined per loss would bypass the BPGO scaling; use joint_combination='advantage'")
        if self.reward_combination == "min_norm" and crt == "binary":
            raise ValueError("BPGO: crt='binary' rearranges the summed reward, which a min-norm joint reward (combining per-reward "
                             "advantages) would ignore; use crt='paper' or 'none' with reward_combination='min_norm'")
        self.crt, self.crt_a, self.crt_temperature, self.crt_lambda, self.crt_weight = crt, crt_a, crt_temperature, crt_lambda, crt_weight
        self.crt_shift = crt_shift
        self.ras, self.alpha, self.prior_var, self.weight_range = ras, alpha, prior_var, tuple(weight_range)
        self.min_scale, self.max_scale, self.k = min_scale, max_scale, k
        self.prior_rollouts = prior_rollouts
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
            reward, _ = self.score_rewards(traj.video, self.reward_names, batch=repeat_batch(one, self.prior_rollouts, 1), log=False)
            self.priors[cid] = float(reward.mean())
        return torch.tensor([self.priors[int(c)] for c in ids], dtype=torch.float32)

    def compute_advantages(self, everyone: Rollouts, batch: dict) -> Tensor:
        rewards, group_ids, g = everyone.rewards, everyone.group_ids, self.rollouts_per_condition
        prior = self.gather(self.condition_priors(batch).to(rewards.device).repeat_interleave(g))
        raw_mean = group_mean(rewards, group_ids)
        ras_prior = prior  # the reference compares the (rearranged) group rewards with the prior
        if self.crt == "binary":
            shifted, shifted_prior = rewards + self.crt_shift, prior + self.crt_shift
            if bool((shifted < 0).any() or (shifted_prior < 0).any()):
                low = float(torch.minimum(shifted.min(), shifted_prior.min()))
                raise ValueError(
                    f"BPGO: crt='binary' needs rewards and priors >= 0 after crt_shift={self.crt_shift} (lowest: {low:.4g}); "
                    "its rearrangement R̃ = (a(R - p) + 1[R > p])·R·sigmoid(R/τ) reverses the order of negative rewards. "
                    "Raise crt_shift, or use crt='paper' / 'none'."
                )
            self.log("bpgo/crt_below_half_prior", (shifted < shifted_prior / 2).float().mean(), batch_size=rewards.numel())
            rewards, ras_prior = crt_rerange(shifted, shifted_prior, self.crt_a, self.crt_temperature), shifted_prior
        adv = self.group_advantages(rewards, group_ids, everyone.components)
        if self.crt == "paper":
            crt_adv, _ = grpo_advantages(contrastive_reward_transform(rewards, prior, self.crt_lambda), group_ids, self.advantage_eps, self.advantage_clip)
            adv = adv + self.crt_weight * crt_adv
        if self.ras == "bayes":
            _, inverse = torch.unique(group_ids, return_inverse=True)
            per_group = torch.stack([
                ras_bayes_weight(rewards[inverse == i], ras_prior[inverse == i][0], self.prior_var, self.weight_range) for i in range(int(inverse.max()) + 1)
            ])
            weights = (1.0 + self.alpha * (per_group[inverse] - 1.0)).clamp(self.min_scale, self.max_scale)
        elif self.ras == "paper":
            weights = bpgo_group_weights(raw_mean, prior, self.alpha, self.k)
        else:
            weights = torch.ones_like(rewards)
        self.log_dict(
            {
                "bpgo/group_weight_mean": weights.mean(),
                "bpgo/group_weight_min": weights.min(),
                "bpgo/group_weight_max": weights.max(),
                "bpgo/prior_mean": prior.mean(),
                "bpgo/gap_mean": (raw_mean - prior).mean(),  # in reward units, before CRT
                "bpgo/priors_cached": float(len(self.priors)),
            },
            batch_size=rewards.numel(),
        )
        return (weights * adv).clamp(-self.advantage_clip, self.advantage_clip)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bpgo_priors"] = dict(self.priors)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.priors = {int(k): float(v) for k, v in checkpoint.get("bpgo_priors", {}).items()}
