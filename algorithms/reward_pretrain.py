"""Reward pretraining: train the motion discriminators before RL (SHIFT §4.1, App. C)."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_vidalign.module import VideoAlignModule
from lightning_vidalign.rewards.base import find_rewards
from lightning_vidalign.rewards.motion.imr import AdversarialDiscriminatorReward


def temporal_corruptions(video: Tensor, generator: torch.Generator) -> Tensor:
    """Temporally corrupted copies of real clips: reversal, local shuffle, freeze from the middle.

    Each clip gets one corruption, cycling ``reverse, shuffle, freeze`` by position. Local shuffle
    permutes frames inside windows of 3; freeze repeats frame ``T//2`` to the end. Our choice.

    Args:
        video: ``(B, T, C, H, W)``.

    Returns:
        Same shape; the spatial content of each frame is unchanged, only its order/timing.
    """
    from lightning_vidalign.datamodules.preference import freeze_from, local_shuffle, reverse_frames

    t = video.shape[1]
    out = []
    for i, v in enumerate(video):
        kind = i % 3
        out.append(reverse_frames(v) if kind == 0 else local_shuffle(v, 3, generator) if kind == 1 else freeze_from(v, t // 2))
    return torch.stack(out)


class RewardPretrain(VideoAlignModule):
    """Pretrain the adversarial reward callbacks on real clips vs negatives; the policy is frozen.

    The discriminators update themselves in their ``on_train_batch_end`` from the ``real``/``fake``
    videos this ``training_step`` returns (the same path SHIFT uses). Validation logs each
    reward's held-out accuracy ``val/reward/<name>/accuracy`` (EMA copy, balanced).

    Args:
        negatives: ``"rollouts"`` (``negatives_per_real`` base-model samples per real clip, paper:
            4) or ``"corrupt"`` (temporally corrupted real clips, see :func:`temporal_corruptions`).
        negatives_per_real: rollouts per real clip.
        **kwargs: :class:`VideoAlignModule` arguments (sampler, steps, guidance, seed).
    """

    def __init__(self, *args, negatives: str = "rollouts", negatives_per_real: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if negatives not in ("rollouts", "corrupt"):
            raise ValueError(f"RewardPretrain: negatives must be 'rollouts' or 'corrupt', got {negatives!r}")
        self.negatives, self.negatives_per_real = negatives, negatives_per_real

    def configure_optimizers(self):
        return None  # only the reward callbacks learn (with their own optimizers)

    @torch.no_grad()
    def make_negatives(self, batch: dict, generator: torch.Generator) -> Tensor:
        video = batch["video"]
        if self.negatives == "corrupt":
            return temporal_corruptions(video, generator)
        rep = {k: (v.repeat_interleave(self.negatives_per_real, 0) if torch.is_tensor(v) else v) for k, v in batch.items() if k in ("video", "first_frame")}
        with self.backbone.adapters_disabled():
            return self.rollout_videos(rep, generator)

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        fake = self.make_negatives(batch, self.generator())
        return {"real": batch["video"], "fake": fake}

    def evaluation_step(self, batch: dict, batch_idx: int, prefix: str) -> None:
        """Held-out balanced accuracy of each adversarial reward: ``<prefix>/reward/<name>/accuracy``."""
        fake = self.make_negatives(batch, self.generator(tag=2000 + batch_idx, batch=0))
        for cb in find_rewards(self.trainer):
            if isinstance(cb, AdversarialDiscriminatorReward):
                self.log(f"{prefix}/reward/{cb.name}/accuracy", cb.accuracy(batch["video"], fake), batch_size=batch["video"].shape[0])

    def evaluation_epoch_end(self, prefix: str) -> None:
        pass
