"""Resume safety (issue 20): what a checkpoint belongs to, atomic writes, named corrupt files.

- :func:`run_identity` records what a checkpoint belongs to (module, backbone, LoRA, data settings that
  change a step, world size, package version); ``VideoAlignModule.on_save_checkpoint`` stores it under
  ``checkpoint["vidalign"]["identity"]`` and ``on_load_checkpoint`` compares it with the current run
  (:func:`check_identity`), refusing a mismatch with :class:`CheckpointMismatchError`.
- :func:`load_adapter_weights` starts a *new* run from a checkpoint's adapter weights only
  (``VideoAlignModule(init_adapter_from=...)``: fresh optimizer, step 0).
- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target's folder, fsyncs
  it and renames it over the target, so a writer killed mid-write leaves the previous file intact.
- :func:`load_checkpoint_file` / :class:`CorruptCheckpointError`: an unreadable checkpoint is named with
  its path and the newest intact checkpoint of its folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import zipfile
from typing import Any, Callable, Iterator

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

Identity = dict[str, Any]

#: fields whose difference only warns (our choice): a moved or staged copy of the same base weights
#: (``backbone.weights`` decides whether the base is the same), and a package upgrade mid-run.
WARN_FIELDS = ("backbone.pretrained_path", "version")

#: fields that define what the adapter tensors mean: compared when only adapters are loaded
#: (:func:`load_adapter_weights`, and ``--ckpt_path`` in ``validate``/``test``/``predict``).
ADAPTER_FIELDS = ("backbone", "backbone.mode", "backbone.finetune", "lora.rank", "lora.alpha", "lora.target_modules")

#: datamodule attributes recorded as ``data.<name>`` (those that change what a training step means)
DATA_FIELDS = ("num_frames", "fps", "height", "width", "batch_size")

#: module attributes recorded as ``algo.<name>`` (group size and the passes/minibatches of a round)
ALGO_FIELDS = ("rollouts_per_condition", "passes", "minibatches_per_round")

#: suffix pattern of the temporary files :class:`AtomicCheckpointIO` writes (``<target>.tmp-<pid>``)
TMP_PATTERN = re.compile(r"\.tmp-(\d+)$")


def _qualname(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def base_weights_fingerprint(backbone: torch.nn.Module, samples: int = 8) -> str:
    """Short content hash of a backbone's base (non-adapter) weights, independent of where they were loaded from.

    Hashes, for every entry of ``backbone.state_dict()`` whose name holds no ``lora_``, its name, shape,
    dtype and its first and last ``samples`` values (as float64). Cheap at any model size (a few values per
    tensor), and it tells apart two bases of the same architecture (a random ``tiny`` init vs the
    ``demo:svd_tiny`` base, a fine-tuned variant: every weight moves). Call it on freshly built weights
    (``VideoAlignModule.__init__`` does, before sharding or training).

    Returns:
        16 hexadecimal characters (first 64 bits of a SHA-256). Source: our choice.
    """
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        if "lora_" in name or not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().reshape(-1)
        head = torch.cat([flat[:samples], flat[-samples:]]) if flat.numel() > 2 * samples else flat
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(head.to(device="cpu", dtype=torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_identity(module, trainer=None) -> Identity:
    """What a checkpoint of ``module`` (trained by ``trainer``) belongs to: a flat ``{field: str | int | float}``.

    Fields (those that exist for this module, backbone and datamodule; source: our choice):

    - ``module``: qualified class name of the LightningModule (``...algorithms.sft.SFT``).
    - ``backbone``: qualified class name of the backbone; ``backbone.mode`` (Wan: ``t2v``/``ti2v``).
    - ``backbone.weights``: :func:`base_weights_fingerprint` of the base weights as built (``tiny``, a demo
      base, a local checkpoint: same path, other content → another value).
    - ``backbone.pretrained_path``: as configured (a difference alone only warns: a moved or staged copy).
    - ``backbone.finetune``: ``lora`` / ``full`` (``+vae`` when the VAE trains too).
    - ``lora.rank``, ``lora.alpha``, ``lora.target_modules``: the peft LoRA config (``finetune: lora`` only).
    - ``data.num_frames``, ``data.fps``, ``data.height``, ``data.width``, ``data.batch_size``: from
      ``trainer.datamodule`` (per-rank batch size).
    - ``algo.rollouts_per_condition`` (group size G), ``algo.passes`` (SHIFT K),
      ``algo.minibatches_per_round`` (GRPO): where the module has them.
    - ``world_size``: number of processes (data sharding, per-rank rollout buffers).
    - ``sequence_parallel_size``: when > 1 (the data is sharded over ``world_size / sequence_parallel_size`` ranks).
    - ``version``: ``lightning_vidalign.__version__`` (a difference only warns: upgrading mid-run is allowed).

    Args:
        module: a ``VideoAlignModule`` (needs ``module.backbone``).
        trainer: the Lightning trainer, or None (no data fields; world size 1).

    Returns:
        The identity dict (JSON-serialisable values).
    """
    import lightning_vidalign

    backbone = module.backbone
    ident: Identity = {"module": _qualname(module), "backbone": _qualname(backbone)}
    if getattr(backbone, "mode", None) is not None:
        ident["backbone.mode"] = str(backbone.mode)
    fingerprint = getattr(module, "_base_fingerprint", None) or base_weights_fingerprint(backbone)
    ident["backbone.weights"] = fingerprint
    if getattr(backbone, "pretrained_path", None) is not None:
        ident["backbone.pretrained_path"] = str(backbone.pretrained_path)
    finetune = getattr(backbone, "finetune", "lora")
    ident["backbone.finetune"] = finetune + ("+vae" if getattr(backbone, "train_vae", False) else "")
    lora = getattr(backbone, "lora_config", None)
    if lora is not None:
        targets = lora.target_modules
        ident["lora.rank"] = int(lora.r)
        ident["lora.alpha"] = float(lora.lora_alpha)
        ident["lora.target_modules"] = targets if isinstance(targets, str) else ",".join(sorted(targets))
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    for name in DATA_FIELDS:
        if dm is not None and getattr(dm, name, None) is not None:
            ident[f"data.{name}"] = getattr(dm, name)
    for name in ALGO_FIELDS:
        if getattr(module, name, None) is not None:
            ident[f"algo.{name}"] = int(getattr(module, name))
    ident["world_size"] = int(trainer.world_size) if trainer is not None else 1
    if int(getattr(module, "sequence_parallel_size", 1) or 1) > 1:  # (absent at 1: identities of earlier runs unchanged)
        ident["sequence_parallel_size"] = int(module.sequence_parallel_size)
    ident["version"] = lightning_vidalign.__version__
    return ident


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another method or configuration than the current run (message: each differing
    field ``name: checkpoint value → current value``, the checkpoint's path and the adapter-only option)."""


def compare_identities(saved: Identity, current: Identity, fields: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's identity and the current run's.

    Every field of either side is compared; one side's missing field shows as ``<absent>`` (e.g. SFT has no
    ``algo.rollouts_per_condition``). (A field added by a later version must be skipped here when ``saved``
    lacks it, so that older checkpoints stay resumable.)

    Args:
        saved: the checkpoint's identity. current: the current run's (:func:`run_identity`).
        fields: compare only these (None: every field of ``saved``).

    Returns:
        ``(refused, warned)``: lines ``"name: old → new"``; ``warned`` holds the :data:`WARN_FIELDS`.
    """
    refused, warned = [], []
    for name in list(saved) + [n for n in current if n not in saved]:
        if fields is not None and name not in fields:
            continue
        old, new = saved.get(name, "<absent>"), current.get(name, "<absent>")
        if old == new:
            continue
        (warned if name in WARN_FIELDS else refused).append(f"{name}: {old} → {new}")
    return refused, warned


def check_identity(checkpoint: dict, current: Identity, path: str | None, adapters_only: bool = False) -> None:
    """Refuse a checkpoint of another run; warn on :data:`WARN_FIELDS` differences; warn on a checkpoint
    written without identity (before lightning-vidalign recorded it) and continue.

    Args:
        checkpoint: the loaded checkpoint dict.
        current: the current run's identity (:func:`run_identity`).
        path: the checkpoint's path (for the messages).
        adapters_only: compare :data:`ADAPTER_FIELDS` only (the adapters are loaded, not the run's state:
            ``validate``/``test``/``predict``, :func:`load_adapter_weights`); differences in
            ``backbone.weights`` then only warn (adapters moved to another base on purpose).

    Raises:
        CheckpointMismatchError: listing every differing field ``name: checkpoint → current``.
    """
    saved = (checkpoint.get("vidalign") or {}).get("identity")
    where = path or "the checkpoint"
    if saved is None:
        log.warning("%s records no run identity (written before lightning-vidalign recorded run identities): "
                    "not checked against this run's method and configuration", where)
        return
    fields = ADAPTER_FIELDS + WARN_FIELDS + ("backbone.weights",) if adapters_only else None
    refused, warned = compare_identities(saved, current, fields)
    if adapters_only:  # another base for the same adapters: allowed, but said
        warned += [r for r in refused if r.startswith("backbone.weights:")]
        refused = [r for r in refused if not r.startswith("backbone.weights:")]
    if not refused:
        if warned:
            log.warning("%s: %s (checkpoint → this run); continuing", where, "; ".join(warned))
        return
    lines = "\n".join([f"  {r}" for r in refused] + [f"  {w}   (alone: a warning)" for w in warned])
    if adapters_only:
        raise CheckpointMismatchError(
            f"{where}: its adapters do not fit this run's backbone; differing fields (checkpoint → this run):\n{lines}"
        )
    raise CheckpointMismatchError(
        f"--ckpt_path {where} belongs to another run: resuming from it would continue a different experiment. "
        f"Differing fields (checkpoint → this run):\n{lines}\n"
        f"To start a new run from its adapter weights only (fresh optimizer, step 0), drop --ckpt_path and pass "
        f"--model.init_args.init_adapter_from {where}"
    )


# ---------------------------------------------------------------- corrupt files
class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated or unreadable (message: its path and the newest intact checkpoint of its folder)."""


def is_intact_checkpoint(path: str) -> bool:
    """True if ``path`` is a complete ``torch.save`` zip archive whose members all pass their CRC check.

    Reads the whole file (``zipfile.ZipFile.testzip``); meant for the error path, not every load.
    """
    try:
        if not os.path.isfile(path) or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except Exception:  # noqa: BLE001 - any failure to read the archive means "not intact"
        return False


def newest_intact_checkpoint(folder: str, exclude: str | None = None) -> str | None:
    """The most recently modified intact ``*.ckpt`` file of ``folder`` (temporary ``*.tmp-<pid>`` files and
    ``exclude`` never count), or None."""
    if not os.path.isdir(folder):
        return None
    skip = os.path.abspath(exclude) if exclude else None
    names = [n for n in os.listdir(folder) if n.endswith(".ckpt") and not TMP_PATTERN.search(n)]
    paths = [os.path.join(folder, n) for n in names if os.path.abspath(os.path.join(folder, n)) != skip]
    for p in sorted((p for p in paths if os.path.isfile(p)), key=os.path.getmtime, reverse=True):
        if is_intact_checkpoint(p):
            return p
    return None


def corrupt_checkpoint_error(path: str, cause: BaseException) -> CorruptCheckpointError:
    """The :class:`CorruptCheckpointError` for ``path``: names it, the reader's complaint and the newest intact
    checkpoint of its folder (or says there is none)."""
    path = os.path.abspath(str(path))
    folder = os.path.dirname(path)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    fallback = newest_intact_checkpoint(folder, exclude=path)
    hint = (f"The newest intact checkpoint in {folder} is {fallback}: resume with --ckpt_path {fallback}"
            if fallback else f"There is no intact checkpoint in {folder} to fall back to.")
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return CorruptCheckpointError(f"checkpoint {path} ({size} bytes) is truncated or corrupt ({reason}). {hint}")


@contextlib.contextmanager
def naming_corrupt_checkpoint(path) -> Iterator[None]:
    """Context manager: an error raised while reading ``path`` becomes a :class:`CorruptCheckpointError` naming
    it when the file is not an intact archive (any other error, e.g. a missing class in a readable file, passes)."""
    try:
        yield
    except CorruptCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unchanged unless the file itself is broken
        local = isinstance(path, (str, os.PathLike)) and "://" not in str(path)
        if local and os.path.isfile(path) and not is_intact_checkpoint(str(path)):
            raise corrupt_checkpoint_error(str(path), e) from e
        raise


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=False)`` with a truncated/corrupt file named (:class:`CorruptCheckpointError`).

    Raises:
        FileNotFoundError: naming a missing file. CorruptCheckpointError: see :func:`corrupt_checkpoint_error`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with naming_corrupt_checkpoint(path):
        return torch.load(path, map_location=map_location, weights_only=False)


# ---------------------------------------------------------------- atomic writes
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete ``*.tmp-<pid>`` files of ``folder`` left by a killed writer: those whose process no longer runs on
    this host (another live writer's file is kept), and those named with this process's own PID — a killed
    process whose PID was reused (containers restart with small PIDs): called before a save, when this
    process writes nothing (its saves are sequential). Returns the removed paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = TMP_PATTERN.search(name)
        if not m or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    if removed:
        log.info("removed %d unfinished checkpoint file(s) of a killed writer: %s", len(removed), ", ".join(removed))
    return removed


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose saves are atomic on a local file system, and whose loads name a corrupt file.

    ``save_checkpoint(checkpoint, path)``: :meth:`write` into ``<path>.tmp-<pid>`` in the same folder, flush and
    ``fsync`` it, ``os.replace`` it over ``path``, ``fsync`` the folder. Until the rename the previous ``path``
    (e.g. ``last.ckpt``) is untouched, so a process killed mid-write (SIGKILL after a SLURM grace period,
    the OOM killer) leaves the previous checkpoint intact. Leftover ``*.tmp-<pid>`` files are not ``*.ckpt``
    files (Lightning's ``--ckpt_path last`` never picks them) and are deleted at the next save in their folder
    (:func:`remove_stale_temporaries`). Remote paths (``s3://...``) keep Lightning's transactional write.

    ``load_checkpoint(path)``: Lightning's load; a truncated or corrupt file raises
    :class:`CorruptCheckpointError` naming it and the newest intact checkpoint of its folder.

    Installed by ``VideoAlignModule.setup`` in place of Lightning's default ``TorchCheckpointIO`` (a
    ``CheckpointIO`` given in ``trainer.plugins`` is kept; not under DeepSpeed, which writes its folders itself). Covers every file written through the strategy's
    ``CheckpointIO``: single device, DDP, FSDP2 with consolidated checkpoints (``save_distributed_checkpoint:
    false``, our default). Not covered: FSDP2's distributed checkpoint folders and DeepSpeed's checkpoint
    folders (written by torch.distributed.checkpoint / DeepSpeed directly, in place), and the symlink of
    ``ModelCheckpoint(save_last="link")`` (the shipped configs use ``save_last: true``, a full write).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = os.fspath(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(folder)

    def write(self, checkpoint: dict[str, Any], f) -> None:
        """Serialise ``checkpoint`` into the open binary file ``f`` (``torch.save``); the one place a subclass
        changes how bytes are written (the tests slow it down to kill a writer mid-write)."""
        torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        with naming_corrupt_checkpoint(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def use_atomic_checkpoint_io(strategy) -> bool:
    """Put an :class:`AtomicCheckpointIO` in place of the strategy's ``CheckpointIO`` when that is Lightning's
    default ``TorchCheckpointIO`` (a user's own ``CheckpointIO`` is kept). Returns whether it is now atomic."""
    io = strategy.checkpoint_io
    if isinstance(io, AtomicCheckpointIO):
        return True
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    log.info("checkpoint IO %s kept (not lightning_vidalign's AtomicCheckpointIO): writes are atomic only if it makes them so", type(io).__name__)
    return False


# ---------------------------------------------------------------- adapter-only init
def load_adapter_weights(module, path: str, announce: bool = True) -> dict[str, Any]:
    """Load only the trainable (adapter) tensors of the checkpoint at ``path`` into ``module.backbone``.

    For a *new* run started from another run's adapters ("SFT then SHIFT"): nothing else is read (no optimizer,
    step, buffers, reward models), so the run starts at step 0 with a fresh optimizer. The checkpoint's
    identity must agree on :data:`ADAPTER_FIELDS` (backbone class and mode, fine-tuning mode, LoRA rank, alpha,
    target modules); the base weights may differ (warned), the method and data settings may differ freely.

    Args:
        module: a ``VideoAlignModule`` whose backbone is built (adapters injected).
        path: a checkpoint file written by a ``VideoAlignModule`` (a consolidated file; not a distributed
            checkpoint folder).
        announce: log what was loaded as the start of a new run (``vidalign export`` says its own line).

    Returns:
        ``{"tensors": int, "parameters": int, "module": str | None, "global_step": int | None}`` of what was loaded.

    Raises:
        FileNotFoundError, CorruptCheckpointError: from :func:`load_checkpoint_file` (a folder is refused too).
        CheckpointMismatchError: on differing adapter fields, or on missing/extra adapter keys or shape
            mismatches (each named).
    """
    if os.path.isdir(path):
        raise FileNotFoundError(f"init_adapter_from={path!r} is a folder (a distributed checkpoint?); give a consolidated checkpoint file")
    checkpoint = load_checkpoint_file(path)
    check_identity(checkpoint, run_identity(module), path, adapters_only=True)
    own = module.backbone.trainable_state_dict()
    source = {k[len("backbone."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("backbone.")}
    missing = sorted(set(own) - set(source))
    extra = sorted(k for k in set(source) - set(own) if "lora_" in k or module.backbone.finetune == "full")
    shapes = sorted(f"{k}: {tuple(source[k].shape)} → {tuple(own[k].shape)}" for k in set(own) & set(source) if source[k].shape != own[k].shape)
    if missing or extra or shapes:
        parts = [f"{len(missing)} missing, e.g. {missing[:3]}" if missing else "", f"{len(extra)} not in this backbone, e.g. {extra[:3]}" if extra else "",
                 f"{len(shapes)} of another shape (checkpoint → this run), e.g. {shapes[:3]}" if shapes else ""]
        raise CheckpointMismatchError(f"{path}: its adapter tensors do not fit this run's backbone: " + "; ".join(p for p in parts if p))
    params = dict(module.backbone.named_parameters())
    with torch.no_grad():
        for k, v in own.items():
            target = params[k] if k in params else v
            target.copy_(source[k].to(dtype=target.dtype, device=target.device))
    saved = (checkpoint.get("vidalign") or {}).get("identity") or {}
    info = {"tensors": len(own), "parameters": int(sum(v.numel() for v in own.values())), "module": saved.get("module"),
            "global_step": checkpoint.get("global_step")}
    if not announce:
        return info
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"init_adapter_from {path}: loaded {info['tensors']} adapter tensors ({info['parameters']} parameters) of a "
                   f"{info['module'] or '(unrecorded)'} checkpoint at step {info['global_step']}; new run: fresh optimizer, step 0")
    return info


__all__ = [
    "AtomicCheckpointIO", "CheckpointMismatchError", "CorruptCheckpointError", "base_weights_fingerprint", "check_identity",
    "compare_identities", "is_intact_checkpoint", "load_adapter_weights", "load_checkpoint_file", "newest_intact_checkpoint",
    "remove_stale_temporaries", "run_identity", "use_atomic_checkpoint_io",
]
