"""Supervised fine-tuning on real clips."""
from __future__ import annotations

from lightning_vidalign.algorithms.losses import sft_loss
from lightning_vidalign.module import VideoAlignModule


class SFT(VideoAlignModule):
    """SFT: ``L = mean_b ℓ(x0_b, σ_b, ε_b)`` on real clips (DESIGN §3).

    Args: see :class:`~lightning_vidalign.module.VideoAlignModule`.
    """

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        gen = self.generator()
        x0 = self.backbone.encode(batch["video"])
        cond = self.backbone.encode_condition(batch, gen)
        sigma, noise = self.sample_noise(x0, gen)
        loss_real = self.backbone.training_loss(x0, cond, sigma, noise)
        loss = sft_loss(loss_real)
        stats = self.optimize(loss)
        self.log_dict({"train/loss": loss.detach(), **{f"train/{k}": v for k, v in stats.items()}}, prog_bar=True, batch_size=x0.shape[0])
        return {"loss": loss.detach()}
