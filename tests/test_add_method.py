"""Adding a method on the round's phases (issue 33): a GRPO variant that overrides one hook, in at most 20 lines
(tests/grpo_variant.py, the file the docs' "Add a method" page shows), trains through GRPO's generate → score → update
unchanged: at ratio 1 (one minibatch per round) its update equals GRPO's (the clip is inactive there), and with two
minibatches per round — where the second sees ratios != 1 and GRPO clips — it differs."""
import inspect

import lightning as L
import pytest
import torch

import grpo_variant
from lightning_vidalign.algorithms import GRPO
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.rewards import FlickerReward, MotionMagnitudeReward


def test_the_extend_page_shows_the_variant_as_it_is():
    """docs/extending.md shows tests/grpo_variant.py inline (the page reads as plain Markdown); it must not go stale."""
    import os

    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "extending.md")).read()
    assert inspect.getsource(grpo_variant).rstrip("\n") in page


def test_the_variant_fits_in_twenty_lines():
    lines = inspect.getsource(grpo_variant).rstrip("\n").split("\n")
    assert len(lines) <= 20, f"tests/grpo_variant.py has {len(lines)} lines"
    assert [name for name, _ in inspect.getmembers(grpo_variant.UnclippedGRPO, inspect.isfunction)
            if name in vars(grpo_variant.UnclippedGRPO)] == ["policy_loss"]


def _fit(cls, wan_datamodule, tmp_path, minibatches):
    torch.manual_seed(0)
    module = cls(backbone=WanBackbone(lora_rank=4, lora_alpha=4), num_inference_steps=4, guidance=1.0, sampler="ode", rollouts_per_condition=2,
                 sde_type="flow_grpo", minibatches_per_round=minibatches, clip_range=1e-4, val_num_videos=1, train_batch_size=2,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    calls = []
    original = module.policy_loss
    module.policy_loss = lambda *a: calls.append(1) or original(*a)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path),
                        callbacks=[MotionMagnitudeReward(weight=1.0), FlickerReward(weight=5.0)])
    trainer.fit(module, datamodule=wan_datamodule)
    assert calls, "the policy_loss hook was not called"
    return module.backbone.trainable_state_dict()


@pytest.mark.parametrize("minibatches", [1, 2])
def test_the_variant_trains_through_grpos_phases(wan_datamodule, tmp_path, minibatches):
    ours = _fit(grpo_variant.UnclippedGRPO, wan_datamodule, tmp_path / "variant", minibatches)
    grpo = _fit(GRPO, wan_datamodule, tmp_path / "grpo", minibatches)
    lora_b = [k for k in ours if "lora_B" in k]
    assert max(float(grpo[k].abs().max()) for k in lora_b) > 1e-4  # (LoRA B starts at 0: the round trained)
    if minibatches == 1:  # ratio 1: clipped and unclipped losses have the same gradient
        for k in ours:
            torch.testing.assert_close(ours[k], grpo[k], rtol=0, atol=1e-6)
    else:  # the second minibatch is off-policy: GRPO clips it, the variant does not
        assert max(float((ours[k] - grpo[k]).abs().max()) for k in lora_b) > 1e-5
