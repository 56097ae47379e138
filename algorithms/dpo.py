"""Diffusion-DPO with decoupled gradient backpropagation (DESIGN §3; TeleBoost §4, §6.2)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_vidalign.algorithms.losses import diffusion_dpo_loss, dpo_pair_weights
from lightning_vidalign.datamodules.preference import best_worst_pairs, temporal_negatives
from lightning_vidalign.module import VideoAlignModule
from lightning_vidalign.rewards.base import repeat_batch

PAIR_SOURCES = ("synthetic", "data", "on_policy")
BETA_SCHEDULES = ("constant", "linear", "cosine")


class DPO(VideoAlignModule):
    """Diffusion-DPO on preference pairs ``(condition, winner, loser)``.

    Per step: winner and loser latents share one ``(σ, ε)`` per pair; the reference losses come from
    the same backbone with its adapters disabled, under ``no_grad``;
    ``L = mean_b -log σ(-0.5·β·((ℓ_w - ℓ_ref,w) - (ℓ_l - ℓ_ref,l)))`` (:func:`diffusion_dpo_loss`).

    Backward (``decoupled_backward``):

    - ``False`` (joint): every branch of every pair forwarded, one backward of ``L``: the graphs of
      both branches of every pair are alive together (peak activations O(L_w + L_l)).
    - ``True`` (default, TeleBoost's Decoupled Gradient Backpropagation): pair by pair, the winner's
      forward and backward run first (its gradient kept aside, unit weight), then the loser's
      forward gives ``ℓ_l``; the scalar ``η_b = 0.5·β·σ(-inside_b)`` is computed without grad
      (:func:`dpo_pair_weights`); the winner's gradient enters scaled by ``η_b/B`` and the loser's
      backward runs on ``-η_b·ℓ_l/B``. By linearity this is exactly ``∇L`` (tested to 1e-5); only
      one branch of one pair holds activations at a time (O(max)), with the same forward/backward
      count as the joint step. Cost: one extra buffer of the trainable (adapter) gradients. Pairs are
      processed one at a time, the memory-bound regime DGB targets (one pair per device). Under FSDP2
      every backward is reduced into the sharded gradient, so there ``η_b`` is computed first from
      a no-grad forward of the loser (one extra forward per pair) — still exact (tested against DDP).

    Pair sources (``pair_source``):

    - ``synthetic``: winner = the real clip, loser = a temporal negative of it (reverse / local
      shuffle / freeze, mixed by ``negative_mix``; :func:`temporal_negatives`), condition = the
      real clip's first frame / caption.
    - ``data``: ``batch["winner"]``, ``batch["loser"]`` from :class:`PreferencePairDataModule`.
    - ``on_policy``: ``G`` rollouts per condition ranked by the reward callbacks; best vs worst,
      pairs whose reward gap is ``<= pair_margin`` get weight 0 (counted in ``train/pairs_dropped``;
      a step with no pair on any rank is skipped).

    Args:
        beta: ``β`` (Diffusion-DPO: 5000 at SD scale; our tiny default configs use less).
        beta_schedule: ``constant``, ``linear`` or ``cosine`` from ``beta`` to ``beta_final`` over
            ``beta_steps`` optimizer steps (an annealing option; our choice).
        beta_final, beta_steps: see ``beta_schedule``.
        decoupled_backward: see above.
        pair_source: ``synthetic | data | on_policy``.
        negative_mix, shuffle_window, freeze_range: synthetic negatives (see :func:`temporal_negatives`).
        rollouts_per_condition, pair_margin, rewards, rollout_batch_size: on-policy pairs.
        **kwargs: :class:`VideoAlignModule` arguments (the rollout ``sampler``, steps, guidance).
    """

    trains_from_latent_cache = True  # real clips through backbone.encode_batch

    def __init__(
        self,
        *args,
        beta: float = 500.0,
        beta_schedule: str = "constant",
        beta_final: float | None = None,
        beta_steps: int = 1000,
        decoupled_backward: bool = True,
        pair_source: str = "synthetic",
        negative_mix: dict[str, float] | None = None,
        shuffle_window: int = 3,
        freeze_range: tuple[float, float] = (0.25, 0.75),
        rollouts_per_condition: int = 4,
        pair_margin: float = 0.0,
        rewards: list[str] | None = None,
        rollout_batch_size: int = 8,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if beta <= 0 or (beta_final is not None and beta_final <= 0):
            raise ValueError(f"DPO: beta and beta_final must be > 0, got {beta}, {beta_final}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"DPO: beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if pair_source not in PAIR_SOURCES:
            raise ValueError(f"DPO: pair_source must be one of {PAIR_SOURCES}, got {pair_source!r}")
        if pair_source == "on_policy" and rollouts_per_condition < 2:
            raise ValueError(f"DPO: on-policy pairs need rollouts_per_condition >= 2, got {rollouts_per_condition}")
        self.beta, self.beta_schedule, self.beta_steps = beta, beta_schedule, beta_steps
        self.beta_final = beta if beta_final is None else beta_final
        self.decoupled_backward = decoupled_backward
        self.pair_source = pair_source
        self.negative_mix, self.shuffle_window, self.freeze_range = negative_mix, shuffle_window, tuple(freeze_range)
        self.rollouts_per_condition, self.pair_margin = rollouts_per_condition, pair_margin
        self.reward_names, self.rollout_batch_size = rewards, rollout_batch_size
        self.updates = 0
        self._heldout_pairs: dict[int, tuple[Tensor, Tensor, dict] | None] = {}  # held-out condition -> its pair (latents)

    # --------------------------------------------------------------- helpers
    def current_beta(self) -> float:
        """``β`` at the current optimizer step (``self.updates``)."""
        p = min(1.0, self.updates / max(1, self.beta_steps))
        if self.beta_schedule == "linear":
            f = p
        elif self.beta_schedule == "cosine":
            f = 0.5 * (1 - math.cos(math.pi * p))
        else:
            f = 0.0
        return self.beta + (self.beta_final - self.beta) * f

    @torch.no_grad()
    def make_pairs(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, Tensor, dict, Tensor, dict]:
        """Latent pairs for this batch: ``(x_w, x_l, cond, weight_mask (B,), logs)``."""
        if self.pair_source == "data":
            for key in ("winner", "loser"):
                if key not in batch:
                    raise KeyError(f"DPO(pair_source='data') needs batch['{key}'] (PreferencePairDataModule); batch has keys {sorted(batch)}")
            winners, losers = batch["winner"], batch["loser"]
            if winners.shape != losers.shape:
                raise ValueError(f"DPO: winner {tuple(winners.shape)} and loser {tuple(losers.shape)} batches differ in shape")
            return self.backbone.encode(winners), self.backbone.encode(losers), self.backbone.encode_condition(batch, generator), torch.ones(winners.shape[0]), {}
        if self.pair_source == "synthetic":
            winners = self.real_video(batch, "DPO(pair_source='synthetic') (its negatives are made from the pixels)")
            losers, kinds = temporal_negatives(winners, generator, self.negative_mix, self.shuffle_window, self.freeze_range)
            logs = {f"train/negatives_{k}": float(kinds.count(k)) / len(kinds) for k in set(kinds)}
            x_w, cond = self.backbone.encode_batch(batch, generator)  # winners (the real clips): from the latent cache when given
            x_l = self.backbone.encode_clipwise(losers)
            return x_w, x_l, cond, torch.ones(len(kinds)), logs
        # on-policy: G rollouts per condition, ranked by the reward callbacks
        b, g = self.clip_size(batch)[0], self.rollouts_per_condition
        cond = self.backbone.condition_batch(batch, generator)  # from the latent cache when the batch carries it
        rollouts = self.generate_rollouts(batch, cond, generator, g, self.sampler, decode=False, keep_videos=False)  # latents only: pixels per chunk, to score
        rollouts = self.score_rollouts(rollouts, log=False, keep_videos=False)
        rewards = self.sequence_parallel_broadcast(rollouts.rewards)  # one ranking per sequence-parallel group
        latents = rollouts.latents
        r = rewards.view(b, g)
        best = torch.arange(b, device=r.device) * g + r.argmax(1)
        worst = torch.arange(b, device=r.device) * g + r.argmin(1)
        _, _, kept = best_worst_pairs(rewards, g, self.pair_margin)
        logs = {"train/pair_reward_gap": float((r.max(1).values - r.min(1).values).mean()), "train/pairs_dropped": float((~kept).sum())}
        return latents[best], latents[worst], cond, kept.float().cpu(), logs

    def joint_step(self, x_w, x_l, cond, sigma, noise, ref_w, ref_l, weights, beta):
        """Standard DPO backward: every branch of every pair forwarded (the same per-pair calls as
        :meth:`decoupled_step`, so the two differ only in how the backward is organised), all graphs
        alive together, one backward of the loss."""
        losses_w, losses_l = [], []
        for i in range(x_w.shape[0]):
            sl = slice(i, i + 1)
            c_i = {k: v[sl] for k, v in cond.items()}
            losses_w.append(self.backbone.training_loss(x_w[sl], c_i, sigma[sl], noise[sl]))
            losses_l.append(self.backbone.training_loss(x_l[sl], c_i, sigma[sl], noise[sl]))
        loss_w, loss_l = torch.cat(losses_w), torch.cat(losses_l)
        loss, metrics = self.weighted_dpo_loss(loss_w, loss_l, ref_w, ref_l, weights, beta)
        self.backward_pass(loss, last=True)
        return loss.detach(), loss_w.detach(), loss_l.detach(), metrics

    def weighted_dpo_loss(self, loss_w, loss_l, ref_w, ref_l, weights, beta):
        """``Σ_b m_b·(-log σ(inside_b)) / max(1, Σ m)`` (``m``: the pair mask) and the metrics."""
        _, metrics = diffusion_dpo_loss(loss_w.detach(), loss_l.detach(), ref_w, ref_l, beta)
        inside = -0.5 * beta * ((loss_w - ref_w) - (loss_l - ref_l))
        loss = (weights * -torch.nn.functional.logsigmoid(inside)).sum() / weights.sum().clamp(min=1)
        return loss, metrics

    def decoupled_step(self, x_w, x_l, cond, sigma, noise, ref_w, ref_l, weights, beta):
        """Decoupled gradient backpropagation (see the class docstring); returns what joint does."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        params = self.backbone.trainable_parameters()
        n = weights.sum().clamp(min=1)
        b = x_w.shape[0]
        # FSDP2 reduces (averages) every synced backward into the sharded ``p.grad``, so a gradient can
        # no longer be scaled by this rank's η afterwards: there η is computed first, from a no-grad
        # forward of the loser (one extra forward per pair), and both backwards carry their η.
        presync = self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)
        losses_w, losses_l = [], []
        for i in range(b):
            sl = slice(i, i + 1)
            c_i = {k: v[sl] for k, v in cond.items()}
            if presync:
                loss_w = self.backbone.training_loss(x_w[sl], c_i, sigma[sl], noise[sl])
                with torch.no_grad():
                    loss_l_value = self.backbone.training_loss(x_l[sl], c_i, sigma[sl], noise[sl])
                eta = dpo_pair_weights(loss_w.detach(), loss_l_value, ref_w[sl], ref_l[sl], beta) * weights[sl] / n
                self.backward_pass((eta * loss_w).sum(), last=True)
                loss_l = self.backbone.training_loss(x_l[sl], c_i, sigma[sl], noise[sl])
                self.backward_pass((-eta * loss_l).sum(), last=True)
                losses_w.append(loss_w.detach())
                losses_l.append(loss_l.detach())
                continue
            running = [p.grad for p in params]  # the gradient accumulated so far (pairs < i)
            for p in params:
                p.grad = None
            loss_w = self.backbone.training_loss(x_w[sl], c_i, sigma[sl], noise[sl])
            self.backward_pass(loss_w.sum(), last=False)  # frees the winner's graph
            grad_w = [p.grad for p in params]
            for p in params:
                p.grad = None
            loss_l = self.backbone.training_loss(x_l[sl], c_i, sigma[sl], noise[sl])
            eta = dpo_pair_weights(loss_w.detach(), loss_l.detach(), ref_w[sl], ref_l[sl], beta) * weights[sl] / n
            for p, r, gw in zip(params, running, grad_w):
                scaled = None if gw is None else eta.to(gw.dtype) * gw
                p.grad = r if scaled is None else (scaled if r is None else r + scaled)
            self.backward_pass((-eta * loss_l).sum(), last=i == b - 1)
            losses_w.append(loss_w.detach())
            losses_l.append(loss_l.detach())
        loss_w, loss_l = torch.cat(losses_w), torch.cat(losses_l)
        per_pair, metrics = self.weighted_dpo_loss(loss_w, loss_l, ref_w, ref_l, weights, beta)
        return per_pair, loss_w, loss_l, metrics

    # ------------------------------------------------------ held-out pairs
    def heldout_extra_keys(self) -> list[str]:
        return ["dpo/implicit_acc", "dpo/reward_margin"]

    @torch.no_grad()
    def heldout_pair(self, clip: dict, index: int) -> tuple[Tensor, Tensor, dict] | None:
        """The preference pair of held-out condition ``index`` (``clip``: batch of 1), built once, as the training
        pairs of ``pair_source`` are: ``synthetic`` — the real clip vs a temporal negative of it; ``data`` — the
        pair of the validation batch; ``on_policy`` — best vs worst of ``G`` rollouts of the **reference model**
        (adapters off; fixed noise), ranked by the reward callbacks, None when their gap is ``<= pair_margin``.
        Returns ``(x_w (1, ...), x_l (1, ...), cond)`` latents. Fixed for the whole run (same pairs at every
        evaluation; a resumed run rebuilds the same ones); our choice, the paper evaluates on held-out pairs."""
        gen = self.heldout_generator(index, 0, kind="dpo-pair")
        if self.pair_source == "data":
            if "winner" not in clip:
                return None
            return self.backbone.encode(clip["winner"]), self.backbone.encode(clip["loser"]), self.backbone.encode_condition(clip, gen)
        if self.pair_source == "synthetic":
            losers, _ = temporal_negatives(clip["video"], gen, self.negative_mix, self.shuffle_window, self.freeze_range)
            return self.backbone.encode(clip["video"]), self.backbone.encode(losers), self.backbone.encode_condition(clip, gen)
        video, g = clip["video"], self.rollouts_per_condition
        cond = self.backbone.encode_condition(clip, gen)
        rep = {k: v.repeat_interleave(g, 0) for k, v in cond.items()}
        with self.backbone.adapters_disabled():
            traj = self.backbone.rollout(rep, self.sampler, self.num_inference_steps, self.guidance, gen,
                                         num_frames=video.shape[1], height=video.shape[-2], width=video.shape[-1], decode=False)
        rewards, _ = self.score_rewards(self.backbone.decode(traj.latents), self.reward_names, batch=repeat_batch(clip, g, 1), log=False)
        if float(rewards.max() - rewards.min()) <= self.pair_margin:
            return None
        return traj.latents[int(rewards.argmax())][None], traj.latents[int(rewards.argmin())][None], cond

    @torch.no_grad()
    def heldout_extra(self, clip: dict, index: int) -> dict[str, float]:
        """DPO's held-out implicit accuracy and reward margin (Diffusion-DPO's metrics, :func:`diffusion_dpo_loss`,
        at the current ``β``) on the fixed pair of the held-out condition (:meth:`heldout_pair`), averaged over
        ``heldout_samples`` draws of ``(σ, ε)`` fixed per condition and draw. Before any update the policy is the
        reference: every ``inside`` is 0, so the accuracy (share of ``inside > 0``) is 0 and the margin 0; a DPO
        that generalises raises the accuracy above 0.5 on pairs it never trained on. NaN for a dropped pair."""
        if index not in self._heldout_pairs:
            self._heldout_pairs[index] = self.heldout_pair(clip, index)
        pair = self._heldout_pairs[index]
        if pair is None:
            return {}
        x_w, x_l, cond = pair
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        inside = []
        for draw in range(self.heldout_samples):
            sigma, noise = self.sample_noise(x_w, self.heldout_generator(index, draw, kind="dpo-noise"))
            args = (torch.cat([x_w, x_l]), both, torch.cat([sigma, sigma]), torch.cat([noise, noise]))
            policy = self.backbone.training_loss(*args)
            with self.backbone.adapters_disabled():
                ref = self.backbone.training_loss(*args)
            _, metrics = diffusion_dpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], self.current_beta())
            inside.append(float(metrics["inside"][0]))
        return {"dpo/implicit_acc": sum(v > 0 for v in inside) / len(inside), "dpo/reward_margin": sum(inside) / len(inside)}

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict, batch_idx: int) -> dict | None:
        gen = self.generator()
        with self.timer("pairs"):
            x_w, x_l, cond, weights, pair_logs = self.make_pairs(batch, gen)
            weights = weights.to(x_w.device)
        if self.trainer.strategy.reduce_boolean_decision(bool(weights.sum() == 0), all=True):
            # the same logging arguments as a training batch's (Lightning refuses a key logged with other ones later)
            self.log_dict(pair_logs, prog_bar=True, batch_size=x_w.shape[0])
            return None  # no pair above the margin on any rank: nothing to learn from
        sigma, noise = self.sample_noise(x_w, gen)  # one (σ, ε) per pair, shared by winner and loser
        with self.timer("reference"), torch.no_grad(), self.backbone.adapters_disabled():
            both = {k: torch.cat([v, v]) for k, v in cond.items()}
            ref = self.backbone.training_loss(torch.cat([x_w, x_l]), both, torch.cat([sigma, sigma]), torch.cat([noise, noise]))
            ref_w, ref_l = ref[: x_w.shape[0]], ref[x_w.shape[0] :]
        beta = self.current_beta()
        with self.timer("policy"):
            self.optimizers().zero_grad(set_to_none=True)
            step = self.decoupled_step if self.decoupled_backward else self.joint_step
            loss, loss_w, loss_l, metrics = step(x_w, x_l, cond, sigma, noise, ref_w, ref_l, weights, beta)
            if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
                self.optimizers().zero_grad(set_to_none=True)
                self.loss_is_finite(torch.tensor(float("nan")), "DPO loss (on some rank)")  # raises, or logs + counts
                return None
            stats = self.step_optimizer()
        self.updates += 1
        self.log_dict(
            {
                "train/loss": loss,
                "train/implicit_acc": metrics["implicit_acc"],
                "train/reward_margin": metrics["reward_margin"],
                "train/loss_w": loss_w.mean(),
                "train/loss_l": loss_l.mean(),
                "train/ref_loss_w": ref_w.mean(),
                "train/ref_loss_l": ref_l.mean(),
                "train/beta": beta,
                **pair_logs,
                **{f"train/{k}": v for k, v in stats.items()},
            },
            prog_bar=True,
            batch_size=x_w.shape[0],
        )
        return {"loss": loss}

    # ----------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo"] = {"updates": self.updates}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.updates = int(checkpoint.get("dpo", {}).get("updates", 0))
