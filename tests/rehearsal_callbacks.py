"""Callbacks the CLI tests append with ``--trainer.callbacks+=rehearsal_callbacks.DumpAdapters`` (the tests put
this folder on PYTHONPATH): each rank writes its full adapter weights and batch count at the end of fit."""
import os

import lightning as L
import torch


class DumpAdapters(L.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        lora = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in pl_module.backbone.trainable_state_dict().items()}
        sharded = any(hasattr(p, "full_tensor") for p in pl_module.backbone.parameters())
        os.makedirs(self.out, exist_ok=True)
        torch.save({"lora": lora, "batches": pl_module.batches_seen, "global_step": trainer.global_step, "sharded": sharded,
                    "world_size": trainer.world_size}, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))
