"""Reward pretraining: train the motion discriminators before RL (SHIFT §4.1, App. C)."""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_vidalign.module import VideoAlignModule
from lightning_vidalign.rewards.base import find_rewards
from lightning_vidalign.rewards.motion.imr import AdversarialDiscriminatorReward


CORRUPTIONS = ("reversed", "shuffled", "frozen")


def temporal_corruptions(video: Tensor, generator: torch.Generator, kind: str | None = None) -> Tensor:
    """Temporally corrupted copies of real clips: reversal, local shuffle, freeze from the middle.

    With ``kind=None`` clip ``i`` gets corruption ``(i + o) mod 3`` in the order of :data:`CORRUPTIONS`,
    with ``o`` drawn from ``generator`` per call (so a batch of 2 still sees all three over time).
    Local shuffle permutes frames inside windows of 3; freeze repeats frame ``T//2`` to the end. Our choice.

    Args:
        video: ``(B, T, C, H, W)``.
        generator: RNG of the offset and the shuffles.
        kind: one of :data:`CORRUPTIONS` for every clip, or None (mixed, as above).

    Returns:
        Same shape; the spatial content of each frame is unchanged, only its order/timing.

    Raises:
        ValueError: on an unknown kind.
    """
    from lightning_vidalign.datamodules.preference import freeze_from, local_shuffle, reverse_frames

    if kind is not None and kind not in CORRUPTIONS:
        raise ValueError(f"temporal_corruptions: kind must be one of {CORRUPTIONS} or None, got {kind!r}")
    t = video.shape[1]
    offset = int(torch.randint(0, 3, (1,), generator=generator)) if kind is None else 0
    out = []
    for i, v in enumerate(video):
        k = kind or CORRUPTIONS[(i + offset) % 3]
        out.append(reverse_frames(v) if k == "reversed" else local_shuffle(v, 3, generator) if k == "shuffled" else freeze_from(v, t // 2))
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
        """Held-out accuracy of each adversarial reward (EMA copy).

        Logs ``<prefix>/reward/<name>/accuracy`` = ``0.5·(acc_real + acc_fake)``. With corrupted
        negatives every held-out clip is scored under each of the three corruptions, ``acc_fake`` is
        their mean, and each is also logged (``accuracy_real``, ``accuracy_reversed``, ...).
        """
        n = batch["video"].shape[0]
        g = self.generator(tag=2000 + batch_idx, batch=0)
        if self.negatives == "corrupt":
            fakes = {k: temporal_corruptions(batch["video"], g, k) for k in CORRUPTIONS}
        else:
            fakes = {"rollouts": self.make_negatives(batch, g)}
        for cb in find_rewards(self.trainer):
            if not isinstance(cb, AdversarialDiscriminatorReward):
                continue
            acc_real = (cb.logits(batch["video"]) > 0).float().mean().item()
            acc_fake = {k: (cb.logits(v) < 0).float().mean().item() for k, v in fakes.items()}
            mean_fake = sum(acc_fake.values()) / len(acc_fake)
            metrics = {f"{prefix}/reward/{cb.name}/accuracy": 0.5 * (acc_real + mean_fake), f"{prefix}/reward/{cb.name}/accuracy_real": acc_real}
            metrics.update({f"{prefix}/reward/{cb.name}/accuracy_{k}": v for k, v in acc_fake.items()})
            self.log_dict(metrics, batch_size=n)

    def evaluation_epoch_end(self, prefix: str) -> None:
        pass
