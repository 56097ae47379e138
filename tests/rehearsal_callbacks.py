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


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


class DumpFirstStep(L.Callback):
    """Each rank writes ``first_step_rank{r}.pt`` to ``out``: the trainable parameters' gradients at the first optimizer
    step (after the strategy's reduction and any clipping; FSDP2 shards gathered), the first batch's returned loss and,
    for GRPO, its decoded rollouts and rewards."""

    def __init__(self, out: str):
        self.out, self.state = out, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if "grads" not in self.state:
            names = dict(pl_module.backbone.named_parameters())
            self.state["grads"] = {k: _full(p.grad) for k, p in names.items() if p.requires_grad and p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "loss" in self.state:
            return
        self.state["loss"] = float(outputs["loss"]) if isinstance(outputs, dict) and "loss" in outputs else None
        if getattr(pl_module, "rollouts", None) is not None:  # the GRPO family's round record (kept without its trajectory)
            self.state["videos"] = pl_module.rollouts.videos.detach().cpu().clone()
        self.state["index"] = batch["index"].cpu().clone() if "index" in batch else None
        self.state["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    def on_fit_end(self, trainer, pl_module):
        os.makedirs(self.out, exist_ok=True)
        torch.save({**self.state, "world_size": trainer.world_size}, os.path.join(self.out, f"first_step_rank{trainer.global_rank}.pt"))
