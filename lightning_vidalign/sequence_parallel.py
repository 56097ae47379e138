"""Ulysses sequence parallelism for the Wan DiT through diffusers' own context parallelism (issue 24, item 1; a first
step: backbone level, not yet wired into the Lightning strategies).

diffusers 0.42 ships it: ``ModelMixin.enable_parallelism(config=ContextParallelConfig(ulysses_degree=s))`` installs
hooks from the model class's ``_cp_plan`` (``WanTransformer3DModel``: split the patch tokens and the rope tables on
the sequence dimension at the first block, gather the output at ``proj_out``; the text tokens stay whole) and runs
attention with ``TemplatedUlyssesAttention`` (all-to-all from sequence shards to head shards around attention, and
back; its own backward) for the attention backends that declare ``supports_context_parallel`` (``native`` SDPA
included, so it runs on CPU with gloo). We chose it over ``yunchang`` (the Ulysses/ring package of xDiT) because it
is the library the backbones already use, it knows each model's split plan, and it needs no attention-processor
replacement; yunchang (USP: Ulysses + ring attention as attention modules over process groups it is given, its
ring part built on ring-flash-attention) would need our own attention processors and split/gather hooks per model.

What the caller must do (and :func:`sequence_parallel_grads` does): each rank's backward gives the gradient of its
own token shard only, so the trained parameters' gradients are **summed** over the sequence-parallel group.
Under FSDP2 sharded over the same ranks, FSDP2's reduce-scatter averages instead, so the sum is ``s`` times the
reduced gradient. Measured on the tiny Wan with 2 gloo processes (``tests/test_sequence_parallel.py``): identical
losses and rollouts, LoRA gradients within 1.5e-6 relative of one process, also with activation checkpointing and
with FSDP2 on top (SFT, GRPO; DPO's decoupled step 1.4e-4, a difference of ~50x larger terms).

Limits (diffusers 0.42): ``HunyuanVideo15Transformer3DModel`` has no ``_cp_plan`` (and its per-block dense
attention mask spans the whole sequence); the token count ``T'·h·w/4`` and the head count must be divisible by
``s`` (else ``ulysses_anything``); ``enable_parallelism`` assumes an accelerator: it takes
``rank % torch.accelerator.device_count()``, a division by zero on a CPU-only machine, which
:func:`enable_sequence_parallel` works around by reporting one device during the call only.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _cpu_device_count():
    """``torch.accelerator.device_count()`` reads 1 inside (only where it is 0, i.e. no accelerator): diffusers'
    ``_resolve_parallel_config`` computes ``rank % device_count()`` and picks ``torch.device("cpu", 0)`` then."""
    original = torch.accelerator.device_count
    if original() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_sequence_parallel(model: torch.nn.Module, size: int, mesh=None) -> None:
    """Ulysses sequence parallelism of degree ``size`` for a diffusers transformer with a ``_cp_plan``.

    Sets the ``native`` (SDPA) attention backend and calls ``model.enable_parallelism`` with
    ``ContextParallelConfig(ulysses_degree=size, mesh=mesh)``. Every rank of the group must then call the model with
    the same full inputs (same clip, noise, timestep, text); the output comes back whole on every rank.

    Args:
        model: e.g. ``WanTransformer3DModel`` (after LoRA is added).
        size: ranks in the sequence-parallel group (the whole default process group when ``mesh`` is None).
        mesh: an optional diffusers-style device mesh with dims ``("ring", "ulysses")``.

    Raises:
        ValueError: for a model class without a context-parallel plan, or ``size < 2``.
        RuntimeError: diffusers', if ``torch.distributed`` is not initialised.
    """
    from diffusers import ContextParallelConfig

    if size < 2:
        raise ValueError(f"enable_sequence_parallel: size must be >= 2, got {size}")
    if not getattr(type(model), "_cp_plan", None):
        raise ValueError(f"{type(model).__name__} has no diffusers context-parallel plan (_cp_plan); sequence parallelism is not available for it")
    model.set_attention_backend("native")
    with _cpu_device_count():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=size, mesh=mesh))


def sequence_parallel_grads(params, group=None) -> None:
    """Sum the gradients of ``params`` over the sequence-parallel ``group`` (each rank holds its shard's part)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=group)
