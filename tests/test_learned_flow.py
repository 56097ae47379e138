"""Learned flow estimators behind the IMR flow interface (random initialisation: no weights offline)."""
import pytest
import torch

from lightning_vidalign.rewards import IMRReward
from lightning_vidalign.rewards.motion import SEARAFTFlow, TorchvisionRAFTFlow, imr_features, video_flow


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 72, 72), 5, stride=1)
    return torch.stack([base[..., 2:66, 2:66], base[..., 2:66, 4:68]], 1)  # (1, 2, 3, 64, 64): a 2-px shift


@pytest.mark.parametrize("cls", [SEARAFTFlow, TorchvisionRAFTFlow])
def test_learned_flow_shapes_and_local_weights(cls, pair, tmp_path):
    torch.manual_seed(0)
    est = cls(batch_size=4) if cls is TorchvisionRAFTFlow else cls(batch_size=4, iters=2)
    flow, conf = video_flow(pair, est)
    assert flow.shape == (1, 1, 2, 64, 64) and conf.shape == (1, 1, 1, 64, 64)
    assert torch.isfinite(flow).all() and conf.min() >= 0 and conf.max() <= 1
    # weights from a local file give bitwise the same flow
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in est.model.state_dict().items()}}, path)
    torch.manual_seed(123)  # a different random init, then overwritten by the file
    other = cls(str(path), batch_size=4) if cls is TorchvisionRAFTFlow else cls(str(path), batch_size=4, iters=2)
    flow2, conf2 = video_flow(pair, other)
    torch.testing.assert_close(flow2, flow, atol=0, rtol=0)
    torch.testing.assert_close(conf2, conf, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        cls(str(tmp_path / "missing.ckpt"))


def test_searaft_confidence_is_its_own_uncertainty(pair):
    """conf = exp(-E|err| / tau) with E from the final flow head's Laplace mixture (captured by the hook)."""
    torch.manual_seed(0)
    est = SEARAFTFlow(iters=1, tau=2.0)
    a, b = (torch.nn.functional.interpolate(pair[:, i], size=(128, 128), mode="bilinear", align_corners=False) for i in (0, 1))
    flow, conf = est.network(a, b)
    info = est._info[-1]
    assert len(est._info) == 2  # initial head call + one iteration; the last one is used
    log_b = torch.stack([info[:, 2].clamp(0, est.model.var_max), info[:, 3].clamp(est.model.var_min, 0)], 1)
    expected = (info[:, :2].softmax(1) * log_b.exp()).sum(1, keepdim=True)
    torch.testing.assert_close(conf[..., ::8, ::8].mean(), torch.exp(-expected / 2.0).mean(), atol=0.05, rtol=0)
    assert conf.shape == (1, 1, 128, 128) and flow.shape == (1, 2, 128, 128)


def test_imr_runs_on_a_learned_flow(pair):
    video = torch.cat([pair, pair[:, 1:]], 1)  # 3 frames
    reward = IMRReward(flow=TorchvisionRAFTFlow(num_flow_updates=2))
    feats = imr_features(video, reward.flow)
    assert feats.shape == (1, 2, 2, 64, 64) and torch.isfinite(feats).all()
    assert reward.score(video).shape == (1,)
