"""SHIFT under DDP with 2 CPU processes (gloo); each rank dumps its adapters and discriminator.

Run by tests/test_distributed.py as ``python ddp_shift_job.py OUT_DIR``.
"""
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import lightning as L
import torch

from lightning_vidalign.algorithms import SHIFT
from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import IMRReward


class Dump(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        reward = next(c for c in trainer.callbacks if isinstance(c, IMRReward))
        state = {"lora": pl_module.backbone.trainable_state_dict(), "disc": reward.disc.state_dict(), "updates": reward.num_updates}
        torch.save(state, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def _adamw(params):
    return torch.optim.AdamW(params, lr=5e-3)


if __name__ == "__main__":
    out = sys.argv[1]
    dm = VideoClipDataModule(batch_size=2, shot_detector="histogram")
    module = SHIFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=_adamw, rollouts_per_condition=2, passes=2, num_inference_steps=3, val_num_videos=0)
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[IMRReward(seed=0), Dump(out)])
    trainer.fit(module, datamodule=dm)
    from lightning_vidalign.cli import close_process_group

    close_process_group()  # (as vidalign does at the end of a command)
