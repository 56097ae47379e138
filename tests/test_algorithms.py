import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_vidalign.algorithms import SFT, SHIFT, RewardPretrain
from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.rewards import IMRReward


def _optimizer(params):
    return torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.95))


def _trainer(tmp_path, steps, callbacks=(), **kw):
    kw.setdefault("limit_val_batches", 1)
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=steps,
        check_val_every_n_epoch=None, log_every_n_steps=1, callbacks=list(callbacks), default_root_dir=str(tmp_path), **kw,
    )


def _lora(module):
    return {k: v.clone() for k, v in module.backbone.trainable_state_dict().items()}


def _assert_changed_and_finite(before, module, trainer):
    after = module.backbone.trainable_state_dict()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed == len(before), f"only {changed}/{len(before)} LoRA tensors changed"
    metrics = trainer.logged_metrics
    assert metrics
    for k, v in metrics.items():
        assert math.isfinite(float(v)), (k, v)


def test_sft_smoke_fit(tmp_path, datamodule):
    module = SFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=_optimizer, num_inference_steps=3, val_num_videos=1)
    before = _lora(module)
    trainer = _trainer(tmp_path, 4)
    trainer.fit(module, datamodule=datamodule)
    _assert_changed_and_finite(before, module, trainer)
    assert "val/gen/motion_score" in trainer.logged_metrics and "val/real/motion_smoothness" in trainer.logged_metrics


def test_reward_weighted_sft_smoke(tmp_path, datamodule):
    module = SFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=_optimizer, reward_weighting=True, val_num_videos=0)
    before = _lora(module)
    trainer = _trainer(tmp_path, 2, callbacks=[IMRReward(adversarial=False)], limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    _assert_changed_and_finite(before, module, trainer)
    assert float(trainer.logged_metrics["train/weight_max"]) >= 1.0


def _shift(**kw):
    args = dict(optimizer=_optimizer, num_inference_steps=3, rollouts_per_condition=2, passes=2, val_num_videos=1, sampler="euler_ancestral")
    args.update(kw)
    return SHIFT(SVDBackbone(lora_rank=4, lora_alpha=4), **args)


def test_shift_smoke_fit_updates_lora_discriminator_and_logs(tmp_path, datamodule):
    module = _shift()
    reward = IMRReward(seed=0)
    disc_before = [p.clone() for p in reward.disc.parameters()]
    before = _lora(module)
    trainer = _trainer(tmp_path, 5, callbacks=[reward])
    trainer.fit(module, datamodule=datamodule)
    _assert_changed_and_finite(before, module, trainer)
    assert reward.num_updates == 5
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, reward.disc.parameters()))
    for key in ("reward/imr/mean", "adv/abs_mean", "reward/imr/disc_acc", "train/loss_fake", "val/gen/dynamic_degree"):
        assert key in trainer.logged_metrics, key
    assert module.buffer.round == 2  # 2 conditions x G=2 rollouts, minibatch 2 -> 2 steps/pass x 2 passes = 4 steps/round


def test_shift_noise_alignment_shares_sigma_and_noise(tmp_path, datamodule, real_batch):
    calls = {}

    for aligned in (True, False):
        module = _shift(noise_alignment=aligned)
        seen = []
        original = module.backbone.training_loss

        def spy(x0, cond, sigma, noise, _orig=original, _seen=seen):
            _seen.append((sigma.clone(), noise.clone()))
            return _orig(x0, cond, sigma, noise)

        module.backbone.training_loss = spy
        trainer = L.Trainer(default_root_dir=str(tmp_path), max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[IMRReward()])
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
        (s_fake, n_fake), (s_real, n_real) = seen
        calls[aligned] = torch.equal(s_fake, s_real) and torch.equal(n_fake, n_real)
    assert calls == {True: True, False: False}


def test_shift_zero_advantages_give_the_sft_gradient(real_batch):
    module = _shift(lam=0.01)
    bb = module.backbone
    g = torch.Generator().manual_seed(0)
    x0 = bb.encode(real_batch["video"])
    cond = bb.encode_condition(real_batch, g)
    sigma, noise = bb.sample_sigma(2, g), torch.randn(x0.shape, generator=g)
    fake = x0.flip(0)
    from lightning_vidalign.algorithms.losses import sft_loss, shift_loss

    def grads(loss):
        params = bb.trainable_parameters()
        return torch.autograd.grad(loss, params)

    l_real = bb.training_loss(x0, cond, sigma, noise)
    l_fake = bb.training_loss(fake, cond, sigma, noise)
    g_shift = grads(shift_loss(l_fake, l_real, torch.zeros(2), lam=0.01))
    g_sft = grads(sft_loss(bb.training_loss(x0, cond, sigma, noise)))
    for a, b in zip(g_shift, g_sft):
        assert torch.equal(a, b)


def test_shift_resume_restores_buffer_and_continues(tmp_path, datamodule):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _shift(val_num_videos=0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=3, save_top_k=0)
    trainer = _trainer(tmp_path, 3, callbacks=[IMRReward(seed=0), ckpt], limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert all(k.startswith("backbone.") and "lora_" in k for k in state["state_dict"])  # adapter-only
    assert state["rollout_buffer"]["cursor"] == 3 and state["vidalign"]["batches_seen"] == 3
    resumed = _shift(val_num_videos=0)
    reward = IMRReward(seed=5)
    trainer2 = _trainer(tmp_path, 5, callbacks=[reward], limit_val_batches=0)
    trainer2.fit(resumed, datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for k, v in state["state_dict"].items():
        assert not torch.equal(v, resumed.state_dict()[k])  # trained further from the restored adapters
    assert resumed.batches_seen == 5 and reward.num_updates == 5  # discriminator state restored (3) + 2
    assert resumed.buffer.round == 2


def test_reward_pretrain_corrupt_negatives_logs_accuracy(tmp_path, datamodule):
    module = RewardPretrain(SVDBackbone(lora_rank=4, lora_alpha=4), negatives="corrupt")
    reward = IMRReward(seed=0, save_to=str(tmp_path / "imr.pt"))
    trainer = _trainer(tmp_path, 3, callbacks=[reward])
    trainer.fit(module, datamodule=datamodule)
    assert reward.num_updates == 3
    logged = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("val/reward/imr/")}
    assert set(logged) == {f"val/reward/imr/accuracy{s}" for s in ("", "_real", "_reversed", "_shuffled", "_frozen")}
    fake = (logged["val/reward/imr/accuracy_reversed"] + logged["val/reward/imr/accuracy_shuffled"] + logged["val/reward/imr/accuracy_frozen"]) / 3
    assert logged["val/reward/imr/accuracy"] == pytest.approx(0.5 * (logged["val/reward/imr/accuracy_real"] + fake), abs=1e-6)
    assert (tmp_path / "imr.pt").is_file()


def test_temporal_corruptions_kinds_and_mix():
    from lightning_vidalign.algorithms.reward_pretrain import CORRUPTIONS, temporal_corruptions

    video = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1, 1, 1).expand(2, 6, 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(temporal_corruptions(video, g, "reversed"), video.flip(1))
    frozen = temporal_corruptions(video, g, "frozen")
    assert torch.equal(frozen[:, 3:], video[:, 3:4].expand(2, 3, 3, 2, 2)) and torch.equal(frozen[:, :3], video[:, :3])
    shuffled = temporal_corruptions(video, g, "shuffled")
    assert not torch.equal(shuffled, video) and torch.equal(shuffled.sort(1).values, video)  # same frames, other order
    seen = set()
    for _ in range(12):  # a batch of 2 still meets all three kinds over calls (random offset)
        out = temporal_corruptions(video, g)
        for clip, src in zip(out, video):
            seen.add("reversed" if torch.equal(clip, src.flip(0)) else "frozen" if torch.equal(clip[3:], src[3:4].expand(3, 3, 2, 2)) else "shuffled")
    assert seen == set(CORRUPTIONS)
    with pytest.raises(ValueError, match="kind"):
        temporal_corruptions(video, g, "blurred")


def test_nonfinite_loss_raises_or_skips(datamodule):
    module = SFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=_optimizer)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.backbone.training_loss = lambda *a: torch.full((2,), float("nan"), requires_grad=True)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    module = SFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=_optimizer, on_nonfinite="skip")
    module.backbone.training_loss = lambda *a: torch.full((2,), float("nan"), requires_grad=True)
    before = _lora(module)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    assert module.skipped_steps == 2 and module.batches_seen == 2  # stops after 2 batches though no step was taken
    assert all(torch.equal(before[k], v) for k, v in module.backbone.trainable_state_dict().items())


def test_shift_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    """Stop after 3 batches (mid-epoch, mid-round), resume, compare steps 4..7 with an uninterrupted run."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lightning_vidalign.datamodules import VideoClipDataModule

    class Record(Callback):
        def __init__(self):
            self.losses = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[pl_module.batches_seen] = (outputs["loss"].item(), batch["start"].tolist())

    def run(steps, ckpt_path=None, save=False):
        dm = VideoClipDataModule(batch_size=2, shot_detector="histogram")
        rec = Record()
        callbacks = [IMRReward(seed=0), rec]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_train_steps=3, save_top_k=0))
        trainer = _trainer(tmp_path, steps, callbacks=callbacks, limit_val_batches=0)
        trainer.fit(_shift(val_num_videos=0, rollouts_per_condition=2, passes=2), datamodule=dm, ckpt_path=ckpt_path)
        return rec.losses

    full = run(7)
    run(3, save=True)
    resumed = run(7, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert sorted(resumed) == [4, 5, 6, 7]  # crosses an epoch boundary (5 batches per epoch)
    for k in resumed:
        assert resumed[k] == full[k], (k, resumed[k], full[k])


def test_accuracy_from_logits_hand_case():
    from lightning_vidalign.algorithms.reward_pretrain import accuracy_from_logits

    acc = accuracy_from_logits(torch.tensor([1.0, -1.0]), {"a": torch.tensor([-2.0, 0.5]), "b": torch.tensor([1.0, -3.0])})
    # real: 1 of 2 > 0; a: 1 of 2 < 0, pairs (1>-2, 1>0.5, -1>-2, -1<0.5) -> 3/4; b: 1 of 2 < 0, (1=1 -> 1/2, 1>-3, -1<1, -1>-3) -> 2.5/4
    assert acc == pytest.approx({"real": 0.5, "a": 0.5, "auc_a": 0.75, "b": 0.5, "auc_b": 0.625, "balanced": 0.5, "auc": 0.6875})


@pytest.mark.parametrize("normalization", ["center", "std"])
def test_shift_advantage_normalization_fills_the_buffer_with_its_form(tmp_path, datamodule, normalization):
    from lightning_vidalign.algorithms.advantages import grpo_advantages, shift_advantages
    from lightning_vidalign.rewards import LuminanceReward

    module = _shift(advantage_normalization=normalization, passes=1, val_num_videos=0)
    trainer = _trainer(tmp_path, 1, callbacks=[LuminanceReward()], limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    data = module.buffer.data
    rewards, groups = data["rewards"], data["group_ids"]
    assert rewards.shape == (4,) and groups.tolist() == [0, 0, 1, 1] and rewards.std() > 0
    expected = grpo_advantages(rewards, groups, clip=5.0)[0] if normalization == "std" else shift_advantages(rewards, groups, 5.0)
    assert torch.allclose(data["advantages"], expected)
    # the better rollout of each condition gets the positive advantage (both forms)
    for g in (0, 1):
        r, a = rewards[groups == g], data["advantages"][groups == g]
        assert torch.equal(r.argmax(), a.argmax()) and a.sum().abs() < 1e-3
    with pytest.raises(ValueError, match="advantage_normalization"):
        _shift(advantage_normalization="rank")
