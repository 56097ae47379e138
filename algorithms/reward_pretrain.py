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
            acc = accuracy_from_logits(cb.logits(batch["video"]), {k: cb.logits(v) for k, v in fakes.items()})
            metrics = {f"{prefix}/reward/{cb.name}/accuracy": acc["balanced"], f"{prefix}/reward/{cb.name}/accuracy_real": acc["real"]}
            metrics.update({f"{prefix}/reward/{cb.name}/accuracy_{k}": acc[k] for k in fakes})
            self.log_dict(metrics, batch_size=n)

    def evaluation_epoch_end(self, prefix: str) -> None:
        pass


def train_on_corruptions(reward: AdversarialDiscriminatorReward, train: Tensor, steps: int, batch_size: int = 6, generator: torch.Generator | None = None) -> list[dict]:
    """Train a discriminator on real clips vs their corrupted copies, outside Lightning.

    Each step draws ``batch_size`` clips and gives one third of them each corruption of
    :data:`CORRUPTIONS`, so every batch holds content-matched negatives of all three kinds.

    Args:
        reward: the reward whose discriminator learns (its own optimizer/EMA).
        train: ``(N, T, 3, H, W)`` real clips in ``[0, 1]``.
        steps: discriminator steps. batch_size: real clips per step (a multiple of 3).
        generator: RNG of the batches and shuffles.

    Returns:
        The per-step metrics of :meth:`AdversarialDiscriminatorReward.discriminator_step`.

    Raises:
        ValueError: if ``batch_size`` is not a positive multiple of 3.
    """
    if batch_size < 3 or batch_size % 3:
        raise ValueError(f"train_on_corruptions: batch_size must be a positive multiple of 3, got {batch_size}")
    g = generator or torch.Generator().manual_seed(0)
    per = batch_size // 3
    history = []
    for _ in range(steps):
        real = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        fake = torch.cat([temporal_corruptions(real[i * per : (i + 1) * per], g, k) for i, k in enumerate(CORRUPTIONS)])
        history.append(reward.discriminator_step(real, fake))
    return history


def accuracy_from_logits(real: Tensor, fakes: dict[str, Tensor]) -> dict[str, float]:
    """Accuracy and AUC of a discriminator from its logits on real clips and on kinds of negatives.

    Args:
        real: ``(N,)`` logits of real clips (positives).
        fakes: ``{kind: (M_kind,)}`` logits of each kind of negative.

    Returns:
        ``real``: share of real logits > 0; per kind: share of its logits < 0 and ``auc_<kind>`` =
        P(real logit > negative logit) (ties count 1/2; threshold-free, which is what a
        group-relative advantage uses); ``balanced`` = ``0.5·(real + mean over kinds)``; ``auc`` = mean
        of the kinds' AUCs.
    """
    out = {"real": (real > 0).float().mean().item()}
    for k, fake in fakes.items():
        out[k] = (fake < 0).float().mean().item()
        diff = real[:, None] - fake[None, :]
        out[f"auc_{k}"] = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()
    out["balanced"] = 0.5 * (out["real"] + sum(out[k] for k in fakes) / len(fakes))
    out["auc"] = sum(out[f"auc_{k}"] for k in fakes) / len(fakes)
    return out


@torch.no_grad()
def heldout_corruption_accuracy(reward: AdversarialDiscriminatorReward, val: Tensor, generator: torch.Generator | None = None, draws: int = 2) -> dict[str, float]:
    """:func:`accuracy_from_logits` of the EMA discriminator on held-out real clips vs each corruption
    of :data:`CORRUPTIONS` of them (``draws`` draws of the random shuffle, one of the others)."""
    g = generator or torch.Generator().manual_seed(1)
    real = reward.logits(val)
    fakes = {k: torch.cat([reward.logits(temporal_corruptions(val, g, k)) for _ in range(1 if k != "shuffled" else draws)]) for k in CORRUPTIONS}
    return accuracy_from_logits(real, fakes)
