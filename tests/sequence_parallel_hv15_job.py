"""Ulysses SP = 2 vs SP = 1 on the tiny HunyuanVideo 1.5 (t2v and i2v) with our context-parallel plan
(lightning_vidalign.backbones.hunyuan_video15.hunyuan15_cp_plan), 2 gloo CPU processes: run by
tests/test_sequence_parallel.py as ``python sequence_parallel_hv15_job.py OUT_DIR``. Each rank computes the
single-process reference (its own full copy) of the flow-matching loss, its LoRA gradients and an SDE rollout with
CFG, then enables sequence parallelism on the same backbone and repeats (gradients summed over the group), then
again with activation checkpointing. Writes ``rank{r}.pt``."""
import os
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/activation_steps.py

from activation_steps import denoising_step, perturb_lora, sde_rollout
from lightning_vidalign.backbones import HunyuanVideo15Backbone
from lightning_vidalign.sequence_parallel import sequence_parallel_grads


def run(rank, world, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("SP_PORT", "29543"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for mode in ("t2v", "i2v"):
        bb = HunyuanVideo15Backbone(mode=mode, lora_rank=4, lora_alpha=4)
        perturb_lora(bb, 1)
        g = torch.Generator().manual_seed(1)
        batch = {"caption": ["a red car drives along a coastal road", "two people ride bikes"]}
        if mode == "i2v":
            batch["first_frame"] = torch.rand(2, 3, 32, 32, generator=g)
        cond = bb.encode_condition(batch)
        x0 = torch.randn(2, 3, 8, 8, 8, generator=g)  # (B, T', C, h, w): 9 frames, 32x32 -> 3 x 8 x 8 tokens
        noise, sigma = torch.randn(x0.shape, generator=g), torch.tensor([0.8, 0.3])
        loss_ref, params = denoising_step(bb, x0, cond, sigma, noise)
        ref = (loss_ref, [p.grad.clone() for p in params])
        with torch.no_grad():
            ref_roll = sde_rollout(bb, cond, 32)
        bb.enable_sequence_parallel(world)
        loss, params = denoising_step(bb, x0, cond, sigma, noise)
        sequence_parallel_grads(params)
        grads = [p.grad.clone() for p in params]
        with torch.no_grad():
            roll = sde_rollout(bb, cond, 32)
        bb.set_activation_checkpointing(True)
        loss_ac, params = denoising_step(bb, x0, cond, sigma, noise)
        sequence_parallel_grads(params)
        results[mode] = {"loss": (ref[0], loss, loss_ac), "grads": (ref[1], grads, [p.grad.clone() for p in params]),
                         "latents": (ref_roll[0], roll[0]), "log_prob": (ref_roll[1], roll[1])}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1]), nprocs=2)
