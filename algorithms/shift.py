"""SHIFT: Smooth Hybrid Fine-Tuning with adversarial motion rewards (SHIFT §4, App. A.3, C)."""
from __future__ import annotations

import torch

from lightning_vidalign.algorithms.advantages import grpo_advantages, shift_advantages
from lightning_vidalign.algorithms.losses import shift_loss
from lightning_vidalign.buffer import RolloutBuffer
from lightning_vidalign.module import VideoAlignModule


class SHIFT(VideoAlignModule):
    """Advantage-weighted diffusion loss on the model's own rollouts plus an SFT anchor.

    A round takes the first frames of the current real batch (``B`` conditions), draws
    ``rollouts_per_condition`` (``G``) rollouts each with any sampler (no trajectory kept), scores
    them with the reward callbacks (EMA discriminators), and fills the :class:`RolloutBuffer` with
    ``A = clip(r - mean_group(r), ±advantage_clip)`` (``advantage_normalization="center"``, the paper's form) or
    ``A = clip((r - mean_group(r)) / (std_group(r) + 1e-4), ±advantage_clip)`` (``"std"``). Each training step then takes one minibatch of
    ``B`` rollouts and the current ``B`` real clips:
    ``L = lam·mean(A·ℓ(x̃0)) + w_sft·mean ℓ(x0)``, with one ``(σ, ε)`` shared by both terms when
    ``noise_alignment`` (SHIFT App. C "match_sigmas"). A round lasts ``passes·G`` steps.

    Args:
        lam: weight of the advantage term, ``1/β`` (paper: 0.01, β = 100).
        w_sft: weight of the SFT anchor (paper: 1).
        rollouts_per_condition: ``G`` (paper: 8).
        passes: ``K`` passes over each round (paper: 10).
        advantage_clip: ``c`` (lost in extraction; our choice 5).
        baseline: ``"group"`` (mean over the ``G`` rollouts of a condition) or ``"batch"``.
        advantage_normalization: ``"center"`` (SHIFT §4.3 / App. C: recentring only, the default) or ``"std"``
            (also divided by the group's population std, as GRPO; our option: makes ``lam`` independent of the
            reward's scale; a zero-variance group gets advantage 0).
        noise_alignment: share ``(σ, ε)`` between the fake and real terms (SHIFT A1).
        rewards: names of the reward callbacks to sum (weights from each callback's ``weight``);
            None = all reward callbacks.
        rollout_batch_size: rollouts per backbone call (bounds memory).
        **kwargs: :class:`VideoAlignModule` arguments.
    """

    trains_from_latent_cache = True  # real clips through backbone.encode_batch

    def __init__(
        self,
        *args,
        lam: float = 0.01,
        w_sft: float = 1.0,
        rollouts_per_condition: int = 8,
        passes: int = 10,
        advantage_clip: float = 5.0,
        baseline: str = "group",
        advantage_normalization: str = "center",
        noise_alignment: bool = True,
        rewards: list[str] | None = None,
        rollout_batch_size: int = 8,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if baseline not in ("group", "batch"):
            raise ValueError(f"SHIFT: baseline must be 'group' or 'batch', got {baseline!r}")
        if advantage_normalization not in ("center", "std"):
            raise ValueError(f"SHIFT: advantage_normalization must be 'center' or 'std', got {advantage_normalization!r}")
        if rollouts_per_condition < 1 or passes < 1:
            raise ValueError(f"SHIFT: rollouts_per_condition and passes must be >= 1, got {rollouts_per_condition}, {passes}")
        self.lam, self.w_sft = lam, w_sft
        self.rollouts_per_condition, self.passes = rollouts_per_condition, passes
        self.advantage_clip, self.baseline = advantage_clip, baseline
        self.advantage_normalization = advantage_normalization
        self.noise_alignment = noise_alignment
        self.reward_names = rewards
        self.rollout_batch_size = rollout_batch_size
        self.buffer = RolloutBuffer(passes=passes, minibatch_size=1, seed=self.seed)

    # ------------------------------------------------------------ the round
    @torch.no_grad()
    def fill_buffer(self, batch: dict, generator: torch.Generator) -> None:
        """Roll out ``G`` videos per condition of ``batch``, score them, fill the buffer."""
        b, g = self.clip_size(batch)[0], self.rollouts_per_condition
        with self.timer("rollout"):  # latents (with overlap_rewards: each chunk decoded and scored in the background at once)
            conditions = self.backbone.condition_batch(batch, generator)  # from the latent cache when the batch carries it
            rollouts = self.generate_rollouts(batch, conditions, generator, g, self.sampler, decode=False)
        with self.timer("reward"):  # (includes the "decode" stage: chunk by chunk, each before its scoring)
            rewards = self.sequence_parallel_broadcast(self.score_rollouts(rollouts).rewards)  # one set per sequence-parallel group
        videos = rollouts.videos
        group_ids = torch.arange(b, device=videos.device).repeat_interleave(g) if self.baseline == "group" else torch.zeros(b * g, dtype=torch.long, device=videos.device)
        if self.advantage_normalization == "std":
            advantages, _ = grpo_advantages(rewards, group_ids, clip=self.advantage_clip)
        else:
            advantages = shift_advantages(rewards, group_ids, self.advantage_clip)
        self.buffer.minibatch_size = b
        self.buffer.fill(latents=rollouts.latents, video=videos, rewards=rewards, advantages=advantages, group_ids=group_ids, **rollouts.conditions)
        self.log_dict(
            {
                "reward/total/mean": rewards.mean(),
                "reward/total/std": rewards.std(unbiased=False),
                "adv/mean": advantages.mean(),
                "adv/abs_mean": advantages.abs().mean(),
                "adv/clip_frac": (advantages.abs() >= self.advantage_clip).float().mean(),
                "train/round": float(self.buffer.round),
            },
            batch_size=b * g,
        )

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        gen = self.generator()
        if "video" not in batch and any(getattr(cb, "adversarial", False) for cb in self._reward_callbacks()):
            self.real_video(batch, "SHIFT's adversarial reward (its discriminator trains on the real clips)")
        if self.buffer.exhausted:
            self.fill_buffer(batch, gen)
        with self.timer("generator_step"):
            fake = {k: v.to(self.device) for k, v in self.buffer.next_minibatch().items()}
            x0_real, cond_real = self.backbone.encode_batch(batch, gen)  # the real branch: from the latent cache when given
            sigma, noise = self.sample_noise(x0_real, gen)
            if self.noise_alignment:
                if fake["latents"].shape != x0_real.shape:
                    raise ValueError(f"SHIFT noise_alignment needs equal fake/real latent shapes, got {tuple(fake['latents'].shape)} vs {tuple(x0_real.shape)}")
                sigma_fake, noise_fake = sigma, noise
            else:
                sigma_fake, noise_fake = self.sample_noise(fake["latents"], gen)
            cond_fake = {k: fake[k] for k in self.backbone.condition_keys}
            loss_fake = self.backbone.training_loss(fake["latents"], cond_fake, sigma_fake, noise_fake)
            loss_real = self.backbone.training_loss(x0_real, cond_real, sigma, noise)
            loss = shift_loss(loss_fake, loss_real, fake["advantages"], self.lam, self.w_sft)
            stats = self.optimize(loss)
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/loss_fake": loss_fake.detach().mean(),
                "train/loss_real": loss_real.detach().mean(),
                "train/awr_term": (fake["advantages"] * loss_fake.detach()).mean(),
                **{f"train/{k}": v for k, v in stats.items()},
            },
            prog_bar=True,
            batch_size=x0_real.shape[0],
        )
        return {"loss": loss.detach(), "real": batch.get("video"), "fake": fake["video"]}

    def _reward_callbacks(self) -> list:
        from lightning_vidalign.rewards.base import RewardCallback

        return [cb for cb in self.trainer.callbacks if isinstance(cb, RewardCallback)] if self._trainer is not None else []

    # ----------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = self.buffer.state_dict()
        # every rank filled its own buffer from its own data: keep all of them (the file is written by
        # rank 0 alone, but this hook runs on every rank, so the gather is collective)
        state["data_per_rank"] = self.gather_per_rank(state.pop("data"))
        checkpoint["rollout_buffer"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "rollout_buffer" in checkpoint:
            state = dict(checkpoint["rollout_buffer"])
            if "data_per_rank" in state:
                per_rank = state.pop("data_per_rank")
                if len(per_rank) != max(1, self.trainer.world_size if self._trainer is not None else 1):
                    raise ValueError(f"checkpoint holds rollout buffers of {len(per_rank)} rank(s); resuming with another world size is not supported")
                state["data"] = per_rank[self.global_rank if self._trainer is not None else 0]
            self.buffer.load_state_dict(state)
