"""Issue 17: our GRPO-family maths against the public reference code, each reference written here
independently in float64 from the reference's own expressions (flow_grpo ``sd3_sde_with_logprob.py`` and
``train_sd3.py``; TeleBoost ``bgpo.py`` and ``vipo.py``), plus the property tests of each form."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from lightning_vidalign.algorithms import GRPO, BPGO
from lightning_vidalign.algorithms.advantages import (
    contrastive_reward_transform,
    crt_rerange,
    group_saturation,
    ras_bayes_weight,
    self_paced_weights,
    vipo_advantage_map,
)
from lightning_vidalign.algorithms.losses import ppo_clip_loss
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.sampling import flow_schedule, gaussian_kl, kl_std, sde_step_with_logprob

SIGMAS, _ = flow_schedule(8, shift=5.0)  # 8-step shift-5 schedule, as in the issue


def _close(ours, ref, rel=1e-6):
    ours, ref = np.asarray(torch.as_tensor(ours).double()), np.asarray(ref, dtype=np.float64)
    assert np.allclose(ours, ref, rtol=rel, atol=1e-12 + rel * np.abs(ref).max()), (ours, ref)


# ------------------------------------------------------------------ 1. CPS log-probability
def _cps_mean_f64(x, v, s, sn, eta):
    """flow_grpo ``sde_type == 'cps'``: std = σ' sin(ηπ/2); mean = x̂0 (1-σ') + x̂1 sqrt(σ'² - std²)."""
    std = sn * math.sin(eta * math.pi / 2)
    pred_original = x - s * v
    noise_estimate = x + v * (1 - s)
    return pred_original * (1 - sn) + noise_estimate * math.sqrt(sn**2 - std**2), std


def test_cps_log_prob_is_flow_grpos_by_default_and_gaussian_as_option():
    g = torch.Generator().manual_seed(0)
    x, v, v_new = (torch.randn(3, 2, 4, 5, 5, generator=g) for _ in range(3))
    eta = 0.8
    for i in range(len(SIGMAS) - 2):  # the last step (σ' = 0) has std 0
        s, sn = float(SIGMAS[i]), float(SIGMAS[i + 1])
        prev, mean, std, lp = sde_step_with_logprob(v, x, s, sn, "cps", eta, generator=g)
        mean64, std64 = _cps_mean_f64(x.double(), v.double(), s, sn, eta)
        ref = (-((prev.double() - mean64) ** 2)).flatten(1).mean(1)  # "remove all constants"
        _close(lp, ref)
        # property: the log-ratio of a re-scored sample is mean(-(x - μ_new)² + (x - μ_old)²)
        _, mean_new, _, lp_new = sde_step_with_logprob(v_new, x, s, sn, "cps", eta, prev_sample=prev)
        mean_new64, _ = _cps_mean_f64(x.double(), v_new.double(), s, sn, eta)
        _close(lp_new - lp, (-((prev.double() - mean_new64) ** 2) + (prev.double() - mean64) ** 2).flatten(1).mean(1), rel=1e-5)
        # the Gaussian option keeps 1/(2 std²) and the constants
        _, _, _, lp_gauss = sde_step_with_logprob(v, x, s, sn, "cps", eta, prev_sample=prev, log_prob_form="gaussian")
        gauss = (-((prev.double() - mean64) ** 2) / (2 * std64**2) - math.log(std64) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
        _close(lp_gauss, gauss)
    # other SDE types keep the full Gaussian in both forms (flow_grpo 'sde', SAGE-GRPO)
    s, sn = float(SIGMAS[2]), float(SIGMAS[3])
    prev, _, _, lp_ref = sde_step_with_logprob(v, x, s, sn, "flow_grpo", 0.7, generator=g)
    _, _, _, lp_g = sde_step_with_logprob(v, x, s, sn, "flow_grpo", 0.7, prev_sample=prev, log_prob_form="gaussian")
    assert torch.equal(lp_ref, lp_g)
    with pytest.raises(ValueError, match="log_prob_form"):
        sde_step_with_logprob(v, x, s, sn, "cps", 0.7, prev_sample=prev, log_prob_form="exact")


# ------------------------------------------------------------------ 2. per-step KL normaliser
def test_flow_grpo_kl_divides_by_sigma_t_squared_without_delta():
    g = torch.Generator().manual_seed(1)
    mu, mu_ref = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    eta = 0.7
    sigma_max = float(SIGMAS[1])
    for i in range(len(SIGMAS) - 1):
        s, sn = SIGMAS[i].double(), SIGMAS[i + 1].double()
        # flow_grpo: std_dev_t = sqrt(σ / (1 - where(σ == 1, sigma_max, σ))) · η, KL = mean(Δμ²) / (2 std_dev_t²)
        std_dev_t = math.sqrt(float(s) / (1 - (sigma_max if float(s) == 1.0 else float(s)))) * eta
        ref = ((mu.double() - mu_ref.double()) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)
        _close(gaussian_kl(mu, mu_ref, kl_std(SIGMAS[i], SIGMAS[i + 1], "flow_grpo", eta)), ref)
        # exact form: the step's own variance σ_t²·Δ, i.e. the reference KL divided by Δ
        exact = gaussian_kl(mu, mu_ref, kl_std(SIGMAS[i], SIGMAS[i + 1], "flow_grpo", eta, kl_form="exact"))
        _close(exact, ref / float(s - sn), rel=1e-5)
    # SAGE, DanceGRPO and CPS divide by their full step std in the reference: both forms agree
    for sde_type in ("sage", "dance_grpo", "cps"):
        a = kl_std(SIGMAS[3], SIGMAS[4], sde_type, 0.7)
        assert torch.equal(a, kl_std(SIGMAS[3], SIGMAS[4], sde_type, 0.7, kl_form="exact"))


def test_grpo_fixed_kl_metric_uses_the_reference_normaliser(wan_batch):
    backbone = WanBackbone(lora_rank=4, lora_alpha=4)
    grpo = GRPO(backbone=backbone, num_inference_steps=6, guidance=1.0, sampler="ode", sde_type="flow_grpo", eta=0.7,
                kl_type="fixed", kl_coef=1.0, val_num_videos=0)
    cond = backbone.encode_condition(wan_batch)
    traj = backbone.rollout(cond, "flow_grpo", 6, 1.0, torch.Generator().manual_seed(0), keep_trajectory=True, num_frames=9, decode=False)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    t = 2
    s, sn = traj.sigmas[t], traj.sigmas[t + 1]
    _, metrics = grpo.step_loss(traj.x_t[:, t], traj.x_next[:, t], traj.log_prob[:, t], torch.zeros(2), s, sn, cond, 1.0)
    with torch.no_grad():
        sig = torch.full((2,), float(s))
        v = backbone.guided_velocity(traj.x_t[:, t], sig, cond, 1.0)
        with backbone.adapters_disabled():
            v_ref = backbone.guided_velocity(traj.x_t[:, t], sig, cond, 1.0)
    _, mu, _, _ = sde_step_with_logprob(v, traj.x_t[:, t], s, sn, "flow_grpo", 0.7)
    _, mu_ref, _, _ = sde_step_with_logprob(v_ref, traj.x_t[:, t], s, sn, "flow_grpo", 0.7)
    sigma_t = 0.7 * math.sqrt(float(s) / (1 - float(s)))
    ref = ((mu.double() - mu_ref.double()) ** 2).flatten(1).mean(1) / (2 * sigma_t**2)
    assert float(ref.mean()) > 0
    _close(metrics["kl/fixed"], ref.mean(), rel=1e-4)


# ------------------------------------------------------------------ 3. BPGO (TeleBoost bgpo.py)
def _crt_ref(r, p, a, tau):
    flag = r - p
    numerator = a * flag + max(np.sign(flag), 0.0)
    return numerator / (1.0 + math.exp(min(max(-r / tau, -30.0), 30.0))) * r


def test_crt_rerange_hand_values_both_sides_of_the_prior():
    r = torch.tensor([-2.0, -1.0, -0.1, 0.0, 0.3, 1.0, 2.5], dtype=torch.float64)
    prior = 0.3
    ours = crt_rerange(r, prior, a=50.0, temperature=5.0)
    _close(ours, [_crt_ref(float(x), prior, 50.0, 5.0) for x in r])
    # by hand, prior 0: R = -2 -> (-100)/(1 + e^0.4)·(-2) = 80.26; R = -1 -> (-50)/(1 + e^0.2)·(-1) = 22.51
    hand = crt_rerange(torch.tensor([-2.0, -1.0]), 0.0, 50.0, 5.0)
    _close(hand, [200 / (1 + math.exp(0.4)), 50 / (1 + math.exp(0.2))])
    assert hand[0] > hand[1]  # not monotone for negative rewards (documented)
    above = crt_rerange(torch.linspace(0.31, 3.0, 50), torch.tensor(0.3), 50.0, 5.0)
    below = crt_rerange(torch.linspace(0.0, 0.3, 50), torch.tensor(0.3), 50.0, 5.0)
    assert bool((above[1:] > above[:-1]).all()) and bool((above > 0).all())  # increasing above max(prior, 0)
    assert bool((below <= 0).all()) and float(below.min()) < 0  # [0, prior] -> <= 0: separated, but not monotone there
    _close(crt_rerange(torch.tensor([0.15]), 0.3), [_crt_ref(0.15, 0.3, 50.0, 5.0)])
    assert float(crt_rerange(torch.tensor([0.15]), 0.3)) == pytest.approx(-0.571, abs=1e-3)
    assert crt_rerange(torch.tensor([0.3]), 0.3)[0] == 0.0  # indicator is 0 at equality


def test_paper_crt_non_monotone_region_is_as_documented():
    torch.testing.assert_close(contrastive_reward_transform(torch.tensor([-3.0, -1.0]), torch.tensor(0.0)),
                               torch.tensor([-3 * math.exp(-3), -math.exp(-1)]))  # [-0.149, -0.368]: worse ranks higher


def _ras_ref(r, p, prior_var, lo, hi):
    r = np.asarray(r, dtype=np.float64)
    n = len(r)
    var = r.var(ddof=1) + 1e-8 if n > 1 else 1.0
    post_var = 1.0 / (n / var + 1.0 / prior_var)
    post_mean = post_var * (n * r.mean() / var + p / prior_var)
    z = (p - post_mean) / math.sqrt(post_var)
    return lo + (hi - lo) * (1.0 - 0.5 * (1 + math.erf(z / math.sqrt(2))))


def test_ras_bayes_weight_hand_values_and_variance_property():
    # by hand: r = [1, 2, 3], prior 1: s² = 1, post var 1/4, post mean 1.75, z = -1.5, w = 0.5 + Φ(1.5)
    w = ras_bayes_weight(torch.tensor([1.0, 2.0, 3.0]), 1.0)
    assert w.dim() == 0 and float(w) == pytest.approx(0.5 + 0.5 * (1 + math.erf(1.5 / math.sqrt(2))), rel=1e-6)
    for r, p, pv, rng in [([0.2, 0.9, 0.4, 0.7], 0.5, 1.0, (0.5, 1.5)), ([3.0, 1.0], 2.5, 0.3, (0.2, 2.0)), ([1.0], 0.0, 1.0, (0.5, 1.5))]:
        _close(ras_bayes_weight(torch.tensor(r), p, pv, rng), _ras_ref(r, p, pv, *rng))
    # same gap above the prior: the noisier group gets the lower weight
    tight, noisy = ras_bayes_weight(torch.tensor([1.9, 2.1]), 1.0), ras_bayes_weight(torch.tensor([0.0, 4.0]), 1.0)
    assert float(tight) > float(noisy) > 1.0
    assert float(ras_bayes_weight(torch.tensor([1.0, 1.0, 1.0]), 1.0)) == pytest.approx(1.0)  # at the prior: middle


def test_bpgo_defaults_are_the_reference_recipe():
    bpgo = BPGO(backbone=WanBackbone(lora_rank=2, lora_alpha=2), val_num_videos=0)
    assert (bpgo.crt, bpgo.crt_a, bpgo.crt_temperature, bpgo.ras, bpgo.alpha, bpgo.prior_var, bpgo.weight_range,
            bpgo.min_scale, bpgo.max_scale) == ("binary", 50.0, 5.0, "bayes", 1.0, 1.0, (0.5, 1.5), 0.01, 10.0)
    with pytest.raises(ValueError, match="joint"):
        BPGO(backbone=WanBackbone(lora_rank=2, lora_alpha=2), reward_combination="min_norm", val_num_videos=0)
    with pytest.raises(ValueError, match="crt='binary'.*min-norm"):  # the rearranged sum would be ignored
        BPGO(backbone=WanBackbone(lora_rank=2, lora_alpha=2), reward_combination="min_norm", joint_combination="advantage", val_num_videos=0)


# ------------------------------------------------------------------ 4. ViPO map (TeleBoost vipo.py)
def _vipo_ref(features, latent_size, sigma=1.0):
    """compute_dinov2_feature_map_reverse with pca_method='weighted', from already-extracted features."""
    t_lat, h_lat, w_lat = latent_size
    t, c, h, w = features.shape
    frames = []
    for i in range(t):
        feats = features[i].reshape(c, h * w).T.astype(np.float64)
        centered = feats - feats.mean(axis=0, keepdims=True)
        _, sv, vt = np.linalg.svd(centered, full_matrices=False)
        comps = centered @ vt[:3].T
        explained = sv[:3] ** 2
        explained = explained / (explained.sum() + 1e-8)
        weights = np.zeros(h * w)
        for k in range(3):
            x = comps[:, k]
            weights += explained[k] * ((x.max() - x) / (x.max() - x.min()) if x.max() > x.min() else 0.5)
        m = gaussian_filter(np.clip(weights, 0, 1).reshape(h, w), sigma=sigma)
        m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.full_like(m, 0.5)
        r = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(h_lat, w_lat), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        frames.append(torch.ones_like(r) if float(r.max() - r.min()) <= 1e-8 else (r - r.min()) / (r.max() - r.min()))
    maps = torch.stack(frames)
    if t != t_lat:
        maps = torch.nn.functional.interpolate(maps[None, None], size=(t_lat, h_lat, w_lat), mode="trilinear", align_corners=False)[0, 0]
    return ((maps - maps.min()) / (maps.max() - maps.min())).numpy()


def test_vipo_map_matches_the_reference_step_by_step():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(5, 16, 6, 7, generator=g) + torch.linspace(0, 2, 7)  # a spatial structure along w
    for latent in [(5, 8, 8), (3, 12, 10)]:  # same and resampled frame count
        _close(vipo_advantage_map(feats, latent), _vipo_ref(feats.double().numpy(), latent))
    flipped = vipo_advantage_map(feats, (5, 8, 8), sign_rule="svd_flip")
    assert flipped.shape == (5, 8, 8) and float(flipped.min()) == 0.0 and float(flipped.max()) == 1.0
    assert torch.equal(vipo_advantage_map(torch.ones(3, 8, 4, 4), (2, 4, 4)), torch.ones(2, 4, 4))  # constant -> GRPO


# ------------------------------------------------------------------ 5. Self-Paced GRPO direction
def test_self_paced_weights_move_to_the_next_component_when_one_is_mastered():
    g = torch.Generator().manual_seed(4)
    motion = 0.2 + 0.1 * torch.randn(8, generator=g)
    tau = torch.tensor([0.5, 0.5])
    spread = 0.3 * torch.randn(8, generator=g)
    low = self_paced_weights(torch.stack([0.1 + spread, motion], 1), tau)
    high = self_paced_weights(torch.stack([0.9 + spread, motion], 1), tau)
    assert float(high[0]) < float(low[0]) and float(high[1]) > float(low[1])  # mastered visual hands weight on
    assert float(high[1]) > float(high[0])  # the case: visual mean 0.9 > τ 0.5 -> motion gets more
    torch.testing.assert_close(low.sum(), torch.tensor(1.0))
    # a saturated (zero-variance) component 1 hands its weight to component 2, even below its threshold
    sat = self_paced_weights(torch.stack([torch.full((8,), 0.1), motion], 1), tau, beta=1.0)
    assert float(sat[0]) == pytest.approx(0.0, abs=1e-6) and float(sat[1]) == pytest.approx(1.0, abs=1e-6)
    # offset invariance: a constant added to a component's rewards and to its τ changes nothing
    comps = torch.stack([0.4 + spread, motion, 0.3 * torch.randn(8, generator=g)], 1)
    tau3 = torch.tensor([0.5, 0.3, 0.1])
    shifted = comps + torch.tensor([0.9, -2.0, 5.0])
    torch.testing.assert_close(self_paced_weights(shifted, tau3 + torch.tensor([0.9, -2.0, 5.0])), self_paced_weights(comps, tau3))
    # hand values, K = 2, β = 0: w = (1 - c_1, c_1) with c_1 = sigmoid(mean r_1 - τ_1)
    w = self_paced_weights(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([0.0, 0.0]), beta=0.0)
    c1 = 1 / (1 + math.exp(-0.5))
    torch.testing.assert_close(w, torch.tensor([1 - c1, c1]))
    assert float(group_saturation(torch.tensor([0.2, 0.2, 0.2]))) == 1.0
    assert float(group_saturation(torch.tensor([0.0, 1.0, 2.0]) + 7)) == pytest.approx(float(group_saturation(torch.tensor([0.0, 1.0, 2.0]))))
    assert float(group_saturation(torch.tensor([0.3, 0.9]))) == pytest.approx(0.0, abs=1e-6)  # G = 2: any spread is not saturation
    # one success of four: deviations [.25, .25, .25, .75], Hoyer (2 - 1.5/sqrt(0.75))/(2 - 1)
    assert float(group_saturation(torch.tensor([0.0, 0.0, 0.0, 1.0]))) == pytest.approx(2 - 1.5 / math.sqrt(0.75), rel=1e-5)
    # G = 2 with spread does not saturate: the weights follow competence alone
    pair = torch.tensor([[0.0, 1.0], [1.0, 2.0]])  # (G=2, K=2)
    torch.testing.assert_close(self_paced_weights(pair, torch.tensor([0.0, 0.0]), beta=1.0), self_paced_weights(pair, torch.tensor([0.0, 0.0]), beta=0.0))


# ------------------------------------------------------------------ 6. joint reward combination
def test_joint_loss_combination_sums_per_reward_ppo_terms():
    g = torch.Generator().manual_seed(5)
    lp_old = torch.randn(6, generator=g)
    lp = lp_old + 0.3 * torch.randn(6, generator=g)
    per = torch.randn(2, 6, generator=g)
    c = torch.tensor([0.3, 0.7])
    grpo = GRPO(backbone=WanBackbone(lora_rank=2, lora_alpha=2), reward_combination="min_norm", val_num_videos=0)
    assert grpo.joint_combination == "loss"
    grpo.round_joint, grpo.current_index = (c, per), torch.arange(6)
    combined = (c.view(-1, 1) * per).sum(0)
    loss, _ = grpo.policy_loss(lp, lp_old, combined, None, None, None)
    ref = sum(float(c[i]) * np.maximum(-per[i].double() * np.exp(lp - lp_old).double(),
                                       -per[i].double() * np.clip(np.exp((lp - lp_old).double()), 1 - 1e-4, 1 + 1e-4)) for i in range(2))
    _close(loss, ref, rel=1e-5)
    adv_form, _ = ppo_clip_loss(lp, lp_old, combined, 1e-4)
    assert not torch.allclose(loss, adv_form)  # off-policy with mixed signs: the two forms differ
    grpo.round_joint = None  # "advantage" form: one PPO term on Σ c_i A_i
    torch.testing.assert_close(grpo.policy_loss(lp, lp_old, combined, None, None, None)[0], adv_form)
    at_one, _ = ppo_clip_loss(lp_old, lp_old, combined, 1e-4)  # at ratio 1 both give -Σ c_i A_i
    grpo.round_joint = (c, per)
    torch.testing.assert_close(grpo.policy_loss(lp_old, lp_old, combined, None, None, None)[0], at_one)


# ------------------------------------------------------------------ 7. timestep subsets
def test_trained_steps_are_drawn_per_sample_by_default():
    grpo = GRPO(backbone=WanBackbone(lora_rank=2, lora_alpha=2), sde_type="sage", timestep_fraction=0.5, val_num_videos=0)
    assert grpo.timestep_selection == "per_sample"
    sigmas, _ = flow_schedule(10, 3.0)
    steps = grpo.train_steps(sigmas, torch.Generator().manual_seed(0), 16)
    assert steps.shape == (16, 5)
    assert all(len(set(row.tolist())) == 5 and set(row.tolist()) <= set(range(10)) for row in steps)
    assert len({tuple(sorted(row.tolist())) for row in steps}) > 1  # rows differ
    torch.testing.assert_close(steps, grpo.train_steps(sigmas, torch.Generator().manual_seed(0), 16))  # reproducible
    grpo.timestep_selection = "random"
    shared = grpo.train_steps(sigmas, torch.Generator().manual_seed(0), 4)
    assert all(torch.equal(row, shared[0]) for row in shared)
    grpo.timestep_selection = "ordered"
    assert grpo.train_steps(sigmas, torch.Generator(), 2).tolist() == [[0, 1, 2, 3, 4]] * 2
