"""Ulysses SP = N vs SP = 1 on the tiny Wan (t2v), N gloo CPU processes: run by tests/test_sequence_parallel.py as
``python sequence_parallel_job.py OUT_DIR [N]``. Each rank first computes the single-process reference (its own
full copy: SP = 1), then enables sequence parallelism on the same backbone and repeats: training loss, LoRA
gradients (summed over the group), a flow-GRPO SDE rollout from the same generator, then the loss and gradients
again with activation checkpointing on as well, then with FSDP2 on top (over the same ranks): the SFT loss, a
GRPO step loss and a DPO decoupled step (tests/activation_steps.py) against their SP = 1 gradients. Writes ``rank{r}.pt``."""
import os
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/activation_steps.py

from activation_steps import denoising_step, prepare_dpo, prepare_grpo, sde_rollout
from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.sequence_parallel import enable_sequence_parallel, sequence_parallel_grads


def run(rank, world, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("SP_PORT", "29541"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    bb = WanBackbone(lora_rank=4, lora_alpha=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cond = bb.encode_condition({"caption": ["a red car drives along a coastal road", "two people ride bikes in a park"]})
    x0 = torch.randn(2, 3, 8, 16, 16, generator=g)  # (B, T', C, h, w): 9 frames, 64x64 -> 3 x 8 x (16 x 16), 192 tokens
    noise, sigma = torch.randn(x0.shape, generator=g), torch.tensor([0.8, 0.3])
    loss_ref, params = denoising_step(bb, x0, cond, sigma, noise)
    grads_ref = [p.grad.clone() for p in params]
    with torch.no_grad():
        lat_ref, lp_ref = sde_rollout(bb, cond, 64)
    video = torch.rand(2, 9, 3, 64, 64, generator=g)
    steps = {"grpo": prepare_grpo(bb, {"video": video, "caption": ["a red car drives", "two people ride bikes"]})[0],
             "dpo": prepare_dpo(bb, {"video": video, "caption": ["a red car drives", "two people ride bikes"]})[0]}
    steps_ref = {k: run() for k, run in steps.items()}  # SP = 1 gradients of a GRPO step loss and a DPO decoupled step
    enable_sequence_parallel(bb.transformer, world)
    loss_sp, params = denoising_step(bb, x0, cond, sigma, noise)
    sequence_parallel_grads(params)
    grads_sp = [p.grad.clone() for p in params]
    with torch.no_grad():
        lat_sp, lp_sp = sde_rollout(bb, cond, 64)
    bb.set_activation_checkpointing(True)  # SP + activation checkpointing: the recomputed blocks run the all-to-alls again
    loss_ac, params = denoising_step(bb, x0, cond, sigma, noise)
    sequence_parallel_grads(params)
    grads_ac = [p.grad.clone() for p in params]
    # + FSDP2 over the same ranks (the SP group is the FSDP group here): FSDP2 averages the shards' gradients over
    # the ranks, so the group's sum is world x the reduced gradient
    for block in bb.transformer.blocks:
        fully_shard(block)
    fully_shard(bb.transformer)
    fsdp = {"sft": denoising_step(bb, x0, cond, sigma, noise)[1]}
    fsdp["sft"] = [world * p.grad.full_tensor() for p in fsdp["sft"]]
    for k, run in steps.items():
        fsdp[k] = [world * gr.full_tensor() for gr in run()]
    torch.save({"loss": (loss_ref, loss_sp), "grads": (grads_ref, grads_sp), "loss_ac": loss_ac, "grads_ac": grads_ac,
                "fsdp": fsdp, "steps_ref": steps_ref, "latents": (lat_ref, lat_sp),
                "log_prob": (lp_ref, lp_sp)}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, world = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    mp.spawn(run, args=(world, out_dir), nprocs=world)
