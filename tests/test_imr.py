import pytest
import torch

from lightning_vidalign.rewards import IMRReward


def _clips(dataset):
    return torch.stack([dataset[i]["video"] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def heldout_clips():
    """Real clips, held out in time: the last 30% of every source (no frame shared with training)."""
    from lightning_vidalign.datamodules import VideoClipDataModule

    dm = VideoClipDataModule(clip_stride=0.1, val_fraction=0.3, val_split="tail")
    dm.setup("fit")
    return _clips(dm.train_set), _clips(dm.val_set)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["imr", "lmr"])
def test_discriminator_separates_real_from_corrupted_heldout_clips(kind, heldout_clips):
    """Issue 3's target: held-out balanced accuracy > 0.9 against reversed / shuffled / frozen copies.

    Measured and reported per corruption (see the issue note): shuffled and frozen copies are
    separated, reversal is not (IMR: the transport residual of a reversed pair is minus the
    forward one, correlation 0.95 measured, so the residual maps carry no arrow of time) and both
    discriminators overfit the ~19 s of bundled video (train AUC 0.94-0.99, held-out 0.6-0.7); the
    target is not met and this stays a real assertion under ``slow`` (currently failing).
    """
    from lightning_vidalign.algorithms.reward_pretrain import heldout_corruption_accuracy, train_on_corruptions
    from lightning_vidalign.rewards import LMRReward

    train, val = heldout_clips
    reward = IMRReward(lr=3e-4, ema_decay=0.9, seed=0) if kind == "imr" else LMRReward(num_queries=256, lr=3e-4, ema_decay=0.9, seed=0)
    history = train_on_corruptions(reward, train, STEPS, batch_size=6, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in history)
    acc = heldout_corruption_accuracy(reward, val)
    print(f"{kind}: {STEPS} steps, {len(train)} train / {len(val)} held-out clips: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["balanced"] > 0.9


STEPS = 300  # the protocol of the issue-3 note: held-out balanced accuracy measured 0.55 (IMR), ~0.63 (LMR)


def test_reward_state_roundtrip_ema_and_errors(tmp_path, datamodule):
    reward = IMRReward(seed=1)
    videos = _clips(datamodule.val_set)
    before = [p.clone() for p in reward.ema.parameters()]
    reward.discriminator_step(videos, videos.flip(1))
    after_disc = list(reward.disc.parameters())
    for b, e, d in zip(before, reward.ema.parameters(), after_disc):
        torch.testing.assert_close(e, b + (1 - reward.ema_decay) * (d - b))  # one EMA step
    path = tmp_path / "imr.pt"
    reward.save_pretrained(str(path))
    other = IMRReward(seed=2, pretrained=str(path))
    torch.testing.assert_close(other.logits(videos), reward.logits(videos))
    assert other.num_updates == 1
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        IMRReward(pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError):
        IMRReward(r_min=1.0, r_max=-1.0)
