"""GRPO-Guard: regulated clipping for flow-matching GRPO (Wang et al. 2025, arXiv 2510.22319)."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.algorithms.losses import grpo_guard_step_weight, ppo_clip_loss, ratio_norm_log_ratio


class GRPOGuard(GRPO):
    """Flow-GRPO with per-step ratio normalisation (RatioNorm) and per-step gradient reweighting.

    On the Flow-GRPO SDE the per-step log-ratio ``log π_θ - log π_old`` has mean ``-mean(Δμ²)/(2·std²)``: negative,
    and larger at the low-noise steps, so the PPO clip acts one-sidedly there and over-optimisation slips through on the
    others. RatioNorm (:func:`~lightning_vidalign.algorithms.losses.ratio_norm_log_ratio`) re-centres and rescales it:
    ``log ρ̂ = (log π_θ - log π_old + mean((μ_θ - μ_old)²)/(2·(std² + 1e-6)))·std``, ``std`` the step's full transition std
    ``σ_t·sqrt(Δ)``; the PPO-clip term on ``ρ̂`` is then multiplied by ``δ_t = 1/(Δ + 1e-6)`` (Flow-GRPO SDE) or
    ``(1 + η²(1-s)/(2s))/(Δ + 1e-6)`` (DanceGRPO SDE) (:func:`~lightning_vidalign.algorithms.losses.grpo_guard_step_weight`),
    which cancels the ``Δ`` of ``∂μ/∂θ`` so the steps' gradients are comparable.

    Reference: Tele-AI/TeleBoost ``teleboost/algorithms/grpo_guard.py`` (``compute_ratio_norm_bias``,
    ``compute_grad_reweight_delta``) and its actor, matched; the bias is differentiated, as there. Difference: the
    reference collapses ``std`` and ``Δ`` to batch means (all samples of its micro-batch sit at one step); ours are
    per sample (each rollout trains its own steps, ``timestep_selection="per_sample"``), equal to it when the samples
    share a step. Flow-Factory's port has RatioNorm without ``δ_t`` (``grad_reweight=None``).

    Logged besides GRPO's: ``train/ratio_raw`` (the un-normalised ratio) and ``train/step_weight`` (mean ``δ_t``).

    Args:
        ratio_norm: apply RatioNorm (False: the plain ratio).
        grad_reweight: ``"auto"`` (the form of ``sde_type``: ``flow_grpo`` or ``dance_grpo``), ``"flow_grpo"``,
            ``"dance_grpo"`` or None (no ``δ_t``).
        **kwargs: :class:`GRPO` arguments (``sde_type`` default ``flow_grpo``, ``clip_range`` 1e-4).

    Raises:
        ValueError: for ``grad_reweight="auto"`` with an SDE other than ``flow_grpo``/``dance_grpo``, an unknown form,
            RatioNorm on CPS's non-Gaussian reference log-prob, or a min-norm joint reward combined per loss.
    """

    keep_means = True  # the rollout's transition means μ_old

    def __init__(self, *args, ratio_norm: bool = True, grad_reweight: str | None = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if grad_reweight == "auto":
            if self.sde_type not in ("flow_grpo", "dance_grpo"):
                raise ValueError(f"GRPOGuard: grad_reweight='auto' has a form for the flow_grpo and dance_grpo SDEs only, got sde_type={self.sde_type!r}; "
                                 "set grad_reweight to 'flow_grpo', 'dance_grpo' or null")
            grad_reweight = self.sde_type
        if grad_reweight not in (None, "flow_grpo", "dance_grpo"):
            raise ValueError(f"GRPOGuard: grad_reweight must be 'auto', 'flow_grpo', 'dance_grpo' or null, got {grad_reweight!r}")
        if ratio_norm and self.sde_type == "cps" and self.log_prob_form == "reference":
            raise ValueError("GRPOGuard: RatioNorm assumes Gaussian step log-probs; with sde_type cps set log_prob_form: gaussian")
        self.ratio_norm, self.grad_reweight = ratio_norm, grad_reweight

    def policy_loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, x_next: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, dict]:
        old_mean = self.rollouts.means[self.current_index, self.current_step]
        step_std = torch.as_tensor(std, dtype=torch.float32, device=log_prob.device).flatten()  # (n,) or (1,): σ_t·sqrt(Δ)
        if self.ratio_norm:
            log_ratio = ratio_norm_log_ratio(log_prob, old_log_prob, mean, old_mean, step_std)
        else:
            log_ratio = log_prob - old_log_prob.detach()
        loss, metrics = ppo_clip_loss(log_ratio, torch.zeros_like(log_ratio), advantages, self.clip_range)
        metrics["ratio_raw"] = torch.exp(log_prob - old_log_prob).detach().mean()
        if self.grad_reweight is not None:
            t = self.current_step.cpu()
            weight = grpo_guard_step_weight(self.rollouts.sigmas[t], self.rollouts.sigmas[t + 1], self.grad_reweight, self.eta).to(loss.device)
            loss = loss * weight
            metrics["step_weight"] = weight.mean()
        return loss, metrics
