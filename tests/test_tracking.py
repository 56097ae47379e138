"""Point tracking (LMR's input): pyramidal Lucas–Kanade with a forward–backward check."""
import numpy as np
import pytest
import torch

from lightning_vidalign.rewards.motion.tracking import LucasKanadeTracker, track_points


def _textured(h, w, seed, smooth=2):
    g = torch.Generator().manual_seed(seed)
    tex = torch.rand(1, 1, h + 8, w + 8, generator=g)
    tex = torch.nn.functional.avg_pool2d(tex, 2 * smooth + 1, stride=1)[0, 0]
    return (tex - tex.min()) / (tex.max() - tex.min())


def _scene(t=10, v=(2.0, 1.0), occluder_from=None):
    """A 24x24 textured square moving at v pixels/frame over a textured static background (96x96);
    optionally a flat occluder sliding over the square's right part from frame ``occluder_from``."""
    bg, sq = _textured(96, 96, 0) * 0.5, _textured(24, 24, 1) * 0.5 + 0.5
    frames, origin = [], np.array([20.0, 30.0])
    for i in range(t):
        f = bg[:96, :96].clone()
        x, y = (origin + i * np.array(v)).round().astype(int)  # integer motion: exact ground truth
        f[y : y + 24, x : x + 24] = sq[:24, :24]
        if occluder_from is not None and i >= occluder_from:
            f[:, x + 14 : x + 40] = 0.2
        frames.append(f)
    video = torch.stack(frames)[None, :, None].expand(1, t, 3, 96, 96).clone()
    return video, origin


@pytest.mark.parametrize("v", [(2.0, 1.0), (-1.0, 2.0)])
def test_lk_tracks_a_moving_textured_square_within_one_pixel(v):
    video, origin = _scene(v=v)
    queries = torch.tensor([[[origin[0] + 6, origin[1] + 6], [origin[0] + 12, origin[1] + 12], [origin[0] + 17, origin[1] + 8]]], dtype=torch.float32)
    tracks, vis, conf = track_points(video, queries)
    assert tracks.shape == (1, 3, 10, 2) and vis.shape == conf.shape == (1, 3, 10)
    truth = queries[0][:, None, :] + torch.arange(10).view(1, 10, 1) * torch.tensor(v).view(1, 1, 2)
    err = (tracks[0] - truth).norm(dim=-1)
    assert float(err.max()) < 1.0, err
    assert bool((vis == 1).all()) and float(conf.min()) > 0.3


def test_occluded_point_loses_visibility():
    video, origin = _scene(occluder_from=5)
    queries = torch.tensor([[[origin[0] + 6, origin[1] + 12], [origin[0] + 20, origin[1] + 12]]], dtype=torch.float32)  # left part stays visible
    tracks, vis, conf = track_points(video, queries, LucasKanadeTracker(fb_threshold=1.0))
    assert bool((vis[0, 0] == 1).all())  # never occluded
    assert bool((vis[0, 1, :5] == 1).all()) and float(vis[0, 1, 5:].sum()) == 0  # hidden from frame 5 on
    assert float(conf[0, 1, 5:].max()) == 0.0


def test_track_points_bad_shapes():
    with pytest.raises(ValueError, match="queries"):
        track_points(torch.rand(1, 4, 3, 32, 32), torch.rand(1, 5))
