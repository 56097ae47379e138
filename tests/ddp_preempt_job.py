"""SHIFT under DDP (2 CPU processes) with preemption: ``python ddp_preempt_job.py OUT MODE [CKPT]``.

MODE ``full``: 4 batches uninterrupted. ``preempt``: at the start of batch 2 every rank writes its pid
to ``OUT/pid<rank>`` and waits for ``OUT/signalled`` (the test sends SIGUSR1 to rank 1 only, then
writes it); the ranks must agree to stop after batch 2 and save ``OUT/ck/last.ckpt``. ``resume``: from
CKPT to batch 4. Every mode dumps ``OUT/<mode>_rank<r>.pt`` (adapters, discriminator, batches seen).
"""
import os
import sys
import time

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import lightning as L
import torch

from lightning_vidalign.algorithms import SHIFT
from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.preemption import PreemptionCheckpoint
from lightning_vidalign.rewards import IMRReward


class Gate(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.batches_seen == 2:  # (incremented by the module's own batch-start hook, which runs after this one)
            pass
        if pl_module.batches_seen == 1:  # batch 2 is about to run
            with open(f"{self.out}/pid{trainer.global_rank}", "w") as f:
                f.write(str(os.getpid()))
            deadline = time.time() + 120
            while not os.path.exists(f"{self.out}/signalled") and time.time() < deadline:
                time.sleep(0.05)


class Dump(L.Callback):
    def __init__(self, out, mode):
        self.out, self.mode = out, mode

    def on_fit_end(self, trainer, pl_module):
        reward = next(c for c in trainer.callbacks if isinstance(c, IMRReward))
        lora = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in pl_module.backbone.trainable_state_dict().items()}
        state = {"lora": lora, "disc": reward.disc.state_dict(), "batches": pl_module.batches_seen}
        torch.save(state, f"{self.out}/{self.mode}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    dm = VideoClipDataModule(batch_size=2, shot_detector="histogram")
    module = SHIFT(SVDBackbone(lora_rank=4, lora_alpha=4), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3), rollouts_per_condition=2, passes=2,
                   num_inference_steps=3, val_num_videos=0, sampler="euler_ancestral")
    callbacks = [IMRReward(seed=0), Dump(out, mode)]
    if mode == "preempt":
        callbacks += [Gate(out), PreemptionCheckpoint(dirpath=f"{out}/ck")]
    from lightning_vidalign.strategies import FSDP2Strategy

    strategy = "ddp" if os.environ.get("VIDALIGN_TEST_STRATEGY", "ddp") == "ddp" else FSDP2Strategy()
    trainer = L.Trainer(strategy=strategy, devices=2, accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    from lightning_vidalign.cli import close_process_group

    close_process_group()  # (as vidalign does at the end of a command)
