"""GRPO for flow-matching video models (Flow-GRPO / DanceGRPO / CPS / SAGE-GRPO family; DESIGN §3)."""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import Tensor

from lightning_vidalign.algorithms.advantages import grpo_advantages, min_norm_weights
from lightning_vidalign.algorithms.kl import AdaptiveKLController
from lightning_vidalign.algorithms.losses import ppo_clip_loss
from lightning_vidalign.module import VideoAlignModule
from lightning_vidalign.rollouts import Rollouts
from lightning_vidalign.sampling import (
    SDE_TYPES,
    KL_FORMS,
    LOG_PROB_FORMS,
    _as_level,
    equalizer_scales,
    gaussian_kl,
    gradient_norm_proxy,
    kl_std,
    sde_step_parameters,
    sde_step_with_logprob,
)

KL_TYPES = ("none", "fixed", "step", "moving", "dual")
TIMESTEP_SELECTIONS = ("per_sample", "random", "ordered")


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A noise level or scale as an fp32 ``(n,)`` CPU tensor (a float is the same for all samples)."""
    return torch.as_tensor(value, dtype=torch.float32).cpu().expand(like.shape[0])


class GRPO(VideoAlignModule):
    """Group Relative Policy Optimization on SDE rollouts of a flow-matching backbone.

    One training step is one round: ``G`` rollouts per condition of the batch with the SDE
    ``sde_type`` (trajectory and per-step log-probs kept), rewards from the reward callbacks
    (weighted sum), group-normalised advantages (groups gathered across ranks), then
    ``minibatches_per_round`` optimizer steps on the PPO-clip loss accumulated over a
    ``timestep_fraction`` of the denoising steps:

    ``L = mean_{i,t} [ S_t·max(-A_i·ρ_{i,t}, -A_i·clip(ρ_{i,t}, 1±ε)) + λ_KL·KL_{i,t} ]``,
    ``ρ = exp(log π_θ - log π_old)``, ``S_t = 1`` unless the gradient-norm equalizer is on.

    The round is three phases over one :class:`~lightning_vidalign.rollouts.Rollouts` record, each a method a
    variant overrides alone: :meth:`generate` (trajectories and log-probs), :meth:`score` (rewards, gathered group
    advantages: hook :meth:`compute_advantages`; per-rollout data: :meth:`prepare_round`), :meth:`update` (optimizer
    steps over minibatches of :meth:`minibatch_step`, whose per-step loss is :meth:`step_loss` with the hook
    :meth:`policy_loss`).

    KL options (``kl_type``): ``none``; ``fixed`` (reference = adapters disabled: the base model);
    ``step`` (``log π_old - log π_θ``, SAGE Eq. 15: the policy that drew the rollout); ``moving``
    (reference = an anchor copy of the adapters refreshed every ``anchor_interval`` optimizer steps,
    SAGE Eq. 13); ``dual`` (``w_pos·moving + w_vel·step``, SAGE Eq. 14). Gaussian KLs use
    ``||μ_θ - μ_ref||²/(2·std²)`` per step (mean over elements), ``std`` from
    :func:`~lightning_vidalign.sampling.kl_std` (``kl_form``).

    Reference-code defaults (each with the paper's / exact form as an option):
    ``log_prob_form="reference"`` (CPS log-prob ``-(x - μ)²`` as flow_grpo), ``kl_form="reference"``
    (Flow-GRPO's KL divided by ``2·σ_t²`` without ``Δ``), ``timestep_selection="per_sample"`` (each
    rollout trains its own random subset of steps, as DanceGRPO, SAGE-GRPO and TeleBoost draw them).

    Args:
        sde_type: rollout SDE (``flow_grpo | dance_grpo | cps | sage``), see
            :func:`~lightning_vidalign.sampling.sde_step_with_logprob`.
        eta: SDE noise scale.
        rollouts_per_condition: group size ``G``.
        timestep_fraction: share of the stochastic steps trained per round (Flow-GRPO: 0.5–1).
        timestep_selection: ``"per_sample"`` (default: every rollout its own random subset,
            ``torch.randperm`` per sample from the step's generator, as DanceGRPO
            ``train_grpo_flux.py``, SAGE-GRPO ``post_train.py`` and TeleBoost ``_build_perms``),
            ``"random"`` (one random subset per round shared by every sample) or ``"ordered"``
            (the first, highest-noise steps: flow_grpo's current ``train_wan2_1.py``, whose
            per-sample ``randperm`` is commented out).
        log_prob_form: ``"reference"`` | ``"gaussian"``: the per-step log-prob, see
            :func:`~lightning_vidalign.sampling.step_log_density` (differs for ``cps`` only).
        kl_form: ``"reference"`` | ``"exact"``: the KL normaliser, see
            :func:`~lightning_vidalign.sampling.kl_std` (differs for ``flow_grpo`` only).
        ratio_stats: log, per denoising step, the importance log-ratio ``log ρ = log π_θ - log π_old`` of the round's
            off-policy minibatches (every one after the first): ``ratio/step<t>/abs_log`` (mean ``|log ρ|``),
            ``ratio/step<t>/mean_log`` and ``ratio/step<t>/clip_frac`` (share with ``|ρ - 1| > clip_range``). A
            diagnostic of how far each step's policy moves within a round (the over-optimisation GRPO-Guard and
            Flow-DPPO target); the training is unchanged.
        clip_range: PPO ``ε`` (Flow-GRPO: 1e-4).
        advantage_clip: ``|A|`` bound (DESIGN: 5).
        advantage_eps: std stabiliser ``ε`` of the advantage.
        kl_type: one of ``none | fixed | step | moving | dual``.
        kl_coef: fixed ``λ_KL`` (must stay 0 when ``kl_controller`` is given: the controller sets ``λ_KL``).
        kl_controller: an :class:`AdaptiveKLController` (SAGE App. A.6) or None.
        kl_weights: ``(w_pos, w_vel)`` of the dual KL (SAGE: 1.0, 0.1).
        anchor_interval: optimizer steps between anchor refreshes ``N`` (SAGE: 10).
        equalizer: multiply each step's policy term by ``S_t = median(N)/N_t`` (SAGE Eq. 9).
        sde_window: indices of the denoising steps taken stochastically (others ODE); None = all.
        rewards: names of the reward callbacks to use (None = all).
        rollout_batch_size: rollouts per backbone call during sampling.
        train_batch_size: samples per forward/backward during the update.
        minibatches_per_round: optimizer steps per round; the round's rollouts are shuffled and
            split into this many minibatches, each accumulated over the trained denoising steps
            (Flow-GRPO's inner loop). 1 = one on-policy step (ratio 1, nothing clipped).
            ``trainer.max_steps``, ``ModelCheckpoint(every_n_train_steps)``, the logging step and
            the progress bar count rounds (batches); the LR scheduler counts optimizer steps.
        reward_combination: ``"sum"`` (advantage of the weighted sum of the rewards) or
            ``"min_norm"`` (joint reward: min-norm combination of per-reward advantages; every
            variant that calls :meth:`group_advantages` inherits it).
        joint_combination: with ``reward_combination="min_norm"``: ``"loss"`` (default, TeleBoost
            §3.5: ``Σ_i c_i·L_i``, each reward's own PPO-clip term with its advantage ``A_i``) or
            ``"advantage"`` (one PPO-clip term on ``Σ_i c_i·A_i``). They agree at ratio 1 or when
            the ``A_i`` of a sample share a sign. TeleBoost's released code combines in advantage
            space, with per-sample weights (``joint_advantage_weights.py``); our ``c`` is one
            min-norm point per round.
        **kwargs: :class:`VideoAlignModule` arguments (``num_inference_steps``, ``guidance``, ...;
            ``sampler`` is the validation/predict sampler, ``ode`` for flow models).

    Raises:
        ValueError: on an unknown ``sde_type``/``kl_type``, a deterministic ``sde_type``, a
            backbone that is not flow matching, a non-zero ``kl_coef`` beside a ``kl_controller``, or a min-norm joint
            reward combined per loss (``joint_combination="loss"``) in a variant that overrides :meth:`policy_loss`
            (ViPO, GRPO-Guard, Flow-DPPO: their losses take one advantage).
    """

    def __init__(
        self,
        *args,
        sde_type: str = "flow_grpo",
        eta: float = 0.7,
        rollouts_per_condition: int = 4,
        timestep_fraction: float = 0.5,
        timestep_selection: str = "per_sample",
        clip_range: float = 1e-4,
        advantage_clip: float = 5.0,
        advantage_eps: float = 1e-4,
        kl_type: str = "none",
        kl_coef: float = 0.0,
        kl_controller: AdaptiveKLController | None = None,
        kl_weights: tuple[float, float] = (1.0, 0.1),
        anchor_interval: int = 10,
        equalizer: bool = False,
        sde_window: list[int] | None = None,
        rewards: list[str] | None = None,
        rollout_batch_size: int = 8,
        train_batch_size: int = 8,
        minibatches_per_round: int = 1,
        reward_combination: str = "sum",
        joint_combination: str = "loss",
        log_prob_form: str = "reference",
        kl_form: str = "reference",
        ratio_stats: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if sde_type not in SDE_TYPES or (sde_type == "ode" and self.rollout_log_probs):
            raise ValueError(f"{type(self).__name__}: sde_type must be a stochastic one of {SDE_TYPES[1:]}, got {sde_type!r}")
        if kl_type not in KL_TYPES:
            raise ValueError(f"GRPO: kl_type must be one of {KL_TYPES}, got {kl_type!r}")
        if timestep_selection not in TIMESTEP_SELECTIONS:
            raise ValueError(f"GRPO: timestep_selection must be one of {TIMESTEP_SELECTIONS}, got {timestep_selection!r}")
        if log_prob_form not in LOG_PROB_FORMS:
            raise ValueError(f"GRPO: log_prob_form must be one of {LOG_PROB_FORMS}, got {log_prob_form!r}")
        if kl_controller is not None and kl_coef != 0:
            raise ValueError(f"GRPO: kl_coef={kl_coef} is ignored when a kl_controller sets λ_KL: give one of them (kl_controller: null for a fixed λ_KL)")
        if kl_form not in KL_FORMS:
            raise ValueError(f"GRPO: kl_form must be one of {KL_FORMS}, got {kl_form!r}")
        if joint_combination not in ("loss", "advantage"):
            raise ValueError(f"GRPO: joint_combination must be 'loss' or 'advantage', got {joint_combination!r}")
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"GRPO: timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if rollouts_per_condition < 2:
            raise ValueError(f"GRPO: rollouts_per_condition (G) must be >= 2 for group advantages, got {rollouts_per_condition}")
        if not hasattr(self.backbone, "guided_velocity"):
            raise ValueError(f"GRPO needs a flow-matching backbone (e.g. WanBackbone); {type(self.backbone).__name__} has no velocity/SDE rollout")
        self.sde_type, self.eta = sde_type, eta
        self.rollouts_per_condition = rollouts_per_condition
        self.timestep_fraction, self.timestep_selection = timestep_fraction, timestep_selection
        self.clip_range, self.advantage_clip, self.advantage_eps = clip_range, advantage_clip, advantage_eps
        self.kl_type, self.kl_coef, self.kl_controller = kl_type, kl_coef, kl_controller
        self.kl_weights = tuple(kl_weights)
        self.anchor_interval = anchor_interval
        self.equalizer = equalizer
        self.sde_window = sde_window
        self.reward_names = rewards
        self.rollout_batch_size, self.train_batch_size = rollout_batch_size, train_batch_size
        if minibatches_per_round < 1:
            raise ValueError(f"GRPO: minibatches_per_round must be >= 1, got {minibatches_per_round}")
        self.minibatches_per_round = minibatches_per_round
        if reward_combination not in ("sum", "min_norm"):
            raise ValueError(f"GRPO: reward_combination must be 'sum' or 'min_norm', got {reward_combination!r}")
        self.reward_combination, self.joint_combination = reward_combination, joint_combination
        if reward_combination == "min_norm" and joint_combination == "loss" and type(self).policy_loss is not GRPO.policy_loss:
            raise ValueError(f"{type(self).__name__}: its policy_loss does not combine the per-reward losses of a min-norm joint reward "
                             "(GRPO's own policy_loss does): use joint_combination: advantage")
        #: ``"group"`` (each group's std, GRPO) or ``"global"`` (the std of all the round's rewards): see :meth:`group_advantages`
        self.advantage_std = "group"
        self.log_prob_form, self.kl_form = log_prob_form, kl_form
        self.ratio_stats = ratio_stats
        self._step_log_ratios: dict[int, list[float]] = {}  # (ratio_stats) this round's off-policy log-ratios per step
        self._minibatch = 0  # index of the minibatch being accumulated in the round
        #: joint reward combined per loss: ``(c (K,), A (K, B·G))`` of this rank's rollouts, else None
        self.round_joint: tuple[Tensor, Tensor] | None = None
        self.optimizer_steps_per_batch = minibatches_per_round  # trainer.max_steps counts rounds
        self.updates = 0  # optimizer steps taken
        self.anchor: dict[str, Tensor] | None = None  # adapter weights of the moving reference
        #: the round's record: during the update whole (hooks read per-rollout data at :attr:`current_index`,
        #: :attr:`current_step`), after it without :attr:`ROUND_TEMPORARIES` (videos, captions, rewards, reward
        #: components and advantages, for callbacks and logging)
        self.rollouts: Rollouts | None = None

    # ----------------------------------------------------------------- hooks
    def compute_advantages(self, everyone: Rollouts, batch: dict) -> Tensor:
        """Advantages of the round's rollouts of every data-parallel rank: the hook variants override.

        Args:
            everyone: the round gathered over the ranks (:meth:`Rollouts.gather`): ``rewards``, ``group_ids`` and
                ``components`` of ``N_all`` rollouts, in rank order.
            batch: this rank's training batch (its conditions).

        Returns:
            ``(N_all,)`` fp32, used as they are (an override clips them itself; :meth:`group_advantages` and
            :func:`~lightning_vidalign.algorithms.advantages.grpo_advantages` clip to ``±advantage_clip``). The default
            is :meth:`group_advantages`.
        """
        return self.group_advantages(everyone.rewards, everyone.group_ids, everyone.components)

    def group_advantages(self, rewards: Tensor, group_ids: Tensor, components: dict[str, Tensor] | None = None) -> Tensor:
        """Group-normalised advantages of the summed reward, or, with ``reward_combination="min_norm"``
        and several reward callbacks, ``Σ_i c_i·A_i`` over the per-reward advantages with the min-norm
        weights ``c`` (TeleBoost §3.5, :func:`min_norm_weights`; logged as ``joint/c_<name>``).
        The std is the group's, or with :attr:`advantage_std` ``"global"`` that of all the rewards.
        Logs the fraction of zero-variance groups of the summed reward. ``components``: each reward's
        ``(N_all,)`` scores (the round's, gathered)."""
        adv, zero_frac = grpo_advantages(rewards, group_ids, self.advantage_eps, self.advantage_clip, global_std=self.advantage_std == "global")
        self.log("train/zero_std_groups", zero_frac, batch_size=rewards.numel())
        components = components or {}
        if self.reward_combination != "min_norm" or len(components) < 2:
            return adv
        per = torch.stack([grpo_advantages(r, group_ids, self.advantage_eps, self.advantage_clip)[0] for r in components.values()])
        c = min_norm_weights(per)
        self.log_dict({f"joint/c_{name}": c[i] for i, name in enumerate(components)}, batch_size=rewards.numel())
        if self.joint_combination == "loss":
            self.round_joint = (c, per)  # sliced to this rank's rollouts by score
        return (c.view(-1, 1) * per).sum(0)

    #: record the rollout's transition means (variants that need per-element old log-probs or old means)
    keep_means: bool = False
    #: the update needs the rollouts' trajectories and per-step log-probs (False: methods on the forward process,
    #: :class:`~lightning_vidalign.algorithms.forward_process.ForwardProcessGRPO`, which also accept ``sde_type="ode"``)
    rollout_log_probs: bool = True
    #: the round's fields dropped once the update is done (the largest: trajectory, latents, conditions)
    ROUND_TEMPORARIES = ("x_t", "x_next", "means", "latents", "conditions", "log_prob")

    def prepare_round(self, rollouts: Rollouts) -> None:
        """Called once per round after the advantages, with this rank's scored rollouts (videos
        ``(B·G, T, 3, H, W)``, advantages, trajectory); variants compute per-rollout data here (ViPO's maps).
        Default: nothing."""

    def policy_loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, x_next: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, dict]:
        """Per-sample policy loss of one denoising step (the hook a loss variant overrides): PPO-clip on the
        per-sample log-probs. A joint reward combined per loss (``joint_combination="loss"``) gives ``Σ_i c_i·L_i(A_i)``.

        Args:
            log_prob: ``(n,)`` fp32 log-probability of each sample's transition under the current policy (with grad).
            old_log_prob: ``(n,)`` the same under the policy that drew the rollout (recorded; no grad).
            advantages: ``(n,)`` the samples' advantages (clipped to ``±advantage_clip`` already).
            x_next: ``(n, T', C, h, w)`` the rollout's next state; mean: ``(n, T', C, h, w)`` the current policy's
                transition mean (with grad); std: the transition std (a float or ``(n, 1, 1, 1, 1)``): the per-element
                Gaussian for variants that need more than the summed log-prob (ViPO).

        Returns:
            ``(loss (n,), metrics)``: the per-sample loss (the caller adds ``λ_KL·KL``, scales by ``S_t``, averages over
            samples and trained steps) and scalar metrics, each logged as ``train/<key>`` (averaged over the round).
            Settings are the module's attributes (``self.clip_range``, ``self.advantage_clip``, ...).
        """
        loss, metrics = ppo_clip_loss(log_prob, old_log_prob, advantages, self.clip_range)
        if self.round_joint is not None:
            c, per = self.round_joint
            per = per[:, self.current_index]
            loss = sum(c[i] * ppo_clip_loss(log_prob, old_log_prob, per[i], self.clip_range)[0] for i in range(len(c)))
        return loss, metrics

    # --------------------------------------------------------------- helpers
    def condition_ids(self, batch: dict) -> Tensor:
        """Integer id per condition: the dataset ``index`` or a hash of the caption (so rollouts of
        the same prompt on different ranks share a group)."""
        if "index" in batch:
            return torch.as_tensor(batch["index"]).long().view(-1)
        captions = batch.get("caption", batch.get("prompt"))
        return torch.tensor([int.from_bytes(hashlib.sha256(c.encode()).digest()[:7], "little") for c in captions])

    def gather(self, x: Tensor) -> Tensor:
        """All-gather a per-sample tensor over the data-parallel ranks (concatenated in rank order; with sequence
        parallelism the first rank of each group speaks for it: :meth:`gather_data_parallel`)."""
        return self.gather_data_parallel(x)

    def train_steps(self, sigmas: Tensor, generator: torch.Generator, num_samples: int) -> Tensor:
        """Denoising step indices trained this round, ``(num_samples, k)`` long: of the stochastic
        steps (``std > 0``, inside ``sde_window``), ``k = round(fraction·n)`` per sample — a random
        subset per sample (``per_sample``), one random subset shared by all (``random``), or the
        first ``k`` (``ordered``)."""
        p = sde_step_parameters(sigmas[:-1], sigmas[1:], self.sde_type, self.eta)
        eligible = [i for i in range(len(sigmas) - 1) if float(p["std"][i]) > 0 and (self.sde_window is None or i in self.sde_window)]
        if not eligible:
            raise ValueError(f"GRPO: no stochastic step to train (sde_type={self.sde_type}, eta={self.eta}, sde_window={self.sde_window})")
        k = max(1, int(round(self.timestep_fraction * len(eligible))))
        eligible_t = torch.tensor(eligible)
        if self.timestep_selection == "per_sample":
            return torch.stack([eligible_t[torch.randperm(len(eligible), generator=generator)[:k]] for _ in range(num_samples)])
        if self.timestep_selection == "ordered":
            shared = eligible_t[:k]
        else:
            shared = eligible_t[torch.randperm(len(eligible), generator=generator)[:k]].sort().values
        return shared.expand(num_samples, k).clone()

    def step_scales(self, sigmas: Tensor) -> Tensor:
        """``S_t`` of the gradient-norm equalizer for every step of the schedule, ``(S,)`` (computed
        over the stochastic steps; 1 for the deterministic ones, and everywhere when it is off)."""
        scales = torch.ones(len(sigmas) - 1)
        if not self.equalizer:
            return scales
        p = sde_step_parameters(sigmas[:-1], sigmas[1:], self.sde_type, self.eta)
        stoch = [i for i in range(len(sigmas) - 1) if float(p["std"][i]) > 0]
        proxies = gradient_norm_proxy(sigmas[stoch], sigmas[[i + 1 for i in stoch]], self.sde_type, self.eta)
        scales[stoch] = equalizer_scales(proxies)
        return scales

    @contextlib.contextmanager
    def anchor_weights(self):
        """Temporarily load the moving anchor's adapter weights (no grad); restore on exit.

        Under FSDP2 every sharded module is resharded first: the root module keeps its parameters unsharded after a
        forward (FSDP2's ``reshard_after_forward`` is off for the root), and then ``named_parameters`` holds plain
        tensors where the anchor (a ``state_dict``) holds the sharded DTensors: a full fine-tuning run (whose root
        parameters train) failed here with "got mixed torch.Tensor and DTensor"."""
        from torch.distributed.fsdp import FSDPModule

        def reshard():
            for module in self.backbone.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

        reshard()
        params = dict(self.backbone.named_parameters())
        current = {k: params[k].detach().clone() for k in self.anchor}
        with torch.no_grad():
            for k, v in self.anchor.items():
                params[k].copy_(v)
        try:
            yield
        finally:
            reshard()  # else the root keeps the anchor's all-gathered values for the next (current-policy) forward
            with torch.no_grad():
                for k, v in current.items():
                    params[k].copy_(v)

    def refresh_anchor(self) -> None:
        """``π_ref ← π_θ``: copy the current adapter weights into the anchor."""
        self.anchor = {k: v.detach().clone() for k, v in self.backbone.trainable_state_dict().items()}

    def zero_loss(self) -> Tensor:
        """``0·Σθ`` over the adapters: a finite loss whose backward gives zero gradients."""
        return 0.0 * sum(p.sum() for p in self.backbone.trainable_parameters())

    def kl_coefficient(self) -> float:
        return self.kl_controller.value if self.kl_controller is not None else self.kl_coef

    def reference_mean(self, x_t: Tensor, s: Tensor, s_next: Tensor, cond: dict, which: str) -> Tensor:
        """Transition mean of a reference policy (``fixed``: adapters off; ``moving``: anchor), at
        per-sample levels ``s``, ``s_next`` ``(n,)``."""
        s, s_next = _per_sample(s, x_t), _per_sample(s_next, x_t)
        ctx = self.backbone.adapters_disabled() if which == "fixed" else self.anchor_weights()
        with ctx, torch.no_grad():
            v = self.backbone.guided_velocity(x_t, s.to(x_t.device), cond, self.guidance, sigma_next=s_next.to(x_t.device))
        p = sde_step_parameters(_as_level(s, x_t), _as_level(s_next, x_t), self.sde_type, self.eta)
        return p["a"] * x_t.float() + p["b"] * v.float()

    def step_loss(self, x_t: Tensor, x_next: Tensor, old_log_prob: Tensor, advantages: Tensor, s: Tensor, s_next: Tensor, cond: dict, scale: Tensor):
        """Per-sample loss of one denoising step: ``S_t·PPO-clip + λ_KL·KL`` and its metrics.

        Args:
            x_t: ``(n, ...)`` each sample's state before the step.
            x_next: ``(n, ...)`` its state after the step (the rollout's).
            old_log_prob: ``(n,)`` the step's log-probability under the policy that drew the rollout.
            advantages: ``(n,)``.
            s: ``(n,)`` each sample's noise level (samples may sit at different steps; a float: the same for all).
            s_next: ``(n,)`` each sample's next noise level (or a float).
            cond: the samples' conditions.
            scale: ``(n,)`` equalizer scales ``S_t`` (or a float).
        """
        s, s_next, scale = _per_sample(s, x_t), _per_sample(s_next, x_t), _per_sample(scale, x_t)
        # reference means first: loading the anchor writes the adapter weights in place, which
        # must not happen between the policy forward and its backward
        ref = {}
        if self.kl_type == "fixed":
            ref["fixed"] = self.reference_mean(x_t, s, s_next, cond, "fixed")
        if self.kl_type in ("moving", "dual"):
            ref["moving"] = self.reference_mean(x_t, s, s_next, cond, "moving")
        v = self.backbone.guided_velocity(x_t, s.to(x_t.device), cond, self.guidance, sigma_next=s_next.to(x_t.device))
        _, mean, std, log_prob = sde_step_with_logprob(v, x_t, s, s_next, self.sde_type, self.eta, prev_sample=x_next, log_prob_form=self.log_prob_form)
        if self.ratio_stats and self._minibatch > 0:
            for t, d in zip(self.current_step.tolist(), (log_prob - old_log_prob).detach().float().cpu().tolist()):
                self._step_log_ratios.setdefault(int(t), []).append(d)
        policy, metrics = self.policy_loss(log_prob, old_log_prob, advantages, x_next, mean, std)
        if ref:
            ref_std = kl_std(_as_level(s, x_t), _as_level(s_next, x_t), self.sde_type, self.eta, self.kl_form)
        kl = {k: gaussian_kl(mean, m, ref_std) for k, m in ref.items()}
        if self.kl_type in ("step", "dual"):
            kl["step"] = old_log_prob.detach() - log_prob
        if self.kl_type == "dual":
            kl["total"] = self.kl_weights[0] * kl["moving"] + self.kl_weights[1] * kl["step"]
        elif kl:
            kl["total"] = next(iter(kl.values()))
        total_kl = kl.get("total", torch.zeros_like(policy))
        loss = scale.to(policy.device) * policy + self.kl_coefficient() * total_kl
        metrics.update({f"kl/{k}": v.detach().mean() for k, v in kl.items()})
        metrics["policy_loss"] = policy.detach().mean()
        return loss, metrics

    # ------------------------------------------------------------------ the round
    def training_step(self, batch: dict, batch_idx: int) -> dict | None:
        """One round (Flow-GRPO Alg. 1): sample ``G`` trajectories per condition, score them, take
        ``minibatches_per_round`` policy-gradient steps on them. Returns None when the round is skipped
        (non-finite rewards, ``on_nonfinite="skip"``)."""
        rollouts = self.generate(batch)
        rollouts = self.score(rollouts, batch)
        if rollouts is None:
            return None
        return {**self.update(rollouts), "real": batch["video"]}

    def generate(self, batch: dict) -> Rollouts:
        """Phase 1: ``G`` SDE rollouts per condition with their trajectories and per-step log-probs under the
        current policy ``π_old`` (``sde_type``, ``eta``, ``sde_window``), decoded; with ``overlap_rewards`` their
        rewards are already being scored. The round's generator stays in the record for the update's draws."""
        generator = self.generator()
        if self.anchor is None and self.kl_type in ("moving", "dual"):
            self.refresh_anchor()
        with self.timer("rollout"), torch.no_grad(), self.sampling_policy():
            conditions = self.backbone.encode_condition(batch, generator)
            rollouts = self.generate_rollouts(batch, conditions, generator, self.rollouts_per_condition, self.sde_type, **self.rollout_options())
        rollouts.group_ids = self.condition_ids(batch).to(rollouts.videos.device).repeat_interleave(self.rollouts_per_condition)
        return rollouts

    def rollout_options(self) -> dict:
        """Keyword arguments of ``backbone.rollout`` for this round's rollouts: the trajectory, per-step log-probs (and
        means with :attr:`keep_means`) of the SDE steps ``sde_window``."""
        return dict(keep_trajectory=True, eta=self.eta, sde_steps=self.sde_window, keep_means=self.keep_means, log_prob_form=self.log_prob_form)

    def sampling_policy(self):
        """Context in which the rollouts are drawn: the current policy (a variant that samples from another one,
        e.g. DiffusionNFT's old policy, overrides it)."""
        return contextlib.nullcontext()

    def score(self, rollouts: Rollouts, batch: dict) -> Rollouts | None:
        """Phase 2: rewards (each reward callback's score and their weighted sum), then advantages over the groups
        gathered from every data-parallel rank (:meth:`compute_advantages`), this rank's share kept. Returns None
        when the gathered rewards are not finite (every rank takes the same decision: the round is skipped, logged
        and counted in ``train/skipped_steps``, or :class:`FloatingPointError` with ``on_nonfinite="raise"``)."""
        with self.timer("reward"):
            self.score_rollouts(rollouts)
        everyone = rollouts.gather(self.gather, ("rewards", "group_ids"))
        if not self.loss_is_finite(everyone.rewards, "rewards"):
            self.rollouts = rollouts.drop(*self.ROUND_TEMPORARIES)  # (the skipped round's, for callbacks)
            return None
        everyone.components = rollouts.gather(self.gather, ("components",)).components  # per reward, (N_all,) each
        self.round_joint = None
        mine = slice(self.data_parallel_rank * len(rollouts), (self.data_parallel_rank + 1) * len(rollouts))
        rollouts.advantages = self.compute_advantages(everyone, batch)[mine]  # (the ranks of a sequence-parallel group share a slice)
        if self.round_joint is not None:
            self.round_joint = (self.round_joint[0], self.round_joint[1][:, mine])
        with self.timer("prepare_round"):
            self.prepare_round(rollouts)
        return rollouts

    def update(self, rollouts: Rollouts) -> dict:
        """Phase 3: the trained steps of each rollout (:meth:`train_steps`), the rollouts shuffled into
        ``minibatches_per_round`` minibatches, one optimizer step per minibatch (:meth:`minibatch_step`; later
        minibatches see ratios != 1: the PPO clip acts there); the KL controller and the moving anchor follow the
        optimizer steps. Then the round's logs; the record is kept without its trajectory in :attr:`rollouts`."""
        self.rollouts, n, generator = rollouts, len(rollouts), rollouts.generator  # (hooks read per-rollout data here)
        steps = self.train_steps(rollouts.sigmas, generator, n)  # (N, k): the steps each rollout trains
        scales = self.step_scales(rollouts.sigmas)
        minibatches = torch.randperm(n, generator=generator).chunk(min(self.minibatches_per_round, n))
        sums: dict[str, float] = {}
        stats: dict[str, float] = {}
        with self.timer("update"):
            for self._minibatch, minibatch in enumerate(minibatches):
                finite, kl = self.minibatch_step(rollouts, minibatch, steps, scales, sums)
                if self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
                    self.optimizers().zero_grad(set_to_none=True)
                    self.loss_is_finite(torch.tensor(float("nan")), "policy loss (on some rank)")  # raises, or logs + counts
                    continue
                stats = self.step_optimizer()
                self.updates += 1
                if self.kl_controller is not None:
                    # mean KL of this optimizer step over all ranks: the controller stays identical everywhere
                    self.kl_controller.update(float(self.trainer.strategy.reduce(torch.tensor(kl, device=self.device), reduce_op="mean")))
                if self.kl_type in ("moving", "dual") and self.updates % self.anchor_interval == 0:
                    self.refresh_anchor()
        self.rollouts = rollouts.drop(*self.ROUND_TEMPORARIES)
        self.log_round(rollouts, sums, stats, steps, scales)
        return {"loss": torch.tensor(sums.get("loss", float("nan"))), "fake": rollouts.videos[:: self.rollouts_per_condition]}

    def minibatch_step(self, rollouts: Rollouts, minibatch: Tensor, steps: Tensor, scales: Tensor, sums: dict[str, float]) -> tuple[bool, float]:
        """Accumulate the gradient of one minibatch: :meth:`step_loss` of each rollout's ``j``-th trained step, for
        every ``j``, in chunks of ``train_batch_size`` (``Σ / (k·|minibatch|)``: the mean over rollouts and trained
        steps). A non-finite loss back-propagates a zero instead (every rank keeps its backward passes and their
        gradient syncs aligned). Adds the round's metrics into ``sums``; returns ``(finite, the minibatch's mean KL)``."""
        chunks = minibatch.split(self.train_batch_size)
        n_steps, n_all = steps.shape[1], len(rollouts)
        n_terms = n_steps * len(minibatch)
        finite, kl = True, 0.0
        for j in range(n_steps):
            for c, idx in enumerate(chunks):
                t = steps[idx, j]  # (n,) each sample's j-th trained step
                self.current_index, self.current_step = idx, t  # for per-sample round data in hooks
                loss, metrics = self.sample_loss(rollouts, idx, t, scales)
                loss = loss.sum() / n_terms
                if not bool(torch.isfinite(loss)):
                    finite, loss = False, self.zero_loss()
                self.backward_pass(loss, last=(j == n_steps - 1 and c == len(chunks) - 1))
                kl += float(metrics.get("kl/total", 0.0)) * len(idx) / n_terms
                weight = len(idx) / (n_all * n_steps)
                for k, v in {"loss": loss.detach() * n_terms / len(idx), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * weight
        return finite, kl

    def sample_loss(self, rollouts: Rollouts, idx: Tensor, t: Tensor, scales: Tensor) -> tuple[Tensor, dict]:
        """Per-sample loss of rollouts ``idx`` ``(n,)`` at their trained steps ``t`` ``(n,)``: :meth:`step_loss` on the
        recorded transitions ``x_t → x_next`` (methods on the forward process override it)."""
        sub = {key: v[idx] for key, v in rollouts.conditions.items()}
        return self.step_loss(rollouts.x_t[idx, t], rollouts.x_next[idx, t], rollouts.log_prob[idx, t], rollouts.advantages[idx],
                              rollouts.sigmas[t], rollouts.sigmas[t + 1], sub, scales[t])

    def log_round(self, rollouts: Rollouts, sums: dict[str, float], stats: dict[str, float], steps: Tensor, scales: Tensor) -> None:
        """The round's logs: the progress bar shows the mean reward, the loss and the ratio; the rest goes to the logger."""
        rewards, advantages, trained = rollouts.rewards, rollouts.advantages, steps.unique()
        logs = {
            **{(k if k.startswith("kl/") else f"train/{k}"): v for k, v in sums.items()},
            **{f"train/{k}": v for k, v in stats.items()},
            "reward/total/mean": rewards.mean(),
            "reward/total/std": rewards.std(unbiased=False),
            "adv/mean": advantages.mean(),
            "adv/abs_mean": advantages.abs().mean(),
            "adv/clip_frac": (advantages.abs() >= self.advantage_clip).float().mean(),
            "kl/coef": self.kl_coefficient(),
            "train/trained_steps": float(steps.shape[1]),
            "train/optimizer_steps": float(self.updates),
            "train/equalizer_max_over_min": float(scales[trained].max() / scales[trained].min().clamp(min=1e-12)),
        }
        for t, values in sorted(self._step_log_ratios.items()):
            d = torch.tensor(values, dtype=torch.float64)
            logs.update({f"ratio/step{t}/abs_log": float(d.abs().mean()), f"ratio/step{t}/mean_log": float(d.mean()),
                         f"ratio/step{t}/clip_frac": float(((d.exp() - 1).abs() > self.clip_range).double().mean())})
        self._step_log_ratios = {}
        on_bar = ("reward/total/mean", "train/loss", "train/ratio")
        self.log_dict({k: v for k, v in logs.items() if k in on_bar}, prog_bar=True, batch_size=len(rollouts))
        self.log_dict({k: v for k, v in logs.items() if k not in on_bar}, prog_bar=False, batch_size=len(rollouts))

    # -------------------------------------------------------- diagnostics
    def policy_gradient_norms(self, batch: dict, generator: torch.Generator, equalize: bool) -> dict[int, float]:
        """Norm of the policy-gradient of each stochastic denoising step alone, over the adapters.

        One round of rollouts (no optimizer step); the gradient at ratio 1 of
        ``mean_i S_t·(-A_i·log π_θ(x_{t+1}|x_t))`` is taken separately for every step ``t``, with
        ``A`` standard normal per sample (our choice: isolates the step's sensitivity from reward
        noise). Used to measure the equalizer's claim (SAGE-GRPO Fig. 3/4).

        Returns:
            ``{step index: gradient norm}``.
        """
        video = batch["video"]
        b, g = video.shape[0], self.rollouts_per_condition
        with torch.no_grad():
            cond = self.backbone.encode_condition(batch, generator)
            cond = {k: v.repeat_interleave(g, 0) for k, v in cond.items()}
            traj = self.backbone.rollout(cond, self.sde_type, self.num_inference_steps, self.guidance, generator, keep_trajectory=True,
                                         num_frames=video.shape[1], height=video.shape[-2], width=video.shape[-1], eta=self.eta, decode=False)
        adv = torch.randn(b * g, generator=generator).to(video.device)
        p = sde_step_parameters(traj.sigmas[:-1], traj.sigmas[1:], self.sde_type, self.eta)
        steps = [i for i in range(self.num_inference_steps) if float(p["std"][i]) > 0]
        was, self.equalizer = self.equalizer, equalize
        scales = self.step_scales(traj.sigmas)
        self.equalizer = was
        params = self.backbone.trainable_parameters()
        out = {}
        for t in steps:
            s, s_next = float(traj.sigmas[t]), float(traj.sigmas[t + 1])
            v = self.backbone.guided_velocity(traj.x_t[:, t], torch.full((b * g,), s, device=video.device), cond, self.guidance,
                                              sigma_next=torch.full((b * g,), s_next, device=video.device))
            _, _, _, lp = sde_step_with_logprob(v, traj.x_t[:, t], s, s_next, self.sde_type, self.eta, prev_sample=traj.x_next[:, t], log_prob_form=self.log_prob_form)
            loss = float(scales[t]) * (-(adv * lp)).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out[t] = float(torch.sqrt(sum((gr.float() ** 2).sum() for gr in grads if gr is not None)))
        return out

    # ----------------------------------------------------------- checkpoint
    def _place_like_parameters(self, weights: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        """Saved full adapter weights onto this rank's parameters' devices (a checkpoint's tensors load on the device
        they were saved from) and, under FSDP2, sharded as them (``distribute_tensor`` with their mesh and placements)."""
        if weights is None:
            return None
        params = dict(self.backbone.named_parameters())
        out = {}
        for k, v in weights.items():
            p = params.get(k)
            if p is None:
                out[k] = v
            elif hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                out[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            else:
                out[k] = v.to(p.device)
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["grpo"] = {
            "updates": self.updates,
            # full tensors: under FSDP2 the anchor holds this rank's shards (DTensors) and the file is rank 0's
            # (full_tensor is collective: this hook runs on every rank)
            "anchor": None if self.anchor is None else {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in self.anchor.items()},
            "kl_controller": self.kl_controller.state_dict() if self.kl_controller is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("grpo")
        if state is None:
            return
        self.updates, self.anchor = int(state["updates"]), self._place_like_parameters(state["anchor"])
        if self.kl_controller is not None and state["kl_controller"] is not None:
            self.kl_controller.load_state_dict(state["kl_controller"])
