"""Policy optimization on the forward process: what DiffusionNFT and AWM share.

Likelihood-free methods train on noised copies of the model's own clean samples, ``x_s = (1-s)·x0 + s·ε``, with a
flow-matching style loss weighted by the rollouts' advantages — no trajectory, no per-step log-probs, any sampler
(the ODE included). The round keeps GRPO's phases: :meth:`generate` (rollouts, clean latents only), :meth:`score`
(rewards, group advantages), :meth:`update` (minibatches; each rollout trains at ``k`` noise levels of the sampling
schedule, :meth:`train_steps`; the per-sample loss is the hook :meth:`forward_loss`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.rollouts import Rollouts


def old_policy_decay(step: int, flat: int = 0, uprate: float = 0.001, uphold: float = 0.5) -> float:
    """Decay of the old policy's soft update ``θ_old ← d·θ_old + (1-d)·θ`` after ``step`` optimizer steps:
    ``d = 0`` before ``flat``, then ``min((step - flat)·uprate, uphold)`` (NVlabs DiffusionNFT ``return_decay``; AWM's
    KL-EMA uses the same ramp with ``uphold = 0.3``).

    Raises:
        ValueError: on a negative ``step``/``flat``/``uprate`` or ``uphold`` outside ``[0, 1]``.
    """
    if step < 0 or flat < 0 or uprate < 0 or not 0 <= uphold <= 1:
        raise ValueError(f"old_policy_decay: need step, flat, uprate >= 0 and uphold in [0, 1], got {step}, {flat}, {uprate}, {uphold}")
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


class ForwardProcessGRPO(GRPO):
    """Base of the forward-process methods (:class:`~lightning_vidalign.algorithms.DiffusionNFT`,
    :class:`~lightning_vidalign.algorithms.AWM`): GRPO's round with the update on noised copies of the rollouts.

    - Rollouts: ``sde_type`` (``"ode"`` allowed; no trajectory kept), under the current policy or, with
      ``sample_with_old_policy``, the old one.
    - Advantages: ``(r - mean_group)/(std + ε)`` clipped to ``±advantage_clip``, ``std`` of all the round's rewards
      (``advantage_std="global"``: flow_grpo's ``global_std=True``, the DiffusionNFT and AWM configs) or of the group.
    - Update: per minibatch, for each of the ``k`` trained levels of each rollout (:meth:`train_steps`, indices into the
      sampling schedule), fresh ``ε`` from the round's generator, ``x_s = (1-s)·x0 + s·ε`` over the generated frames,
      the velocities ``v_θ`` (with grad), ``v_old`` (old policy, :attr:`uses_old_velocity`) and ``v_ref`` (adapters off,
      when ``kl_coef > 0``), each with the module's ``guidance`` (UniRL's form: the trained policy is the sampled one;
      at ``guidance: 1``, the recipes' and NVlabs'/scxue's setting, conditional only: CFG-free); the loss per sample is
      :meth:`forward_loss` ``+ kl_coef·mean((v_θ - v_ref)²)`` (NVlabs ``train.beta``, AWM ``beta``).
    - Old policy: the adapters' copy :attr:`anchor`, set to the current policy at the first round and soft-updated after
      every round, ``θ_old ← d·θ_old + (1-d)·θ`` with ``d`` = :func:`old_policy_decay` of the optimizer steps
      (``old_policy_decay = (flat, uprate, uphold)``); checkpointed with the module.

    Args:
        sde_type: the rollout sampler (``ode`` or an SDE type).
        advantage_std: ``"global"`` | ``"group"``.
        sample_with_old_policy: draw the rollouts with the old policy's adapters.
        old_policy_decay: ``(flat, uprate, uphold)`` of the soft update.
        kl_coef: weight of the velocity KL to the base model (``kl_type`` must stay ``"none"``).
        **kwargs: :class:`GRPO` arguments (``rollouts_per_condition``, ``timestep_fraction``, ``minibatches_per_round``,
            ``advantage_clip``, ``train_batch_size``, ...; ``clip_range``, ``timestep_selection`` and the SDE log-prob
            options are unused).

    Each chunk of ``train_batch_size`` samples draws its noise from the round's generator in turn: deterministic (resume,
    DDP and FSDP2 agree), but a different ``train_batch_size`` draws other noise.

    Raises:
        ValueError: on an unknown ``advantage_std``, a ``kl_type`` other than ``"none"``, or GRPO settings that act on the
            SDE-likelihood loss only (``sde_window``, ``kl_controller``, ``equalizer``, ``reward_combination="min_norm"``).
    """

    rollout_log_probs = False
    #: :meth:`update` computes ``v_old`` under the old policy for :meth:`forward_loss`
    uses_old_velocity: bool = True

    def __init__(self, *args, sde_type: str = "ode", advantage_std: str = "global", sample_with_old_policy: bool = False,
                 old_policy_decay: tuple[int, float, float] = (0, 0.001, 0.5), **kwargs):
        super().__init__(*args, sde_type=sde_type, **kwargs)
        if advantage_std not in ("global", "group"):
            raise ValueError(f"{type(self).__name__}: advantage_std must be 'global' or 'group', got {advantage_std!r}")
        if self.kl_type != "none":
            raise ValueError(f"{type(self).__name__}: kl_type must be 'none' (the KL to the base model is the velocity term of kl_coef), got {self.kl_type!r}")
        ignored = {"sde_window": self.sde_window is not None, "kl_controller": self.kl_controller is not None, "equalizer": self.equalizer,
                   "reward_combination=min_norm": self.reward_combination != "sum"}
        if any(ignored.values()):
            raise ValueError(f"{type(self).__name__}: {[k for k, v in ignored.items() if v]} act on the SDE-likelihood loss of GRPO, "
                             "which a forward-process method does not use: leave them at their defaults")
        self.advantage_std, self.sample_with_old_policy = advantage_std, sample_with_old_policy
        self.old_policy_decay = tuple(old_policy_decay)
        _check_decay(self.old_policy_decay)

    # ----------------------------------------------------------------- phases
    def rollout_options(self) -> dict:
        return dict(eta=self.eta)  # clean latents only: no trajectory, no log-probs

    def sampling_policy(self):
        if self.anchor is None:
            self.refresh_anchor()  # θ_old = θ at the first round
        return self.anchor_weights() if self.sample_with_old_policy else contextlib.nullcontext()

    def update(self, rollouts: Rollouts) -> dict:
        """GRPO's update on the forward process, then the old policy's soft update."""
        out = super().update(rollouts)
        decay = old_policy_decay(self.updates, *self.old_policy_decay)
        current = self.backbone.trainable_state_dict()
        self.anchor = {k: decay * v + (1 - decay) * current[k].detach() for k, v in self.anchor.items()}
        self.log("train/old_policy_decay", decay, batch_size=len(rollouts))
        return out

    def sample_loss(self, rollouts: Rollouts, idx: Tensor, t: Tensor, scales: Tensor) -> tuple[Tensor, dict]:
        """Per-sample loss of rollouts ``idx`` at the levels ``sigmas[t]``: the noised copy of each clean latent, the
        velocities, :meth:`forward_loss` plus the velocity KL to the base model."""
        cond = {key: v[idx] for key, v in rollouts.conditions.items()}
        x0 = self.backbone.generated_part(rollouts.latents[idx].float())
        sigma = rollouts.sigmas[t].float().to(x0.device)  # (n,)
        noise = self.randn_like(x0, rollouts.generator)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - s) * x0 + s * noise
        old_velocity = ref_velocity = None
        with torch.no_grad():  # the other policies' forwards first: loading θ_old writes the adapters in place
            if self.uses_old_velocity:
                with self.anchor_weights():
                    old_velocity = self.backbone.guided_velocity(x_t, sigma, cond, self.guidance).float()
            if self.kl_coef > 0:
                with self.backbone.adapters_disabled():
                    ref_velocity = self.backbone.guided_velocity(x_t, sigma, cond, self.guidance).float()
        velocity = self.backbone.guided_velocity(x_t, sigma, cond, self.guidance).float()
        loss, metrics = self.forward_loss(velocity, old_velocity, x0, x_t, noise, sigma, rollouts.advantages[idx])
        if ref_velocity is not None:
            kl = ((velocity - ref_velocity) ** 2).flatten(1).mean(1)
            loss = loss + self.kl_coef * kl
            metrics["kl/total"] = kl.detach().mean()
        metrics["policy_loss"] = loss.detach().mean()
        return loss, metrics

    # ------------------------------------------------------------------ hooks
    def train_steps(self, sigmas: Tensor, generator: torch.Generator, num_samples: int) -> Tensor:
        """Indices into the sampling schedule ``sigmas (S+1,)`` of the levels each rollout trains, ``(num_samples, k)``:
        default, per sample, the first ``k = int(S·timestep_fraction)`` of a random permutation of the ``S`` levels
        (NVlabs DiffusionNFT: ``randperm`` per sample, ``int(S·0.99)``)."""
        n_levels = len(sigmas) - 1
        k = max(1, int(n_levels * self.timestep_fraction))
        return torch.stack([torch.randperm(n_levels, generator=generator)[:k] for _ in range(num_samples)])

    def forward_loss(self, velocity: Tensor, old_velocity: Tensor | None, x0: Tensor, x_t: Tensor, noise: Tensor, sigma: Tensor,
                     advantages: Tensor) -> tuple[Tensor, dict]:
        """The method's per-sample loss (the hook a forward-process method overrides).

        Args:
            velocity: ``(n, T', C, h, w)`` ``v_θ(x_t, s)`` (with grad), generated frames.
            old_velocity: the same under the old policy (no grad), or None when :attr:`uses_old_velocity` is False.
            x0: the rollouts' clean latents; x_t: ``(1-s)·x0 + s·ε``; noise: ``ε``.
            sigma: ``(n,)`` levels ``s``.
            advantages: ``(n,)`` clipped advantages.

        Returns:
            ``(loss (n,), metrics)`` (metrics logged as ``train/<key>``, averaged over the round).
        """
        raise NotImplementedError


def _check_decay(decay: tuple) -> None:
    if len(decay) != 3:
        raise ValueError(f"old_policy_decay must be (flat, uprate, uphold), got {decay}")
    old_policy_decay(0, *decay)
