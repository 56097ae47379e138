"""GRPO / SAGE-GRPO: pure parts (exact values), properties on the tiny Wan, smoke fits, resume."""
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_vidalign.algorithms import GRPO, SAGEGRPO, AdaptiveKLController
from lightning_vidalign.algorithms.advantages import grpo_advantages
from lightning_vidalign.algorithms.losses import ppo_clip_loss
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.rewards import FlickerReward, MotionMagnitudeReward


# ------------------------------------------------------------------ pure maths
def test_grpo_advantages_exact_values_and_zero_variance_groups():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 10.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, zero = grpo_advantages(r, ids, eps=0.0, clip=None)
    # group 0: mean 2, std 1 -> (-1, 1); group 1: zero variance -> 0; group 2: mean 5, std 5 -> (-1, 1)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    assert float(zero) == pytest.approx(1 / 3)
    # one outlier in a group of G: z = sqrt(G - 1) for it, -1/sqrt(G - 1) for the others
    adv, _ = grpo_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.zeros(4, dtype=torch.long), clip=5.0)
    assert adv.max().item() == pytest.approx(math.sqrt(3), rel=1e-4) and adv.min().item() == pytest.approx(-1 / math.sqrt(3), rel=1e-4)
    adv, _ = grpo_advantages(torch.tensor([0.0] * 39 + [1.0]), torch.zeros(40, dtype=torch.long), clip=5.0)
    assert adv.max().item() == 5.0  # sqrt(39) = 6.24 clipped
    with pytest.raises(FloatingPointError, match="1 non-finite"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long))


def test_ppo_clip_loss_hand_values():
    lp_old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, m = ppo_clip_loss(lp, lp_old, adv, clip_range=0.2)
    # max(-A·r, -A·clip(r)): [-1, max(-1.5, -1.2) = -1.2, max(-0.5, -0.8) = -0.5, max(1.5, 1.2) = 1.5]
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.2, -0.5, 1.5]))
    assert float(m["clip_frac"]) == 0.75 and float(m["ratio"]) == pytest.approx(1.125)
    g = torch.autograd.grad(ppo_clip_loss(lp.requires_grad_(), lp_old, adv, 0.2)[0].sum(), lp)[0]
    torch.testing.assert_close(g, torch.tensor([-1.0, 0.0, -0.5, 1.5]))  # clipped samples carry no gradient


def test_adaptive_kl_controller_warmup_and_rule():
    c = AdaptiveKLController(kl_min=1e-7, kl_max=1e-5, warmup_steps=100, target=1.0, history=10)
    assert c.value == 1e-7
    for k in range(1, 101):
        assert c.update(0.0) == pytest.approx(1e-7 + (1e-5 - 1e-7) * k / 100)
    assert c.value == pytest.approx(1e-5)
    # paper rule: KL above 1.5·target relaxes (x0.9), below 0.5·target tightens (x1.1), clamped
    for _ in range(10):
        c.update(5.0)  # the window of 10 still holds warm-up zeros: means 0.5, 1.0, 1.5 (no change), then 2.0 ... 5.0
    assert c.value == pytest.approx(1e-5 * 0.9**7)
    v = c.value
    c.update(1.0)  # mean of last 10 still large
    assert c.value == pytest.approx(v * 0.9)
    for _ in range(200):
        c.update(0.0)
    assert c.value == pytest.approx(1e-5)  # x1.1 up to the clamp
    conv = AdaptiveKLController(warmup_steps=0, target=1.0, rule="conventional")
    conv.value = 1e-6
    conv.update(5.0)
    assert conv.value == pytest.approx(1.1e-6)  # conventional: a large KL tightens
    state = c.state_dict()
    d = AdaptiveKLController(target=1.0)
    d.load_state_dict(state)
    assert d.update(5.0) == c.update(5.0)


# --------------------------------------------------------- on the tiny model
def _module(cls=GRPO, **kw):
    args = dict(backbone=WanBackbone(lora_rank=4, lora_alpha=4), num_inference_steps=6, guidance=2.0, sampler="ode",
                rollouts_per_condition=2, val_num_videos=1, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    args.update(kw)
    return cls(**args)


def _perturb(bb, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "cps", "sage"])
def test_rescoring_under_unchanged_weights_gives_ratio_one(wan_batch, sde_type):
    m = _module(sde_type=sde_type, kl_type="moving")
    _perturb(m.backbone, 0)
    cond = m.backbone.encode_condition(wan_batch)
    traj = m.backbone.rollout(cond, sde_type, 6, 2.0, torch.Generator().manual_seed(0), keep_trajectory=True, num_frames=9, eta=m.eta, decode=False)
    m.refresh_anchor()
    adv = torch.tensor([1.0, -1.0])
    for t in range(5):
        s, sn = float(traj.sigmas[t]), float(traj.sigmas[t + 1])
        loss, metrics = m.step_loss(traj.x_t[:, t], traj.x_next[:, t], traj.log_prob[:, t], adv, s, sn, cond, 1.0)
        assert float(metrics["ratio"]) == 1.0 and float(metrics["clip_frac"]) == 0.0
        assert float(metrics["kl/moving"]) == 0.0  # zero right after an anchor refresh
    before = {k: v.clone() for k, v in m.backbone.trainable_state_dict().items()}
    _perturb(m.backbone, 1)  # the policy moves away from the anchor
    moved = {k: v.clone() for k, v in m.backbone.trainable_state_dict().items()}
    _, metrics = m.step_loss(traj.x_t[:, 2], traj.x_next[:, 2], traj.log_prob[:, 2], adv, float(traj.sigmas[2]), float(traj.sigmas[3]), cond, 1.0)
    assert float(metrics["kl/moving"]) > 0 and float(metrics["ratio"]) != 1.0
    after = m.backbone.trainable_state_dict()
    assert all(torch.equal(after[k], moved[k]) for k in moved)  # anchor evaluation restored the weights
    assert any(not torch.equal(before[k], moved[k]) for k in moved)


def test_fixed_kl_uses_the_base_model(wan_batch):
    m = _module(sde_type="sage", kl_type="fixed", kl_coef=1.0)
    cond = m.backbone.encode_condition(wan_batch)
    traj = m.backbone.rollout(cond, "sage", 6, 2.0, torch.Generator().manual_seed(0), keep_trajectory=True, num_frames=9, decode=False)
    args = (traj.x_t[:, 1], traj.x_next[:, 1], traj.log_prob[:, 1], torch.zeros(2), float(traj.sigmas[1]), float(traj.sigmas[2]), cond, 1.0)
    _, metrics = m.step_loss(*args)  # gaussian lora init: B = 0, the adapters are the identity
    assert float(metrics["kl/fixed"]) == 0.0
    _perturb(m.backbone, 2)
    loss, metrics = m.step_loss(*args)
    assert float(metrics["kl/fixed"]) > 0
    torch.testing.assert_close(loss, torch.zeros(2) + loss)  # advantages 0: loss is λ·KL only
    assert float(loss.detach().mean()) == pytest.approx(float(metrics["kl/fixed"]), rel=1e-5)


def test_equalizer_brings_per_step_gradient_norms_together(wan_batch):
    """SAGE-GRPO Fig. 3/4: per-step policy-gradient norms spread > 10x without, < 3x with the equalizer."""
    m = _module(SAGEGRPO, num_inference_steps=10, backbone=WanBackbone(lora_rank=4, lora_alpha=4, lora_init=True))
    _perturb(m.backbone, 5, 0.02)
    spread = {}
    for eq in (False, True):
        norms = torch.tensor(list(m.policy_gradient_norms(wan_batch, torch.Generator().manual_seed(0), equalize=eq).values()))
        spread[eq] = float(norms.max() / norms.min())
    assert spread[False] > 10 and spread[True] < 3, spread


def _trainer(tmp_path, steps, callbacks=(), **kw):
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, limit_val_batches=0, callbacks=list(callbacks), default_root_dir=str(tmp_path), **kw,
    )


@pytest.mark.parametrize(
    "cls,kw",
    [
        (GRPO, dict(sde_type="flow_grpo", kl_type="fixed", kl_coef=0.01, minibatches_per_round=2)),
        (GRPO, dict(sde_type="dance_grpo", eta=0.3, kl_type="step", kl_coef=0.01, timestep_selection="ordered")),
        (GRPO, dict(sde_type="cps", kl_type="none", sde_window=[0, 1, 2, 3])),
        (SAGEGRPO, dict(anchor_interval=2, minibatches_per_round=2)),
    ],
)
def test_grpo_smoke_fit_changes_the_lora(tmp_path, wan_datamodule, cls, kw):
    m = _module(cls, **kw)
    before = {k: v.clone() for k, v in m.backbone.trainable_state_dict().items()}
    trainer = _trainer(tmp_path, 3, callbacks=[MotionMagnitudeReward(weight=1.0), FlickerReward(weight=5.0)])
    trainer.fit(m, datamodule=wan_datamodule)
    after = m.backbone.trainable_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    metrics = trainer.logged_metrics
    for key in ("train/ratio", "train/clip_frac", "train/approx_kl", "reward/total/mean", "reward/total/std", "train/zero_std_groups", "kl/coef", "train/grad_norm"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert m.updates == 3 * m.minibatches_per_round
    if cls is SAGEGRPO:
        assert m.kl_controller.step_count == 6 and float(metrics["train/equalizer_max_over_min"]) > 1


def test_grpo_requires_a_flow_backbone_and_valid_options():
    from lightning_vidalign.backbones import SVDBackbone

    with pytest.raises(ValueError, match="flow-matching backbone"):
        GRPO(backbone=SVDBackbone(lora_rank=2))
    with pytest.raises(ValueError, match="stochastic"):
        _module(sde_type="ode")
    with pytest.raises(ValueError, match="kl_type"):
        _module(kl_type="reverse")
    with pytest.raises(ValueError, match=">= 2"):
        _module(rollouts_per_condition=1)
    with pytest.raises(ValueError, match="kl_coef=0.1 is ignored"):
        _module(kl_type="fixed", kl_coef=0.1, kl_controller=AdaptiveKLController())


def test_sage_grpo_takes_a_fixed_kl_coefficient_instead_of_its_controller():
    """SAGE-GRPO's paper controller is the default; ``kl_controller: null`` with ``kl_coef`` gives a fixed λ_KL (it
    silently kept the controller, so a "λ_KL = 10" run was the λ ≤ 1e-5 run bit for bit); both at once is refused."""
    backbone = lambda: WanBackbone(lora_rank=2, lora_alpha=2)  # noqa: E731
    default = SAGEGRPO(backbone=backbone())
    assert isinstance(default.kl_controller, AdaptiveKLController) and default.kl_coefficient() == pytest.approx(1e-7)
    fixed = SAGEGRPO(backbone=backbone(), kl_controller=None, kl_coef=10.0)
    assert fixed.kl_controller is None and fixed.kl_coefficient() == 10.0
    with pytest.raises(ValueError, match="both given"):
        SAGEGRPO(backbone=backbone(), kl_controller=AdaptiveKLController(), kl_coef=10.0)


def test_nonfinite_rewards_skip_the_round(tmp_path, wan_datamodule):
    class NaNReward(MotionMagnitudeReward):
        def score(self, videos, batch=None):
            return torch.full((videos.shape[0],), float("nan"))

    m = _module(on_nonfinite="skip")
    before = {k: v.clone() for k, v in m.backbone.trainable_state_dict().items()}
    trainer = _trainer(tmp_path, 2, callbacks=[NaNReward()])
    trainer.fit(m, datamodule=wan_datamodule)
    assert m.skipped_steps == 2 and m.updates == 0
    assert all(torch.equal(before[k], v) for k, v in m.backbone.trainable_state_dict().items())
    m = _module()
    with pytest.raises(FloatingPointError, match="non-finite rewards"):
        _trainer(tmp_path, 1, callbacks=[NaNReward()]).fit(m, datamodule=wan_datamodule)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite_policy_loss_skips_the_optimizer_step(tmp_path, wan_datamodule, mode):
    m = _module(on_nonfinite=mode, minibatches_per_round=2)
    original = m.step_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        return loss * float("nan"), metrics

    m.step_loss = nan_loss
    before = {k: v.clone() for k, v in m.backbone.trainable_state_dict().items()}
    trainer = _trainer(tmp_path, 2, callbacks=[MotionMagnitudeReward()])
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="policy loss"):
            trainer.fit(m, datamodule=wan_datamodule)
        return
    trainer.fit(m, datamodule=wan_datamodule)
    assert m.updates == 0 and m.skipped_steps == 4  # 2 rounds x 2 minibatches
    assert all(torch.equal(before[k], v) for k, v in m.backbone.trainable_state_dict().items())


def test_sage_grpo_resume_is_bitwise_identical(tmp_path):
    """Stop after 3 rounds, resume to 5: same rewards per round and the same final adapters as an
    uninterrupted run (anchor, KL controller, optimizer, scheduler, RNG all restored)."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lightning_vidalign.datamodules import VideoClipDataModule

    class Record(Callback):
        def __init__(self):
            self.rewards = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rewards[pl_module.batches_seen] = float(trainer.callback_metrics["reward/total/mean"])

    def run(steps, ckpt_path=None, save=False):
        dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions="configs/data/skvideo_captions.jsonl")
        rec = Record()
        cbs = [MotionMagnitudeReward(), rec]
        if save:
            cbs.append(ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_train_steps=3, save_top_k=0))
        m = _module(SAGEGRPO, anchor_interval=2, minibatches_per_round=2, kl_controller=AdaptiveKLController(warmup_steps=4, target=1e-6),
                    lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.5))
        _trainer(tmp_path, steps, callbacks=cbs).fit(m, datamodule=dm, ckpt_path=ckpt_path)
        return rec.rewards, m

    full, m_full = run(5)
    run(3, save=True)
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert state["grpo"]["updates"] == 6 and state["grpo"]["anchor"] is not None and state["grpo"]["kl_controller"]["step_count"] == 6
    resumed, m_res = run(5, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert sorted(resumed) == [4, 5]
    for k in resumed:
        assert resumed[k] == full[k]
    for k, v in m_full.backbone.trainable_state_dict().items():
        assert torch.equal(v, m_res.backbone.trainable_state_dict()[k]), k
    assert m_res.kl_controller.state_dict() == m_full.kl_controller.state_dict()


def test_ti2v_grpo_and_shift_on_wan(tmp_path, wan_datamodule):
    """TI2V (first frame + caption, Wan 2.2 style): SAGE-GRPO trains; SHIFT (sampler-agnostic) runs on Wan too."""
    from lightning_vidalign.algorithms import SHIFT

    m = _module(SAGEGRPO, backbone=WanBackbone(mode="ti2v", lora_rank=4, lora_alpha=4))
    before = {k: v.clone() for k, v in m.backbone.trainable_state_dict().items()}
    _trainer(tmp_path, 2, callbacks=[MotionMagnitudeReward()]).fit(m, datamodule=wan_datamodule)
    assert all(not torch.equal(before[k], v) for k, v in m.backbone.trainable_state_dict().items() if "lora_B" in k)
    shift = SHIFT(backbone=WanBackbone(lora_rank=4, lora_alpha=4), sampler="sage", num_inference_steps=4, rollouts_per_condition=2, passes=1,
                  val_num_videos=0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    before = {k: v.clone() for k, v in shift.backbone.trainable_state_dict().items()}
    trainer = _trainer(tmp_path, 2, callbacks=[MotionMagnitudeReward()])
    trainer.fit(shift, datamodule=wan_datamodule)
    assert all(not torch.equal(before[k], v) for k, v in shift.backbone.trainable_state_dict().items() if "lora_B" in k)
    assert math.isfinite(float(trainer.logged_metrics["train/loss"]))
