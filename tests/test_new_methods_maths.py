"""Exact-value, property and reference-oracle tests of the maths of DiffusionNFT, AWM, MixGRPO, GRPO-Guard and
Flow-DPPO (issue 34). The ``_reference_*`` functions are transcriptions of the formulas in the authors' or the
frameworks' public code (cited in each), written independently of ours, as oracles."""
import math

import pytest
import torch

from lightning_vidalign.algorithms.advantages import grpo_advantages
from lightning_vidalign.algorithms.forward_process import old_policy_decay
from lightning_vidalign.algorithms.losses import (
    awm_log_likelihood,
    dppo_masked_loss,
    grpo_guard_step_weight,
    nft_loss,
    ppo_clip_loss,
    ratio_norm_log_ratio,
)
from lightning_vidalign.sampling import dpm_solver_pp_step, gaussian_kl, mix_grpo_window, sde_step_with_logprob


# ------------------------------------------------------------------------------------------------ DiffusionNFT
def _reference_nft(v_theta, v_old, xt, x0, t, adv, beta, adv_clip_max):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py (main, the loss block), per sample before the batch mean."""
    advantages_clip = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * v_theta + (1 - beta) * v_old.detach()
    implicit_negative_prediction = (1.0 + beta) * v_old.detach() - beta * v_theta
    x0_prediction = xt - t * positive_prediction
    with torch.no_grad():
        weight_factor = torch.abs(x0_prediction.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001)
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = torch.abs(negative_x0_prediction.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001)
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    return ori_policy_loss * adv_clip_max


def _nft_inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 3, 4, 4)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    s = torch.rand(n, generator=g) * 0.9 + 0.05
    xt = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
    v = torch.randn(shape, generator=g, requires_grad=True)
    v_old = v.detach() + 0.1 * torch.randn(shape, generator=g)
    adv = torch.tensor([2.0, -7.0, 0.3])[:n]
    return v, v_old, xt, x0, eps, s, adv


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches_the_nvlabs_reference_values_and_gradients(beta):
    v, v_old, xt, x0, _, s, adv = _nft_inputs()
    ours, metrics = nft_loss(v, v_old, xt, x0, s, adv, beta, 5.0)
    ref = _reference_nft(v, v_old, xt, x0, s.view(-1, 1, 1, 1, 1), adv, beta, 5.0)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    g_ours, = torch.autograd.grad(ours.mean(), v)
    g_ref, = torch.autograd.grad(ref.mean(), v)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert metrics["r"].item() == pytest.approx(((0.4 / 2 + 0.5) + 0.0 + (0.06 / 2 + 0.5)) / 3)  # A = 2, -7 (clipped: r = 0), 0.3


def test_nft_hand_case_in_velocity_space_and_the_direction_of_its_gradient():
    # one element: x0 = 0, eps = 1, s = 0.5 -> x_t = 0.5, target v = eps - x0 = 1; v_old = 1, v_θ = 2, β = 1:
    # v+ = v_θ = 2, v- = 2·v_old - v_θ = 0; ℓ+ = 1, ℓ- = 1; A = 5 = Z -> r = 1: L = 5·(1·1 + 0·1)/1 = 5
    v = torch.tensor([[2.0]], requires_grad=True)
    loss, _ = nft_loss(v, torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([0.5]), torch.tensor([5.0]), 1.0, 5.0, space="velocity")
    assert loss.item() == pytest.approx(5.0)
    (g,) = torch.autograd.grad(loss.sum(), v)
    assert g.item() == pytest.approx(5.0 * 2 * (2.0 - 1.0))  # positive advantage: v_θ pulled to the sample's velocity
    # A = -5 -> r = 0: L = 5·ℓ-, ∂ℓ-/∂v_θ = 2·(v- - 1)·(-1) = 2: gradient descent raises... v- moves to the target, v_θ away
    loss, _ = nft_loss(v, torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([0.5]), torch.tensor([-5.0]), 1.0, 5.0, space="velocity")
    (g,) = torch.autograd.grad(loss.sum(), v)
    assert g.item() == pytest.approx(5.0 * 2 * (0.0 - 1.0) * -1.0)


def test_nft_at_zero_advantage_with_v_old_equal_to_v_theta_has_no_gradient_at_the_target():
    # r = 0.5 and v_old = v_θ: ℓ+ and ℓ- have opposite gradients in v_θ (±β), so they cancel exactly
    v, _, xt, x0, _, s, _ = _nft_inputs()
    loss, _ = nft_loss(v, v.detach(), xt, x0, s, torch.zeros(3), 1.0, 5.0, space="velocity")
    (g,) = torch.autograd.grad(loss.sum(), v)
    assert g.abs().max().item() < 1e-6


def test_nft_loss_rejects_bad_input():
    v, v_old, xt, x0, _, s, adv = _nft_inputs()
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v, v_old, xt, x0, s, adv, beta=0.0)
    with pytest.raises(ValueError, match="must match"):
        nft_loss(v, v_old[:2], xt, x0, s, adv)
    with pytest.raises(ValueError, match="space"):
        nft_loss(v, v_old, xt, x0, s, adv, space="eps")


# ------------------------------------------------------------------------------------------------ AWM
def _reference_awm_log_prob(mse, t, weighting, ghuber_power=0.25):
    """scxue/advantage_weighted_matching scripts/train_sd3_awm.py compute_log_prob_awm (after the per-sample MSE)."""
    if weighting == "Uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "t**2":
        return -mse * t**2
    if weighting == "huber":
        return -(torch.sqrt(mse + 1e-10) - 1e-5) * t
    if weighting == "ghuber":
        return -((mse + 1e-10) ** ghuber_power - 1e-10**ghuber_power) * t / ghuber_power
    raise ValueError(weighting)


@pytest.mark.parametrize("ours,theirs", [("ghuber", "ghuber"), ("uniform", "Uniform"), ("t", "t"), ("t2", "t**2"), ("huber", "huber")])
def test_awm_log_likelihood_matches_the_reference(ours, theirs):
    mse = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    torch.testing.assert_close(awm_log_likelihood(mse, t, ours), _reference_awm_log_prob(mse, t, theirs))


def test_awm_hand_values_and_on_policy_gradient_is_advantage_times_grad_log_p():
    # ghuber p = 0.5, mse = 4, t = 0.5: -((4 + 1e-10)^0.5 - 1e-5)·0.5/0.5 = -(2 - 1e-5) (to 1e-10)
    assert awm_log_likelihood(torch.tensor([4.0]), torch.tensor([0.5]), "ghuber", 0.5).item() == pytest.approx(-(2 - 1e-5), abs=1e-9)
    mse = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.8, 0.3], dtype=torch.float64)
    a = torch.tensor([5.0, -2.0], dtype=torch.float64) / 5.0  # Â = clip(A, ±5)/5
    log_p = awm_log_likelihood(mse, t)
    loss, metrics = ppo_clip_loss(log_p, log_p.detach(), a, 1.0)  # the AWM module's call: ratio ≡ 1
    assert metrics["ratio"].item() == 1.0 and loss.detach().tolist() == pytest.approx((-a).tolist())
    (g,) = torch.autograd.grad(loss.sum(), mse)
    # ∂/∂mse of -Â·log p = Â·t·(mse + 1e-10)^(p-1)
    torch.testing.assert_close(g, a * t * (mse.detach() + 1e-10) ** (0.25 - 1))


# ------------------------------------------------------------------------------------------------ GRPO-Guard
def _reference_ratio_norm(log_prob, old_log_prob, prev_sample_mean, old_prev_sample_mean, std_dev_t, sqrt_dt, eps=1e-6):
    """Tele-AI/TeleBoost teleboost/algorithms/grpo_guard.py compute_ratio_norm_bias + the actor's ratio
    (std_dev_t: σ_t·sqrt(Δ) per sample, sqrt_dt per sample, collapsed to batch means as there)."""
    diff_squared = (prev_sample_mean - old_prev_sample_mean).pow(2)
    ratio_mean_bias = diff_squared.flatten(start_dim=1).mean(dim=1)
    std_dev_t_scalar, sqrt_dt_scalar = std_dev_t.mean(), sqrt_dt.mean()
    sigma_t = std_dev_t_scalar / (sqrt_dt_scalar + eps)
    scale = sqrt_dt_scalar * sigma_t
    ratio_mean_bias = ratio_mean_bias / (2 * (scale**2 + eps))
    return (log_prob - old_log_prob + ratio_mean_bias) * scale


def _guard_inputs(seed=0, n=4, sde="flow_grpo"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, 4, 4, generator=g)
    v_old = torch.randn(x.shape, generator=g)
    v_new = (v_old + 0.05 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    s, s_next = 0.6, 0.45
    x_next, old_mean, std, old_lp = sde_step_with_logprob(v_old, x, s, s_next, sde, 0.7, generator=g)
    _, mean, _, lp = sde_step_with_logprob(v_new, x, s, s_next, sde, 0.7, prev_sample=x_next)
    return x_next, old_mean, mean, std, old_lp, lp, v_new, s, s_next


def test_ratio_norm_matches_the_teleboost_reference_when_the_samples_share_a_step():
    x_next, old_mean, mean, std, old_lp, lp, *_ = _guard_inputs()
    std_t = torch.as_tensor(std).flatten().expand(len(lp))
    sqrt_dt = torch.full_like(std_t, math.sqrt(0.15))
    ours = ratio_norm_log_ratio(lp, old_lp, mean, old_mean, std_t)
    torch.testing.assert_close(ours, _reference_ratio_norm(lp, old_lp, mean, old_mean, std_t, sqrt_dt), rtol=1e-5, atol=1e-7)


def test_ratio_norm_is_the_zero_mean_noise_projection_and_so_is_its_gradient():
    # x' = μ_old + std·ε, mean-reduced Gaussian log-probs: log ρ̂ = mean(ε·(μ_θ - μ_old)) exactly (up to eps in std²)
    x_next, old_mean, mean, std, old_lp, lp, v_new, *_ = _guard_inputs()
    std_t = torch.as_tensor(std).flatten()
    eps_noise = (x_next - old_mean) / std_t
    closed = (eps_noise * (mean - old_mean)).flatten(1).mean(1)
    ours = ratio_norm_log_ratio(lp, old_lp, mean, old_mean, std_t, eps=0.0)
    torch.testing.assert_close(ours, closed, rtol=1e-4, atol=1e-6)
    g_ours, = torch.autograd.grad(ours.sum(), v_new, retain_graph=True)
    g_closed, = torch.autograd.grad(closed.sum(), v_new)
    torch.testing.assert_close(g_ours, g_closed, rtol=1e-3, atol=1e-7)
    # at μ_θ = μ_old the normalised log-ratio is 0 (plain ratio: 0 as well; off it, the plain one is biased negative)
    assert ratio_norm_log_ratio(old_lp, old_lp, old_mean, old_mean, std_t).abs().max().item() == 0.0


def test_grpo_guard_step_weight_hand_values():
    s, sn = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.25])
    torch.testing.assert_close(grpo_guard_step_weight(s, sn, "flow_grpo"), torch.tensor([1 / (0.2 + 1e-6), 1 / (0.25 + 1e-6)]))
    expected = torch.tensor([(1 + 0.49 * 0.2 / 1.6) / (0.2 + 1e-6), (1 + 0.49 * 0.5 / 1.0) / (0.25 + 1e-6)])
    torch.testing.assert_close(grpo_guard_step_weight(s, sn, "dance_grpo", eta=0.7), expected)
    with pytest.raises(ValueError, match="form"):
        grpo_guard_step_weight(s, sn, "cps")


# ------------------------------------------------------------------------------------------------ Flow-DPPO
def _reference_dppo(new_logp, old_logp, advantages, new_means, old_means, sigma_t, kl_mask_threshold):
    """Tencent-Hunyuan/UniRL unirl/algorithms/flowdppo.py _gaussian_kl_div + _flowdppo_kl_adv_loss (one step)."""
    ratio = torch.exp(new_logp - old_logp)
    adv = advantages.detach()
    unclipped_loss = -adv * ratio
    kl_per_sample = ((new_means - old_means) ** 2 / (2 * sigma_t**2)).mean(dim=tuple(range(1, new_means.ndim)))
    kl_mask = kl_per_sample < kl_mask_threshold
    pos_rm_mask = (~kl_mask) & (ratio > 1.0) & (adv > 0)
    neg_rm_mask = (~kl_mask) & (ratio < 1.0) & (adv < 0)
    keep_adv_mask = (~(pos_rm_mask | neg_rm_mask)).detach()
    return torch.where(keep_adv_mask, unclipped_loss, torch.zeros_like(unclipped_loss))


def test_dppo_mask_hand_cases():
    # (ratio, A, KL): low KL kept; high KL & moving further dropped; high KL & corrective kept
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.5, 0.5]))
    a = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    kl = torch.tensor([1e-6, 1e-4, 1e-4, 1e-4, 1e-4, 1e-6])
    loss, m = dppo_masked_loss(lp, torch.zeros(6), a, kl, 1e-5)
    torch.testing.assert_close(loss, torch.tensor([-1.5, 0.0, 0.0, -0.5, 1.5, 0.5]))
    assert m["mask_frac"].item() == pytest.approx(2 / 6)


def test_dppo_matches_the_unirl_reference_with_the_exact_gaussian_kl():
    x_next, old_mean, mean, std, old_lp, lp, *_ = _guard_inputs(seed=3, n=8)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.1, -0.1])
    for threshold in (0.0, 1e-5, 1e-3, 1.0):
        ours, _ = dppo_masked_loss(lp, old_lp, adv, gaussian_kl(mean, old_mean, std), threshold)
        ref = _reference_dppo(lp, old_lp, adv, mean, old_mean, torch.as_tensor(std), threshold)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ MixGRPO
def _reference_windows(iterations, sampling_steps, group_size, iters_per_group, prog_overlap_step):
    """Tencent-Hunyuan/MixGRPO fastvideo/utils/grpo_states.py GRPOTrainingStates (progressive, --roll_back):
    the window read before each iteration's update."""
    cur, cur_iter, max_t, out = 0, 0, sampling_steps - 2, []
    for _ in range(iterations):
        out.append(list(range(cur, min(cur + group_size, max_t))))
        cur_iter += 1
        if cur_iter >= iters_per_group:
            cur_iter = 0
            cur += prog_overlap_step
        if cur > max_t:
            cur = 0
    return out


@pytest.mark.parametrize("steps,w,tau,stride", [(25, 4, 25, 1), (8, 2, 3, 1), (10, 3, 1, 2), (8, 4, 2, 3)])
def test_mix_grpo_window_matches_the_reference_schedule_until_its_empty_window(steps, w, tau, stride):
    ref = _reference_windows(400, steps, w, tau, stride)
    ours = [mix_grpo_window(i, steps, w, tau, stride) for i in range(400)]
    first_empty = next((i for i, win in enumerate(ref) if not win), len(ref))
    assert ours[:first_empty] == ref[:first_empty]
    assert all(ours) and all(max(win) <= steps - 3 for win in ours)  # never empty; the last two steps never stochastic
    if first_empty < len(ref):  # the reference's empty window at c = M: ours has rolled back to 0 there
        assert ours[first_empty][0] == 0


def test_mix_grpo_window_hand_schedule_and_random_strategy():
    assert [mix_grpo_window(i, 8, 2, 2) for i in range(0, 14, 2)] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5], [0, 1]]
    g = torch.Generator().manual_seed(0)
    wins = [mix_grpo_window(i, 8, 2, 1, strategy="random", generator=g) for i in range(50)]
    assert all(len(w) == 2 and 0 <= w[0] <= 4 for w in wins) and len({w[0] for w in wins}) > 1
    with pytest.raises(ValueError, match="num_steps"):
        mix_grpo_window(0, 2)


# ------------------------------------------------------------------------------------------------ shared
def test_global_std_advantages_and_old_policy_decay_hand_values():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0])
    ids = torch.tensor([0, 0, 1, 1])
    adv, zero = grpo_advantages(r, ids, eps=0.0, clip=None, global_std=True)
    sd = r.std(unbiased=False).item()  # 3.897...: one std over the round
    torch.testing.assert_close(adv, torch.tensor([-1 / sd, 1 / sd, 0.0, 0.0]))
    assert zero.item() == 0.5
    assert [old_policy_decay(s) for s in (0, 100, 2000)] == [0.0, pytest.approx(0.1), 0.5]
    assert old_policy_decay(80, flat=75, uprate=0.0075, uphold=0.999) == pytest.approx(5 * 0.0075)
    assert old_policy_decay(10, flat=75, uprate=0.0075, uphold=0.999) == 0.0


# ------------------------------------------------------------------------------------------------ MixGRPO-Flash
def test_dpm_solver_pp_steps_match_diffusers_dpm_solver_multistep_on_a_flow_path():
    """Oracle: diffusers' DPMSolverMultistepScheduler (flow_prediction, dpmsolver++, order 2, midpoint) on its own
    schedule, with a fixed velocity field; our step from the same state, data prediction and history, at every step."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                                        final_sigmas_type="zero")
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    a = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    prev = (None, None)
    for i, t in enumerate(sched.timesteps):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        v = a * (1 + s) - 0.3 * x  # a velocity field depending on the state and the level
        ref = sched.step(v, t, x).prev_sample
        x0 = x - s * v
        if s < 1:
            ours = dpm_solver_pp_step(x, x0, s, s_next, *prev)
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
        prev, x = (x0, s), ref


def test_compressed_schedule_hand_case_and_flash_rollout_calls_the_network_fewer_times():
    from lightning_vidalign.sampling import compressed_schedule, flow_schedule

    sigmas, _ = flow_schedule(25, shift=3.0)
    short = compressed_schedule(sigmas, 3, 0.4, 3.0)
    assert len(short) - 1 == 4 + 7 and torch.equal(short[:5], sigmas[:5].float()) and short[-1] == 0  # the reference's 11 calls
    u = float(sigmas[4]) / (3 - 2 * float(sigmas[4]))
    torch.testing.assert_close(short[5], torch.tensor(3 * (u * 6 / 7) / (1 + 2 * (u * 6 / 7))))  # 8 levels: u·(1 - 1/7) next
    with pytest.raises(ValueError, match="ratio"):
        compressed_schedule(sigmas, 3, 0.0, 3.0)
