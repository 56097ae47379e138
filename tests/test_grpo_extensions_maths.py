"""Exact-value and property tests of the GRPO-extension maths (BPGO, Self-Paced GRPO, joint reward)."""
import itertools
import math

import pytest
import torch

from lightning_vidalign.algorithms.advantages import (
    bpgo_group_weights,
    contrastive_reward_transform,
    hoyer_sparsity,
    min_norm_weights,
    self_paced_weights,
)


def test_ras_weights_bounded_monotone_and_hand_values():
    gap = torch.linspace(-12, 12, 1001)
    w = bpgo_group_weights(gap, torch.zeros_like(gap), alpha=0.5, k=1.0)
    assert bool((w > 0.5).all() and (w < 1.5).all())   # (1 - alpha, 1 + alpha)
    assert bool((w[1:] >= w[:-1]).all()) and bool((w[400:601][1:] > w[400:601][:-1]).all())  # increasing with the gap
    assert bpgo_group_weights(torch.tensor([2.0]), torch.tensor([2.0])).item() == 1.0
    assert bpgo_group_weights(torch.tensor([1.0]), torch.tensor([0.0]), 0.5, 2.0).item() == pytest.approx(1 + 0.5 * (2 / (1 + math.exp(-2)) - 1))
    with pytest.raises(ValueError):
        bpgo_group_weights(gap, gap, alpha=1.0)


def test_crt_keeps_order_near_the_prior_and_separates_those_above():
    prior = torch.tensor(0.3)
    below = torch.linspace(prior.item() - 0.9, prior.item() - 1e-3, 50)
    above = torch.linspace(prior.item() + 1e-3, prior.item() + 0.9, 50)
    tb, ta = contrastive_reward_transform(below, prior), contrastive_reward_transform(above, prior)
    assert bool((tb[1:] > tb[:-1]).all()) and bool((ta[1:] > ta[:-1]).all())  # order kept on both sides
    assert ta.min() > tb.max() + math.exp(prior.item()) * 0.99  # the indicator jump separates them
    r = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(contrastive_reward_transform(r, torch.tensor(0.5), lam=2.0), torch.tensor([2 * -0.5 * 1.0, (2 * 0.5 + 1) * math.e]))


def test_hoyer_sparsity_extremes():
    assert hoyer_sparsity(torch.full((8,), 3.0)).item() == pytest.approx(0.0, abs=1e-6)
    assert hoyer_sparsity(torch.tensor([0.0, 0, 5, 0])).item() == pytest.approx(1.0)
    assert hoyer_sparsity(torch.zeros(4)).item() == 0.0
    mid = hoyer_sparsity(torch.tensor([1.0, 1, 0, 0])).item()
    assert mid == pytest.approx((2 - 2 / math.sqrt(2)) / (2 - 1))


def test_self_paced_weights_hand_values():
    comps = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 4.0]])  # (G=4, K=2)
    tau = torch.tensor([0.5, 0.5])
    w = self_paced_weights(comps, tau, beta=0.5, temperature=1.0)
    # visual: constant 1.0 -> competence sigmoid(0.5), saturation 1 (zero variance); mastery 1 - (1 - c)(1 - 0.5)
    m1 = 1 - (1 - 1 / (1 + math.exp(-0.5))) * 0.5
    torch.testing.assert_close(w, torch.tensor([1 - m1, m1]))
    batched = self_paced_weights(torch.stack([comps, comps.flip(1)]), tau, beta=0.5)
    torch.testing.assert_close(batched[0], w)
    torch.testing.assert_close(batched.sum(1), torch.ones(2))


def test_min_norm_weights_closed_form_and_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, generator=g)
    c = min_norm_weights(a)
    grid = torch.linspace(0, 1, 10001)
    norms = torch.stack([(t * a[0] + (1 - t) * a[1]).norm() for t in grid])
    assert c[0].item() == pytest.approx(grid[norms.argmin()].item(), abs=2e-4)
    assert min_norm_weights(torch.stack([a[0], a[0] * 2]))[0].item() == 1.0  # aligned: the smaller one alone
    for seed in range(3):
        a3 = torch.randn(3, 12, generator=torch.Generator().manual_seed(seed)) + torch.tensor([[0.5], [-0.2], [0.1]])
        c3 = min_norm_weights(a3, iterations=2000)
        assert c3.sum().item() == pytest.approx(1.0) and bool((c3 >= 0).all())
        steps = 200
        best = min(
            ((i / steps) * a3[0] + (j / steps) * a3[1] + ((steps - i - j) / steps) * a3[2]).norm().item()
            for i, j in itertools.product(range(steps + 1), repeat=2) if i + j <= steps
        )
        assert (c3 @ a3).norm().item() <= best + 1e-4
