"""Benchmark: peak saved activations of one SFT, GRPO and DPO (decoupled) step with and without activation
checkpointing, on the tiny SVD, the tiny two-expert Wan (2 blocks per expert, and 8 blocks) and the tiny
HunyuanVideo 1.5.

Run: ``OMP_NUM_THREADS=1 python -m pytest -m bench tests/benchmarks/test_activation_memory.py -s``. Writes
``runs/bench/activation_memory.json``.

Memory method: :class:`lightning_vidalign.utils.SavedActivationTracker` (peak bytes of the tensors autograd keeps
for backward, per distinct storage; parameters, buffers and the step's inputs excluded) around the step of
``tests/activation_steps.py`` (forward + backward). With checkpointing, torch's non-reentrant checkpoint saves each
block's inputs through the tracker's hooks (counted) but keeps the tensors of a block recomputed in backward
under its own inner hooks, which the tracker does not see. We therefore report the tracker's peak and
``peak + max_block``, where ``max_block`` is the largest number of bytes a single checkpointed block saves
(measured in the run without checkpointing, from the tracker's running total before and after each block):
an upper bound of the true peak, since at most one block is recomputed at a time. The ratio quoted is
``(peak_on + max_block) / peak_off``.
"""
import json
import os

import pytest
import torch

from activation_steps import PREPARE, perturb_lora
from lightning_vidalign.backbones import HunyuanVideo15Backbone, SVDBackbone, WanBackbone
from lightning_vidalign.utils import SavedActivationTracker

pytestmark = pytest.mark.bench


def checkpointed_modules(backbone):
    """The modules diffusers runs under ``_gradient_checkpointing_func`` for each family."""
    if isinstance(backbone, SVDBackbone):
        out = []
        for name, m in backbone.unet.named_modules():
            if hasattr(m, "gradient_checkpointing") and hasattr(m, "resnets"):
                out += list(m.resnets)
            if hasattr(m, "gradient_checkpointing") and hasattr(m, "temporal_transformer_blocks"):
                out += list(m.transformer_blocks)
        return out
    if isinstance(backbone, WanBackbone):
        return [b for e in backbone.experts() for b in e.blocks]
    return list(backbone.transformer.transformer_blocks)


def measure(backbone, run, exclude):
    """``(peak bytes, max bytes saved inside one checkpointed module)`` of ``run()`` under the tracker."""
    per_block = []
    tracker = SavedActivationTracker(exclude=exclude)
    start = {}

    def pre(m, *a):
        start[id(m)] = tracker.current_bytes

    def post(m, *a):
        if id(m) in start:
            per_block.append(tracker.current_bytes - start.pop(id(m)))

    hooks = [h for m in checkpointed_modules(backbone) for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    with tracker:
        run()
    for h in hooks:
        h.remove()
    return tracker.peak_bytes, max(per_block, default=0)


BUILDS = {
    "svd (tiny UNet)": (lambda: SVDBackbone(lora_rank=4, lora_alpha=4), ("sft", "dpo")),
    "wan 2 experts x 2 blocks": (lambda: WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=0.875), ("sft", "grpo", "dpo")),
    "wan 2 experts x 8 blocks": (lambda: WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=0.875, tiny_transformer={"num_layers": 8}), ("sft", "grpo", "dpo")),
    "hunyuan15 (2 blocks)": (lambda: HunyuanVideo15Backbone(lora_rank=4, lora_alpha=4), ("sft", "grpo", "dpo")),
}


def test_activation_memory_with_and_without_checkpointing(real_batch, wan_batch):
    report = {"method": __doc__.split("Memory method: ")[1].strip(), "results": {}}
    for name, (build, steps) in BUILDS.items():
        bb = build()
        perturb_lora(bb, 0)
        batch = real_batch if name.startswith("svd") else wan_batch
        for step in steps:
            run, inputs = PREPARE[step](bb, batch)
            exclude = list(bb.parameters()) + list(bb.buffers()) + [t for t in inputs if torch.is_tensor(t)]
            bb.set_activation_checkpointing(False)
            off, block = measure(bb, run, exclude)
            bb.set_activation_checkpointing(True)
            on, _ = measure(bb, run, exclude)
            bb.set_activation_checkpointing(False)
            report["results"][f"{name} / {step}"] = r = {
                "peak_off_MiB": off / 2**20, "peak_on_tracker_MiB": on / 2**20, "max_block_MiB": block / 2**20,
                "ratio_on_over_off": (on + block) / off, "ratio_tracker_only": on / off,
            }
            print(f"{name:26s} {step:4s}: off {r['peak_off_MiB']:8.2f} MiB, on {r['peak_on_tracker_MiB']:8.2f} (+ block {r['max_block_MiB']:.2f}) MiB, "
                  f"ratio {r['ratio_on_over_off']:.3f} (tracker only {r['ratio_tracker_only']:.3f})")
    report["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    os.makedirs("runs/bench", exist_ok=True)
    with open("runs/bench/activation_memory.json", "w") as f:
        json.dump(report, f, indent=2)
    for key, r in report["results"].items():
        assert r["ratio_on_over_off"] < 1.0, key  # checkpointing must save activation memory
