"""BPGO, ViPO, Self-Paced GRPO, joint reward on the tiny Wan: properties, logged quantities, smoke fits."""
import glob
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_vidalign.algorithms import BPGO, GRPO, SelfPacedGRPO, TimmViTFeatures, TransNetV2Features, ViPO
from lightning_vidalign.algorithms.advantages import vipo_advantage_map
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.rewards import FlickerReward, MotionMagnitudeReward
from lightning_vidalign.rollouts import Rollouts

COMMON = dict(num_inference_steps=5, guidance=2.0, sampler="ode", rollouts_per_condition=2, sde_type="sage", val_num_videos=0,
              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))


def _trainer(tmp_path, steps, logger=False):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, limit_val_batches=0,
                     callbacks=[MotionMagnitudeReward(target=1.07), FlickerReward(weight=5.0)], default_root_dir=str(tmp_path))


def _fit_and_check(module, tmp_path, dm, steps=2, logger=False):
    before = {k: v.clone() for k, v in module.backbone.trainable_state_dict().items()}
    trainer = _trainer(tmp_path, steps, logger)
    trainer.fit(module, datamodule=dm)
    after = module.backbone.trainable_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    for k, v in trainer.logged_metrics.items():
        assert math.isfinite(float(v)), k
    return trainer.logged_metrics


def _perturb(backbone, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------------ ViPO
def test_all_ones_map_gives_exactly_the_grpo_loss(wan_batch):
    backbone = WanBackbone(lora_rank=4, lora_alpha=4)
    vipo = ViPO(backbone=backbone, ratio_mode="weighted", **COMMON)
    grpo = GRPO(backbone=backbone, **COMMON)
    cond = backbone.encode_condition(wan_batch)
    traj = backbone.rollout(cond, "sage", 5, 2.0, torch.Generator().manual_seed(0), keep_trajectory=True, keep_means=True, num_frames=9, decode=False)
    _perturb(backbone, 1)  # off-policy: ratios != 1
    t = 2
    s, sn = float(traj.sigmas[t]), float(traj.sigmas[t + 1])
    adv = torch.tensor([1.5, -0.5])
    vipo.rollouts, vipo.current_index, vipo.current_step = Rollouts(means=traj.extras["mean"]), torch.arange(2), t
    vipo.round_maps = torch.ones(2, *traj.x_t.shape[2:3], *traj.x_t.shape[-2:])
    loss_v, m_v = vipo.step_loss(traj.x_t[:, t], traj.x_next[:, t], traj.log_prob[:, t], adv, s, sn, cond, 1.0)
    loss_g, m_g = grpo.step_loss(traj.x_t[:, t], traj.x_next[:, t], traj.log_prob[:, t], adv, s, sn, cond, 1.0)
    assert float(m_g["ratio"]) != 1.0
    assert torch.equal(loss_v, loss_g) and torch.equal(m_v["ratio"], m_g["ratio"])
    # a non-uniform map changes the loss; per-position mode equals GRPO at ratio 1 (value)
    vipo.round_maps = torch.rand(vipo.round_maps.shape, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(vipo.step_loss(traj.x_t[:, t], traj.x_next[:, t], traj.log_prob[:, t], adv, s, sn, cond, 1.0)[0], loss_g)
    _perturb(backbone, 1, scale=-0.05)  # back on-policy
    vipo.round_maps, vipo.ratio_mode = torch.ones_like(vipo.round_maps), "per_position"
    loss_p, m_p = vipo.step_loss(traj.x_t[:, t], traj.x_next[:, t], traj.log_prob[:, t], adv, s, sn, cond, 1.0)
    torch.testing.assert_close(loss_p, -adv, atol=1e-5, rtol=0)


def test_psm_map_follows_a_moving_object():
    """The TransNetV2-feature map of a red square moving on a flat background separates the square from
    the background. Its polarity (square high or low) follows the sign LAPACK gives the principal
    components, as in TeleBoost's reference (no sign rule, then ``max - x``), so only the contrast is
    asserted."""
    t = 9
    video = torch.full((1, t, 3, 64, 64), 0.3)
    mask = torch.zeros(t, 64, 64)
    for i in range(t):
        x0 = 8 + 4 * i
        video[0, i, :, 20:40, x0 : x0 + 16] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)
        mask[i, 20:40, x0 : x0 + 16] = 1
    feats = TransNetV2Features()(video)
    assert feats.shape == (1, t, 64, 13, 24)
    m = vipo_advantage_map(feats[0], (t, 16, 16))
    assert m.shape == (t, 16, 16) and m.min() == 0 and m.max() == 1
    mk = torch.nn.functional.interpolate(mask[:, None], size=(16, 16), mode="area")[:, 0]
    assert abs(m[mk > 0.5].mean() - m[mk < 0.1].mean()) > 0.1
    assert abs(torch.corrcoef(torch.stack([m.flatten(), mk.flatten()]))[0, 1]) > 0.25
    assert torch.equal(vipo_advantage_map(torch.ones(3, 8, 4, 4), (2, 4, 4)), torch.ones(2, 4, 4))  # constant -> all ones


def test_timm_vit_backbone_local_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        TimmViTFeatures("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "nowhere.safetensors"), img_size=64)
    random = TimmViTFeatures("vit_tiny_patch16_224", img_size=64, random_init=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    loaded = TimmViTFeatures("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "vit.safetensors"), img_size=64)
    video = torch.rand(2, 3, 3, 64, 64)
    out = loaded(video)
    assert out.shape == (2, 3, 192, 4, 4)
    torch.testing.assert_close(out, random(video))


def test_vipo_smoke_logs_its_map(tmp_path, wan_datamodule):
    module = ViPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), log_map_every=1, minibatches_per_round=2, **COMMON)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    metrics = _fit_and_check(module, tmp_path, wan_datamodule, logger=logger)
    assert 0 < float(metrics["vipo/map_mean"]) < 1 and "prepare_round" in module.timer.seconds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(tmp_path / "tb" / "**" / "events*"), recursive=True)[0])
    acc.Reload()
    assert "vipo/map" in acc.Tags()["images"]


# ------------------------------------------------------------------------ BPGO
def test_bpgo_priors_weights_and_checkpoint(tmp_path, wan_datamodule, wan_batch):
    module = BPGO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), prior_rollouts=2, crt_shift=20.0, **COMMON)
    metrics = _fit_and_check(module, tmp_path, wan_datamodule)
    assert len(module.priors) >= 2 and float(metrics["bpgo/priors_cached"]) == len(module.priors)
    assert 0.5 < float(metrics["bpgo/group_weight_min"]) <= float(metrics["bpgo/group_weight_max"]) < 1.5
    ckpt = {"state_dict": {}}
    module.on_save_checkpoint(ckpt)
    fresh = BPGO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), **COMMON)
    fresh.on_load_checkpoint({**ckpt, "state_dict": {f"backbone.{k}": v for k, v in module.backbone.trainable_state_dict().items()}})
    assert fresh.priors == module.priors
    # a prior given by the data is used as is (no rollout)
    assert torch.equal(fresh.condition_priors({**wan_batch, "prior": torch.tensor([0.25, -1.0])}), torch.tensor([0.25, -1.0]))
    assert fresh.priors == module.priors
    # the reference CRT on negative rewards (motion and flicker rewards are <= 0) is refused, naming crt_shift
    unshifted = BPGO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), prior_rollouts=1, **COMMON)
    with pytest.raises(ValueError, match="crt_shift=0.0"):
        _trainer(tmp_path, 1).fit(unshifted, datamodule=wan_datamodule)


# ------------------------------------------------------- self-paced and joint
def test_self_paced_grpo_logs_curriculum_weights(tmp_path, wan_datamodule):
    module = SelfPacedGRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), components=["flicker", "motion"], tau=[-0.1, 1.0], **COMMON)
    metrics = _fit_and_check(module, tmp_path, wan_datamodule)
    w = float(metrics["curriculum/w_flicker"]) + float(metrics["curriculum/w_motion"])
    assert w == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["reward/motion/motion_px"]) > 0  # the reward's score_components() are logged
    with pytest.raises(ValueError, match="one tau per component"):
        SelfPacedGRPO(backbone=WanBackbone(lora_rank=2), components=["a", "b"], tau=[0.0], **{k: v for k, v in COMMON.items()})


def test_joint_reward_min_norm_in_grpo_and_bpgo(tmp_path, wan_datamodule):
    for cls in (GRPO, BPGO):
        kw = dict(prior_rollouts=1, crt="paper", joint_combination="advantage") if cls is BPGO else {}
        module = cls(backbone=WanBackbone(lora_rank=4, lora_alpha=4), reward_combination="min_norm", **kw, **COMMON)
        metrics = _fit_and_check(module, tmp_path, wan_datamodule)
        c = float(metrics["joint/c_motion"]) + float(metrics["joint/c_flicker"])
        assert c == pytest.approx(1.0, abs=1e-5)
