"""Supervised fine-tuning on real clips (optionally reward-weighted, TeleBoost §2.3)."""
from __future__ import annotations

import torch

from lightning_vidalign.algorithms.advantages import failure_weights
from lightning_vidalign.algorithms.losses import sft_loss
from lightning_vidalign.module import VideoAlignModule


class SFT(VideoAlignModule):
    """SFT: ``L = mean_b w_b·ℓ(x0_b, σ_b, ε_b)`` on real clips (DESIGN §3).

    Args:
        reward_weighting: weight each real clip by :func:`failure_weights` of the reward
            callbacks' scores (TeleBoost §2.3, "reward-weighted SFT"); off: ``w = 1``.
        weight_temperature: softmax temperature of the weights.
        rewards: names of the reward callbacks to use (None: all); weighted by their ``weight``.
        *args, **kwargs: :class:`~lightning_vidalign.module.VideoAlignModule` arguments.
    """

    trains_from_latent_cache = True  # real clips through backbone.encode_batch

    def __init__(self, *args, reward_weighting: bool = False, weight_temperature: float = 1.0, rewards: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_weighting, self.weight_temperature, self.reward_names = reward_weighting, weight_temperature, rewards

    @torch.no_grad()
    def sample_weights(self, batch: dict) -> torch.Tensor | None:
        """Per-clip loss weights ``(B,)`` (None when reward weighting is off)."""
        if not self.reward_weighting:
            return None
        video = self.real_video(batch, "SFT(reward_weighting=True)")
        rewards, _ = self.score_rewards(video, self.reward_names, batch=batch, log=False)
        rewards = self.sequence_parallel_broadcast(rewards)  # one weighting per sequence-parallel group
        weights = failure_weights(rewards, self.weight_temperature)
        self.log_dict({"train/weight_max": weights.max(), "reward/total/mean": rewards.mean()}, batch_size=video.shape[0])
        return weights

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        gen = self.generator()
        x0, cond = self.backbone.encode_batch(batch, gen)  # from the latent cache when the batch carries it
        sigma, noise = self.sample_noise(x0, gen)
        loss_real = self.backbone.training_loss(x0, cond, sigma, noise)
        loss = sft_loss(loss_real, self.sample_weights(batch))
        stats = self.optimize(loss)
        self.log_dict({"train/loss": loss.detach(), **{f"train/{k}": v for k, v in stats.items()}}, prog_bar=True, batch_size=x0.shape[0])
        return {"loss": loss.detach()}
