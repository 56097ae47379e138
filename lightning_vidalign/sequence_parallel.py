"""Ulysses sequence parallelism for the Wan DiT through diffusers' own context parallelism (issue 24, item 1), wired
into training by ``VideoAlignModule(sequence_parallel_size=s)``.

diffusers 0.42 ships it: ``ModelMixin.enable_parallelism(config=ContextParallelConfig(ulysses_degree=s))`` installs
hooks from the model class's ``_cp_plan`` (``WanTransformer3DModel``: split the patch tokens and the rope tables on
the sequence dimension at the first block, gather the output at ``proj_out``; the text tokens stay whole) and runs
attention with ``TemplatedUlyssesAttention`` (all-to-all from sequence shards to head shards around attention, and
back; its own backward) for the attention backends that declare ``supports_context_parallel`` (``native`` SDPA
included, so it runs on CPU with gloo). We chose it over ``yunchang`` (the Ulysses/ring package of xDiT) because it
is the library the backbones already use, it knows each model's split plan, and it needs no attention-processor
replacement; yunchang (USP: Ulysses + ring attention as attention modules over process groups it is given, its
ring part built on ring-flash-attention) would need our own attention processors and split/gather hooks per model.

Layout in training (our choice, as torchtitan's ``dp_shard × cp``): the ``W`` processes form a device mesh
``(data, ring, ulysses) = (W/s, 1, s)`` (:func:`sequence_parallel_mesh`; diffusers needs the size-1 ``ring`` dimension),
so the ``s`` consecutive ranks ``d·s … d·s + s - 1`` are the sequence-parallel group of data-parallel rank ``d``
(on a GPU node, an SP group stays inside the node when ``s`` divides the GPUs per node). The ranks of a group get
the same batch (the samplers shard over data-parallel ranks, :func:`data_parallel_layout`), the same generators
(seeded by the data-parallel rank), hence the same noise, timesteps, rollouts and conditions; each computes the
same full loss, whose backward gives the gradient of its own token shard only (the split's and the gather's
backwards keep the local chunk).

Gradients: the gradient of the clip is the **sum** over the group of the shards' gradients; across data-parallel
groups it is the mean. DDP and FSDP2 (sharded over all ``W`` ranks) both **average** over the ``W`` ranks, i.e.
``(1/W)·Σ = (1/s)·(the wanted gradient)``; ``VideoAlignModule.backward_pass`` therefore back-propagates ``s·loss``,
which gives exactly ``mean_data Σ_sequence`` after the strategy's reduction, whatever the strategy (DDP, FSDP2).
Outside a strategy (the backbone-level tests) :func:`sequence_parallel_grads` sums over the group instead.
Measured on the tiny Wan with 2 gloo processes (``tests/test_sequence_parallel.py``): identical losses and
rollouts, LoRA gradients within 1.5e-6 relative of one process, also with activation checkpointing and with FSDP2
on top (SFT, GRPO; DPO's decoupled step 1.4e-4, a difference of ~50x larger terms).

HunyuanVideo 1.5: diffusers 0.42 has no ``_cp_plan`` for ``HunyuanVideo15Transformer3DModel``; ``HunyuanVideo15Backbone``
supplies ours (:func:`lightning_vidalign.backbones.hunyuan_video15.hunyuan15_cp_plan`: video *and* text tokens split,
a key-mask attention processor), measured equal to one process (``tests/test_sequence_parallel.py``).

Limits (diffusers 0.42): the SVD UNet has no plan (refused); the token count ``T'·h·w/(p_t·p_h·p_w)`` and the head
count must be divisible by ``s`` (checked, with the setting named; HunyuanVideo 1.5's text is padded with masked
tokens to a multiple of ``s``); ``enable_parallelism`` assumes an accelerator: it takes
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


SETTING = "--model.init_args.sequence_parallel_size"


def data_parallel_layout(world_size: int, sequence_parallel_size: int) -> int:
    """The data-parallel size ``W / s`` of ``world_size`` processes in groups of ``sequence_parallel_size``.

    Raises:
        ValueError: ``s < 1``, or ``s`` not dividing ``W`` (naming the setting and both values).
    """
    s = int(sequence_parallel_size)
    if s < 1:
        raise ValueError(f"sequence_parallel_size must be >= 1, got {sequence_parallel_size}")
    if world_size % s:
        raise ValueError(f"sequence_parallel_size={s} does not divide the world size {world_size} (trainer.num_nodes x trainer.devices): "
                         f"set {SETTING} to a divisor of {world_size}, or run on a multiple of {s} processes")
    return world_size // s


def check_divisible(what: str, count: int, size: int) -> None:
    """Raise ``ValueError`` unless ``count`` (of ``what``, e.g. "attention heads") is divisible by the
    sequence-parallel size ``size`` (Ulysses splits the tokens, then the heads, evenly over the group)."""
    if size > 1 and count % size:
        raise ValueError(f"sequence_parallel_size={size} must divide the number of {what}, {count}: set {SETTING} to a divisor of {count}")


def sequence_parallel_mesh(world_size: int, size: int, device_type: str | None = None):
    """The ``(data, ring, ulysses) = (W/s, 1, s)`` device mesh of every process (collective: all ranks call it).

    ``mesh["ulysses"]`` is this rank's sequence-parallel group (``s`` consecutive ranks), ``mesh["data"]`` the ranks
    holding the same token shard of different clips. Pass it to :func:`enable_sequence_parallel`.
    """
    from torch.distributed.device_mesh import init_device_mesh

    dp = data_parallel_layout(world_size, size)
    device_type = device_type or torch._C._get_accelerator().type
    return init_device_mesh(device_type, (dp, 1, size), mesh_dim_names=("data", "ring", "ulysses"))


def enable_sequence_parallel(model: torch.nn.Module, size: int, mesh=None, cp_plan: dict | None = None) -> None:
    """Ulysses sequence parallelism of degree ``size`` for a diffusers transformer with a ``_cp_plan``.

    Sets the ``native`` (SDPA) attention backend and calls ``model.enable_parallelism`` with
    ``ContextParallelConfig(ulysses_degree=size, mesh=mesh)``. Every rank of the group must then call the model with
    the same full inputs (same clip, noise, timestep, text); the output comes back whole on every rank.

    Args:
        model: e.g. ``WanTransformer3DModel`` (after LoRA is added).
        size: ranks in the sequence-parallel group (the whole default process group when ``mesh`` is None).
        cp_plan: a context-parallel plan to use instead of the class's ``_cp_plan`` (diffusers' ``enable_parallelism``
            argument; e.g. :func:`lightning_vidalign.backbones.hunyuan_video15.hunyuan15_cp_plan`).
        mesh: an optional diffusers-style device mesh with dims ``("ring", "ulysses")`` (and others, e.g.
            :func:`sequence_parallel_mesh`'s ``data``); None: a ``(1, size)`` mesh over the whole default group.

    Raises:
        ValueError: for a model class without a context-parallel plan, or ``size < 2``.
        RuntimeError: diffusers', if ``torch.distributed`` is not initialised.
    """
    from diffusers import ContextParallelConfig

    if size < 2:
        raise ValueError(f"enable_sequence_parallel: size must be >= 2, got {size}")
    if not (cp_plan or getattr(type(model), "_cp_plan", None)):
        raise ValueError(f"{type(model).__name__} has no diffusers context-parallel plan (_cp_plan); sequence parallelism is not available for it")
    model.set_attention_backend("native")
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # ("`enable_parallelism` is an experimental feature", once per model)
    try:
        with _cpu_device_count():
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=size, mesh=mesh), cp_plan=cp_plan)
    finally:
        diffusers_logging.set_verbosity(level)


def sequence_parallel_grads(params, group=None) -> None:
    """Sum the gradients of ``params`` over the sequence-parallel ``group`` (each rank holds its shard's part)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=group)
