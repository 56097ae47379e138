import pytest
import torch

from lightning_vidalign.algorithms.advantages import group_mean, shift_advantages
from lightning_vidalign.algorithms.losses import sft_loss, shift_loss


def test_shift_loss_exact_value():
    loss_fake = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss_real = torch.tensor([0.5, 1.5])
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    # lam * mean(A*l_fake) + w_sft * mean(l_real) = 0.01 * (1 - 2 + 6 + 0)/4 + 2 * 1.0
    assert shift_loss(loss_fake, loss_real, adv, lam=0.01, w_sft=2.0).item() == pytest.approx(0.01 * 5 / 4 + 2.0, abs=1e-7)


def test_shift_loss_zero_advantages_is_sft_value_and_gradient():
    w = torch.tensor([0.3, -0.2], requires_grad=True)
    loss_fake = (w * torch.tensor([1.0, 2.0])).pow(2).repeat(2)
    loss_real = (w * torch.tensor([0.5, 4.0])).pow(2)
    a = shift_loss(loss_fake, loss_real, torch.zeros(4), lam=0.01)
    (g_shift,) = torch.autograd.grad(a, w, retain_graph=True)
    b = sft_loss(loss_real)
    (g_sft,) = torch.autograd.grad(b, w)
    assert torch.equal(a, b)
    assert torch.equal(g_shift, g_sft)


def test_shift_loss_advantage_is_a_constant_and_sign_matters():
    lf = torch.tensor([1.0, 1.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0], requires_grad=True)
    shift_loss(lf, torch.zeros(2), adv, lam=1.0).backward()
    assert adv.grad is None  # detached
    assert lf.grad.tolist() == [0.5, -0.5]  # positive advantage lowers that rollout's loss


def test_shift_loss_errors():
    with pytest.raises(ValueError):
        shift_loss(torch.ones(3), torch.ones(2), torch.ones(2), 0.01)
    with pytest.raises(FloatingPointError):
        shift_loss(torch.ones(2), torch.ones(2), torch.tensor([float("nan"), 0.0]), 0.01)


def test_shift_advantages_exact():
    r = torch.tensor([1.0, 3.0, 10.0, 20.0, -4.0, 4.0])
    g = torch.tensor([0, 0, 7, 7, 2, 2])
    assert shift_advantages(r, g, clip=100.0).tolist() == [-1.0, 1.0, -5.0, 5.0, -4.0, 4.0]
    assert shift_advantages(r, g, clip=3.0).tolist() == [-1.0, 1.0, -3.0, 3.0, -3.0, 3.0]


def test_shift_advantages_no_std_division_and_batch_baseline():
    r = torch.tensor([0.0, 0.002, 5.0, 9.0])
    adv = shift_advantages(r, torch.tensor([0, 0, 1, 1]), clip=5.0)
    assert adv[:2].tolist() == pytest.approx([-0.001, 0.001])  # tiny spread stays tiny
    batch = shift_advantages(r, torch.zeros(4, dtype=torch.long), clip=10.0)
    assert batch.tolist() == pytest.approx((r - r.mean()).tolist())
    assert shift_advantages(torch.tensor([3.0]), torch.tensor([0]), 1.0).tolist() == [0.0]


def test_group_mean_and_errors():
    assert group_mean(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([5, 9, 5])).tolist() == [2.5, 2.0, 2.5]
    with pytest.raises(ValueError):
        shift_advantages(torch.ones(3), torch.zeros(2), 1.0)
    with pytest.raises(ValueError):
        shift_advantages(torch.ones(3), torch.zeros(3), 0.0)
    with pytest.raises(FloatingPointError):
        shift_advantages(torch.tensor([1.0, float("inf")]), torch.zeros(2), 1.0)


def test_failure_weights_exact_and_order():
    from lightning_vidalign.algorithms.advantages import failure_weights

    r = torch.tensor([0.0, 1.0, 2.0])
    e = torch.exp(-r)
    assert failure_weights(r).tolist() == pytest.approx((3 * e / e.sum()).tolist())
    w = failure_weights(torch.tensor([2.0, -1.0, 0.5]), temperature=0.5)
    assert w.mean().item() == pytest.approx(1.0) and w.argmax().item() == 1 and w.argmin().item() == 0
    assert failure_weights(torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        failure_weights(r, temperature=0.0)
    with pytest.raises(FloatingPointError):
        failure_weights(torch.tensor([float("nan")]))


def test_sft_loss_weighted_exact():
    assert sft_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.5])).item() == pytest.approx((0.5 + 4.5) / 2)
    with pytest.raises(ValueError):
        sft_loss(torch.ones(2), torch.ones(3))
