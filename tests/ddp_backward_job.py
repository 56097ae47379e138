"""Accumulating backward passes under DDP (2 CPU processes): ``backward_pass(loss, last=False)`` skips
the gradient sync and the final pass all-reduces the *accumulated* gradient.

Each rank r takes two backward passes of ``c·sum(adapter params)`` with c = (r + 1) then 10·(r + 1);
the synced gradient of every adapter element must be the mean over ranks of the sum,
(1 + 10 + 2 + 20)/2 = 16.5. Run by tests/test_distributed.py as ``python ddp_backward_job.py OUT``.
"""
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import lightning as L
import torch

from lightning_vidalign.algorithms import SFT
from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.datamodules import VideoClipDataModule


class TwoPasses(SFT):
    def training_step(self, batch, batch_idx):
        params = self.backbone.trainable_parameters()
        c = float(self.global_rank + 1)
        self.optimizers().zero_grad(set_to_none=True)
        self.backward_pass(c * sum(p.sum() for p in params), last=False)
        local_after_first = params[0].grad.detach().clone()
        self.backward_pass(10 * c * sum(p.sum() for p in params), last=True)
        torch.save({"first": local_after_first, "synced": [p.grad.detach().clone() for p in params]}, f"{sys.argv[1]}/rank{self.global_rank}.pt")
        self.optimizers().zero_grad(set_to_none=True)
        return None


if __name__ == "__main__":
    dm = VideoClipDataModule(batch_size=1, shot_detector="histogram")
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(TwoPasses(SVDBackbone(lora_rank=2, lora_alpha=2)), datamodule=dm)
    from lightning_vidalign.cli import close_process_group

    close_process_group()  # (as vidalign does at the end of a command)
