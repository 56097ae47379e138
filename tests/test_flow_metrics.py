import math

import pytest
import torch

from lightning_vidalign.metrics import DynamicDegree, MotionScore, MotionSmoothness, TemporalFlickering
from lightning_vidalign.rewards.motion import DISFlow, transport_residual, video_flow


def translating(u=1.5, v=-0.7, t=6, h=64, w=64):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")

    def frame(k):
        return 0.5 + 0.25 * torch.sin(2 * math.pi * (xs - u * k) / 16) * torch.cos(2 * math.pi * (ys - v * k) / 20)

    return torch.stack([frame(k) for k in range(t)])[None, :, None]  # (1, T, 1, H, W)


def test_transport_residual_small_with_true_flow_and_large_when_shuffled():
    frames = translating()
    flow = torch.zeros(1, 5, 2, 64, 64)
    flow[:, :, 0], flow[:, :, 1] = 1.5, -0.7
    inner = (..., slice(4, -4), slice(4, -4))
    res_true = transport_residual(frames, flow)[inner].abs().mean()
    temporal_diff = (frames[:, 1:] - frames[:, :-1])[inner].abs().mean()
    assert res_true < 0.15 * temporal_diff  # ≈ 0 up to Sobel discretisation
    shuffled = frames[:, torch.tensor([0, 3, 1, 5, 2, 4])]
    res_shuf = transport_residual(shuffled, flow)[inner].abs().mean()
    assert res_shuf > 5 * res_true
    # with the estimated flow too
    est_flow, conf = video_flow(frames, DISFlow())
    assert transport_residual(frames, est_flow)[inner].abs().mean() < 0.15 * temporal_diff
    est_s, _ = video_flow(shuffled, DISFlow())
    assert transport_residual(shuffled, est_s)[inner].abs().mean() > 5 * res_true


def test_transport_residual_shapes():
    with pytest.raises(ValueError):
        transport_residual(torch.zeros(1, 4, 3, 8, 8), torch.zeros(1, 3, 2, 8, 8))
    with pytest.raises(ValueError):
        transport_residual(torch.zeros(1, 4, 1, 8, 8), torch.zeros(1, 4, 2, 8, 8))
    assert transport_residual(torch.zeros(2, 4, 1, 8, 8), torch.zeros(2, 3, 2, 8, 8)).shape == (2, 3, 1, 8, 8)


def test_dis_flow_recovers_translation_with_high_confidence():
    flow, conf = video_flow(translating(), DISFlow())
    inner = flow[..., 8:-8, 8:-8]
    assert inner[:, :, 0].mean().item() == pytest.approx(1.5, abs=0.1)
    assert inner[:, :, 1].mean().item() == pytest.approx(-0.7, abs=0.1)
    assert conf.mean() > 0.9


def test_motion_metrics_on_synthetic_videos():
    moving = translating(u=3.0, v=0.0, t=8).expand(-1, -1, 3, -1, -1).contiguous()
    static = moving[:, :1].expand(-1, 8, -1, -1, -1).contiguous()
    ms = MotionScore()
    ms.update(moving)
    assert ms.compute().item() == pytest.approx(3.0, rel=0.15)
    ms_static = MotionScore()
    ms_static.update(static)
    assert ms_static.compute().item() < 0.05
    tf = TemporalFlickering()
    tf.update(static)
    assert tf.compute().item() == pytest.approx(1.0)
    tf.reset()
    tf.update(moving)
    assert tf.compute().item() < 1.0
    dd = DynamicDegree(threshold=6.0)  # 6 px at 256 -> 1.5 px at 64
    dd.update(torch.cat([moving, static]))
    assert dd.compute().item() == pytest.approx(0.5)
    sm_smooth, sm_shuf = MotionSmoothness(), MotionSmoothness()
    sm_smooth.update(moving)
    sm_shuf.update(moving[:, torch.tensor([0, 5, 2, 7, 1, 4, 3, 6])])
    assert sm_smooth.compute() > sm_shuf.compute() + 0.02
    with pytest.raises(ValueError):
        ms.update(torch.zeros(1, 1, 3, 8, 8))


def test_transnetv2_frechet_distance_orders_real_perturbed_and_noise(real_batch):
    from lightning_vidalign.metrics import transnetv2_frechet_distance

    real = real_batch["video"].repeat(2, 1, 1, 1, 1)  # 4 clips
    real[2:] = real[2:].flip(1)
    fd = transnetv2_frechet_distance()
    fd.update(real, real=True)
    fd.update(real.flip(0), real=False)
    same = float(fd.compute())
    fd.reset()  # keeps the real statistics
    g = torch.Generator().manual_seed(0)
    fd.update((real + 0.05 * torch.randn(real.shape, generator=g)).clamp(0, 1), real=False)
    perturbed = float(fd.compute())
    fd.reset()
    fd.update(torch.rand(real.shape, generator=g), real=False)
    noise = float(fd.compute())
    assert abs(same) < 1e-3 and same < perturbed < noise and noise > 1.0
