"""Flow-matching SDE steps with log-probabilities (DESIGN §2; SAGE-GRPO Eq. 5-9, App. A.1-A.5)."""
import math

import pytest
import torch
from scipy.integrate import quad

from lightning_vidalign.sampling import (
    SDE_TYPES,
    equalizer_scales,
    flow_schedule,
    gaussian_kl,
    gaussian_log_prob,
    gradient_norm_proxy,
    sage_variance,
    sde_step_parameters,
    sde_step_with_logprob,
)

STOCHASTIC = [t for t in SDE_TYPES if t != "ode"]


def _xv(seed=0, shape=(3, 2, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_eta_zero_is_the_ode_step(sde_type):
    x, v = _xv()
    for s, sn in [(1.0, 0.96), (0.7, 0.5), (0.3, 0.0)]:
        prev, mean, std, lp = sde_step_with_logprob(v, x, s, sn, sde_type, eta=0.0, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(prev, x - (s - sn) * v, atol=1e-6, rtol=0)
        assert lp is None and float(torch.as_tensor(std).max()) == 0.0


def test_hand_computed_means_and_stds():
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.5)
    # flow_grpo: sigma_t = sqrt(0.5/0.5) = 1; mean = 1·(1 - 0.25/1) - 0.5·0.25·(1 + 0.5/1) = 0.5625; std = 0.5
    _, mean, std, _ = sde_step_with_logprob(v, x, 0.5, 0.25, "flow_grpo", 1.0, torch.Generator().manual_seed(0))
    assert mean.item() == pytest.approx(0.5625) and float(std) == pytest.approx(0.5)
    # dance_grpo eta=0.5: var = 0.25·0.25 = 0.0625; mean = 1·(1 - 0.0625/1) - 0.5·(0.25 + 0.0625·0.5/1) = 0.796875
    _, mean, std, _ = sde_step_with_logprob(v, x, 0.5, 0.25, "dance_grpo", 0.5, torch.Generator().manual_seed(0))
    assert mean.item() == pytest.approx(0.796875) and float(std) == pytest.approx(0.25)
    # cps eta=1: std = 0.25·sin(pi/2) = 0.25, sqrt(s'^2 - std^2) = 0 -> mean = 0.75·(1 - 0.5·0.5) = 0.5625
    _, mean, std, _ = sde_step_with_logprob(v, x, 0.5, 0.25, "cps", 1.0, torch.Generator().manual_seed(0))
    assert mean.item() == pytest.approx(0.5625) and float(std) == pytest.approx(0.25)
    # sage eta=1: Sigma = -0.25 + ln(0.75/0.5); mean = 1 - 0.125 + Sigma/2·(-(1 + 0.5·0.5)/0.5)
    sig = -0.25 + math.log(1.5)
    _, mean, std, _ = sde_step_with_logprob(v, x, 0.5, 0.25, "sage", 1.0, torch.Generator().manual_seed(0))
    assert mean.item() == pytest.approx(0.875 - sig / 2 * 2.5, abs=1e-6) and float(std) == pytest.approx(math.sqrt(sig), abs=1e-6)


def test_sage_variance_is_the_integral_of_the_diffusion_coefficient():
    eta = 0.7
    for s, sn in [(0.99, 0.9), (0.9, 0.6), (0.5, 0.2), (0.2, 0.0), (0.05, 0.01)]:
        numeric, _ = quad(lambda u: eta**2 * u / (1 - u), sn, s, epsabs=1e-12)
        assert float(sage_variance(s, sn, eta)) == pytest.approx(numeric, rel=1e-5)
    # at the pure-noise boundary the interval is clamped at 1 - 3e-3 (SAGE App. A.2 (b))
    numeric, _ = quad(lambda u: eta**2 * u / (1 - u), 0.96, 1 - 3e-3)
    assert float(sage_variance(1.0, 0.96, eta)) == pytest.approx(numeric, rel=1e-5)


def test_sage_std_below_flow_grpo_in_high_noise_steps():
    sig, _ = flow_schedule(20, shift=3.0)
    s, sn = sig[:-1], sig[1:]
    p_sage = sde_step_parameters(s, sn, "sage", 0.7)
    p_flow = sde_step_parameters(s, sn, "flow_grpo", 0.7)
    # high-noise steps below the pure-noise boundary step; at s = 1 the two use different boundary
    # rules (flow_grpo: sigmas[1] in the denominator; sage: clamp at 1 - 3e-3), App. A.2 (a)/(b)
    high = (s > 0.5) & (s < 1)
    assert high.sum() >= 5
    assert bool((p_sage["std"][high] < p_flow["std"][high]).all())
    # the integrand u/(1-u) increases, so the left-point (flow_grpo) area bounds the integral for every s < 1
    inner = s < 1
    assert bool((p_sage["var"][inner] <= p_flow["var"][inner] + 1e-9).all())


@pytest.mark.parametrize("sde_type", STOCHASTIC)
def test_log_prob_is_the_gaussian_density_and_rescoring_is_exact(sde_type):
    """The Gaussian form for every type (CPS's reference form is tested in test_reference_forms.py);
    re-scoring gives ratio exactly 1 in both forms."""
    x, v = _xv(1)
    prev, mean, std, lp = sde_step_with_logprob(v, x, 0.8, 0.6, sde_type, 0.7, torch.Generator().manual_seed(3), log_prob_form="gaussian")
    ref = torch.distributions.Normal(mean, torch.as_tensor(std).expand_as(mean)).log_prob(prev).flatten(1).mean(1)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    for form in ("gaussian", "reference"):
        _, _, _, lp1 = sde_step_with_logprob(v, x, 0.8, 0.6, sde_type, 0.7, prev_sample=prev, log_prob_form=form)
        _, _, _, lp2 = sde_step_with_logprob(v, x, 0.8, 0.6, sde_type, 0.7, prev_sample=prev, log_prob_form=form)
        assert torch.equal(lp1, lp2)  # ratio exactly 1
        # a different velocity gives a different log-prob of the same sample
        _, _, _, lp3 = sde_step_with_logprob(v + 0.1, x, 0.8, 0.6, sde_type, 0.7, prev_sample=prev, log_prob_form=form)
        assert not torch.allclose(lp1, lp3)


def test_per_sample_levels_and_bad_input():
    x, v = _xv(2)
    s, sn = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    prev, mean, _, lp = sde_step_with_logprob(v, x, s, sn, "sage", 0.7, torch.Generator().manual_seed(0))
    for i in range(3):
        _, m_i, _, lp_i = sde_step_with_logprob(v[i : i + 1], x[i : i + 1], float(s[i]), float(sn[i]), "sage", 0.7, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(m_i, mean[i : i + 1])
        torch.testing.assert_close(lp_i, lp[i : i + 1])
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(v, x, 0.5, 0.4, "euler_maruyama", 0.7)
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        sde_step_with_logprob(v, x, 0.5, 0.5, "sage", 0.7)
    with pytest.raises(ValueError, match="same shape"):
        sde_step_with_logprob(v[:1], x, 0.5, 0.4, "sage", 0.7)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "sage"])
def test_sde_preserves_the_marginals_of_gaussian_data(sde_type):
    """x0 ~ N(0, 1): the exact velocity is v = (2s - 1)/((1-s)² + s²)·x; every SDE variant must carry
    x_s ~ N(0, (1-s)² + s²) to x_0 ~ N(0, 1) (the Itô correction's sign and size).

    Not for ``cps``: it injects noise of size ``s'·sin(ηπ/2)`` per step whatever the step size, so it
    is not the discretisation of one SDE and loses variance through the shrunk ``x̂0`` (measured 0.83
    here); its mean and std are checked by hand values and the ``eta = 0`` property instead."""
    g = torch.Generator().manual_seed(0)
    n, sig = 40000, torch.linspace(0.95, 0.0, 121)
    s0 = float(sig[0])
    x = torch.randn(n, 1, generator=g) * math.sqrt((1 - s0) ** 2 + s0**2)
    for s, sn in zip(sig[:-1].tolist(), sig[1:].tolist()):
        v = (2 * s - 1) / ((1 - s) ** 2 + s**2) * x
        x, _, _, _ = sde_step_with_logprob(v, x, s, sn, sde_type, 0.5, generator=g)
    assert x.var().item() == pytest.approx(1.0, abs=0.05)
    assert abs(x.mean().item()) < 0.03


def test_kl_and_equalizer():
    m = torch.zeros(2, 3, 4)
    ref = torch.ones(2, 3, 4)
    torch.testing.assert_close(gaussian_kl(m, ref, 0.5), torch.full((2,), 2.0))  # 1/(2·0.25)
    assert torch.equal(gaussian_kl(m, m, 0.5), torch.zeros(2))
    sig, _ = flow_schedule(10, 3.0)
    s, sn = sig[:-1], sig[1:]
    proxy = gradient_norm_proxy(s, sn, "sage", 0.7)
    var = sage_variance(s, sn, 0.7)
    torch.testing.assert_close(proxy, ((s - sn) + 0.5 * var * (1 - s) / s) / var.sqrt())
    scales = equalizer_scales(proxy)
    torch.testing.assert_close(scales * proxy, torch.full_like(proxy, float(proxy.median())), rtol=1e-5, atol=0)
    assert proxy.max() / proxy.min() > 10  # the imbalance the equalizer exists for
    # the proxy is |d mean / d v| / std: check against autograd through the step's mean
    v = torch.zeros(1, 1, requires_grad=True)
    _, mean, std, _ = sde_step_with_logprob(v, torch.ones(1, 1), 0.6, 0.45, "sage", 0.7, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(mean.sum(), v)
    assert abs(grad.item()) / float(std) == pytest.approx(float(gradient_norm_proxy(0.6, 0.45, "sage", 0.7)), rel=1e-5)
    with pytest.raises(ValueError, match="std 0"):
        gradient_norm_proxy(s, sn, "cps", 0.7)  # cps is deterministic on the last step (s' = 0)


def test_gaussian_log_prob_shape():
    assert gaussian_log_prob(torch.zeros(4, 2, 3), torch.zeros(4, 2, 3), torch.tensor(1.0)).shape == (4,)
