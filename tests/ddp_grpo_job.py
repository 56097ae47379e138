"""SAGE-GRPO under DDP with 2 CPU processes (gloo); each rank dumps its adapters and advantages.

Run by tests/test_distributed.py as ``python ddp_grpo_job.py OUT_DIR CAPTIONS``. Two optimizer steps
per round, each accumulated over several backward passes (gradient sync only on the last).
"""
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import lightning as L
import torch

from lightning_vidalign.algorithms import SAGEGRPO
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import FlickerReward, MotionMagnitudeReward


class RecordingSAGEGRPO(SAGEGRPO):
    def compute_advantages(self, everyone, batch):
        adv = super().compute_advantages(everyone, batch)
        self.records.append({"rewards": everyone.rewards.cpu(), "group_ids": everyone.group_ids.cpu(), "advantages": adv.cpu(), "index": batch["index"].cpu()})
        return adv


class Dump(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        state = {"lora": pl_module.backbone.trainable_state_dict(), "records": pl_module.records, "updates": pl_module.updates}
        torch.save(state, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


if __name__ == "__main__":
    out, captions = sys.argv[1], sys.argv[2]
    dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=captions)
    module = RecordingSAGEGRPO(backbone=WanBackbone(lora_rank=4, lora_alpha=4), optimizer=_adamw, sampler="ode", num_inference_steps=4,
                               rollouts_per_condition=2, minibatches_per_round=2, train_batch_size=1, anchor_interval=2, val_num_videos=0)
    module.records = []
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[MotionMagnitudeReward(), FlickerReward(weight=5.0), Dump(out)])
    trainer.fit(module, datamodule=dm)
    from lightning_vidalign.cli import close_process_group

    close_process_group()  # (as vidalign does at the end of a command)
