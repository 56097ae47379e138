"""Long-term Motion Reward: query sampling, NCC, trajectory features, discriminator, reward contract."""
import pytest
import torch

from lightning_vidalign.rewards import LMRReward
from lightning_vidalign.rewards.motion import LMRDiscriminator, lmr_features, patch_ncc, sample_queries
from lightning_vidalign.rewards.motion.lmr import CoTracker3Tracker


def _moving_texture(t=6, v=(2, 1), size=48, seed=0):
    """A smooth random texture translated by integer ``v`` pixels per frame (exact ground truth)."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.nn.functional.avg_pool2d(torch.rand(1, 1, size + 64, size + 64, generator=g), 5, stride=1)[0, 0]
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    frames = [tex[32 - i * v[1] : 32 - i * v[1] + size, 32 - i * v[0] : 32 - i * v[0] + size] for i in range(t)]
    return torch.stack(frames)[None, :, None].expand(1, t, 3, size, size).clone()


def test_sample_queries_random_and_grid():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    q = sample_queries(2, 500, 40, 60, "random", margin=3, generator=g())
    assert q.shape == (2, 500, 2)
    assert q[..., 0].min() >= 3 and q[..., 0].max() <= 60 - 1 - 3 and q[..., 1].min() >= 3 and q[..., 1].max() <= 40 - 1 - 3
    assert torch.equal(q, sample_queries(2, 500, 40, 60, "random", margin=3, generator=g()))
    assert not torch.equal(q[0], q[1])  # independent per video
    grid = sample_queries(2, 16, 65, 65, "grid")
    # 4x4 lattice of cell centres over [0, 64]: 8, 24, 40, 56
    assert sorted(set(grid[0, :, 0].tolist())) == [8.0, 24.0, 40.0, 56.0] == sorted(set(grid[0, :, 1].tolist()))
    assert torch.equal(grid[0], grid[1])
    assert sample_queries(1, 10, 64, 64, "grid").shape == (1, 10, 2)  # lattice 4x3 = 12 -> 10 kept
    for bad in [dict(mode="poisson"), dict(num=0), dict(margin=40)]:
        kw = dict(batch=1, num=4, height=64, width=64, mode="random", margin=0)
        kw.update(bad)
        with pytest.raises(ValueError):
            sample_queries(**kw)


def test_patch_ncc_hand_cases():
    video = _moving_texture(t=3, v=(0, 0))
    gray = video[:, :, :1]
    q = torch.tensor([[[20.0, 20.0], [10.5, 30.25]]])
    still = q[:, :, None].expand(1, 2, 3, 2)
    torch.testing.assert_close(patch_ncc(gray, q, still, eps=1e-9), torch.ones(1, 2, 3), atol=1e-5, rtol=0)
    affine = gray.clone()
    affine[:, 1] = 0.5 * gray[:, 1] + 0.2  # NCC is invariant to gain and offset
    affine[:, 2] = 1.0 - gray[:, 2]  # and flips sign under negation
    ncc = patch_ncc(affine, q, still, eps=1e-9)
    torch.testing.assert_close(ncc[..., 1], torch.ones(1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(ncc[..., 2], -torch.ones(1, 2), atol=1e-5, rtol=0)
    flat = torch.full_like(gray, 0.3)
    assert patch_ncc(flat, q, still).abs().max() < 1e-3
    # a window by hand: 3x3 patch around (1, 1) in frame 0 vs around (2, 1) in frame 1
    img = torch.arange(25.0).view(5, 5) ** 1.5
    frames = torch.stack([img, img.roll(1, 1)])[None, :, None]
    a = img[0:3, 0:3].flatten()
    b = img.roll(1, 1)[0:3, 1:4].flatten()
    a, b = a - a.mean(), b - b.mean()
    expect = (a * b).sum() / ((a.pow(2).sum() * b.pow(2).sum()).sqrt() + 1e-4)
    got = patch_ncc(frames, torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[[1.0, 1.0], [2.0, 1.0]]]]), patch_size=3)
    torch.testing.assert_close(got[0, 0, 1], expect)
    with pytest.raises(ValueError):
        patch_ncc(gray, q, still, patch_size=4)


def test_ncc_follows_the_true_track():
    video = _moving_texture(t=5, v=(2, 1))
    gray = video[:, :, :1]
    q = torch.tensor([[[20.0, 22.0], [30.0, 15.0]]])
    true = q[:, :, None] + torch.tensor([2.0, 1.0]) * torch.arange(5.0).view(1, 1, 5, 1)
    assert patch_ncc(gray, q, true).min() > 0.999
    assert patch_ncc(gray, q, q[:, :, None].expand(1, 2, 5, 2))[..., 1:].mean() < 0.9


def test_lmr_features_exact_values():
    tracks = torch.tensor([[[[10.0, 10.0], [12.0, 9.0], [12.0, 9.0]]]])  # (1, 1, 3, 2)
    vis = torch.tensor([[[1.0, 1.0, 0.0]]])
    conf = torch.tensor([[[1.0, 0.8, 0.0]]])
    ncc = torch.tensor([[[1.0, 0.9, 0.2]]])
    q = torch.tensor([[[10.0, 10.0]]])
    f = lmr_features(tracks, vis, conf, ncc, q, height=21, width=41)
    assert f.shape == (1, 1, 2, 7)
    scale = 100 / 41
    expect = torch.tensor([[2 * scale, -1 * scale, 1.0, 0.8, 0.9, 2 * 10 / 40 - 1, 2 * 10 / 20 - 1], [0.0, 0.0, 0.0, 0.0, 0.2, -0.5, 0.0]])
    torch.testing.assert_close(f[0, 0], expect)
    with pytest.raises(ValueError):
        lmr_features(tracks[:, :, :1], vis[:, :, :1], conf[:, :, :1], ncc[:, :, :1], q, 21, 41)


def test_discriminator_is_invariant_to_point_order_and_resamples_time():
    torch.manual_seed(0)
    d = LMRDiscriminator(num_steps=7).eval()
    x = torch.randn(3, 50, 7, 7)
    perm = torch.randperm(50)
    torch.testing.assert_close(d(x), d(x[:, perm]), atol=1e-5, rtol=1e-5)
    assert d(x).shape == (3,)
    assert d(torch.randn(2, 10, 15, 7)).shape == (2,)  # 16-frame clips on a 8-frame discriminator
    with pytest.raises(ValueError):
        d(torch.randn(1, 10, 7, 5))


def test_lmr_reward_contract_and_resume(tmp_path, datamodule):
    videos = torch.stack([datamodule.val_set[i]["video"] for i in range(len(datamodule.val_set))])[:2]
    reward = LMRReward(num_queries=64, seed=1, lr=1e-3)
    r = reward.score(videos)
    assert r.shape == (2,) and torch.isfinite(r).all() and (r.abs() <= reward.r_max).all()
    assert reward.timer.seconds["estimation"] > 0 and reward.timer.seconds["discriminator"] > 0
    before = [p.clone() for p in reward.disc.parameters()]
    m = reward.discriminator_step(videos, videos.flip(1))
    assert set(m) == {"loss", "acc", "logit_real", "logit_fake"}
    assert any(not torch.equal(b, p) for b, p in zip(before, reward.disc.parameters()))
    path = tmp_path / "lmr.pt"
    reward.save_pretrained(str(path))
    again = LMRReward(num_queries=64, seed=1, pretrained=str(path))
    assert again.query_draws == reward.query_draws == 3
    # same state -> same queries -> same features and rewards
    torch.testing.assert_close(again.features(videos), reward.features(videos))
    f1, f2 = reward.features(videos), reward.features(videos)
    assert not torch.equal(f1[..., 5:], f2[..., 5:])  # random queries are redrawn at every call
    grid = LMRReward(num_queries=64, query_sampling="grid")
    g1, g2 = grid.features(videos), grid.features(videos)
    torch.testing.assert_close(g1, g2)  # the grid is fixed
    with pytest.raises(ValueError):
        LMRReward(query_sampling="sobol")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        LMRReward(pretrained=str(tmp_path / "nope.pt"))


def test_cotracker3_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scaled_offline.pth"):
        CoTracker3Tracker(str(tmp_path / "scaled_offline.pth"))
    ckpt = tmp_path / "scaled_offline.pth"
    torch.save({}, ckpt)
    with pytest.raises(ImportError, match="cotracker"):
        CoTracker3Tracker(str(ckpt))
