"""``vidalign`` command line: LightningCLI over algorithms and datamodules."""
from __future__ import annotations

import lightning_vidalign  # noqa: F401  (applies the torchvision shim before lightning imports it)

import contextlib
import logging
import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_vidalign.module import VideoAlignModule

# importing registers the classes so configs may use short names (SHIFT, IMRReward, ...)
from lightning_vidalign import algorithms, datamodules, rewards  # noqa: F401,E402
from lightning_vidalign.backbones import SVDBackbone  # noqa: F401,E402


#: placeholder in config strings for the run folder (``trainer.default_root_dir``)
RUN_DIR = "{run_dir}"


def _fill_run_dir(node, run_dir: str):
    """Replace :data:`RUN_DIR` in every string of a parsed config (Namespace / dict / list), in place."""
    items = node.items() if hasattr(node, "items") else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if isinstance(value, str) and RUN_DIR in value:
            node[key] = value.replace(RUN_DIR, run_dir)
        elif hasattr(value, "items") or isinstance(value, list):
            _fill_run_dir(value, run_dir)


class VidAlignCLI(LightningCLI):
    """``vidalign fit|validate|test|predict --config CONFIG``; any ``VideoAlignModule`` subclass
    (``--model my_pkg.MyMethod``) and any ``LightningDataModule``.

    Run folder: ``trainer.default_root_dir`` decides where a run writes. Any config string containing
    ``{run_dir}`` (the shipped configs' logger ``save_dir``, checkpoint ``dirpath``, reward
    ``save_to``) is filled with it, so ``--trainer.default_root_dir runs/my_run`` moves logs,
    checkpoints and exports together, and ``--ckpt_path last`` resolves inside that folder only.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(VideoAlignModule, L.LightningDataModule, *args, **kwargs)

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :class:`~lightning_vidalign.progress.VidAlignProgressBar` in place of
        Lightning's default Rich bar (a progress bar given in the config is kept)."""
        from lightning.pytorch.callbacks import RichProgressBar

        from lightning_vidalign.progress import VidAlignProgressBar

        trainer = super().instantiate_trainer(**kwargs)
        for i, cb in enumerate(trainer.callbacks):
            if type(cb) is RichProgressBar:  # Lightning's default, not one the user configured
                trainer.callbacks[i] = VidAlignProgressBar()
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI reads an explicit ``--ckpt_path FILE`` (for its hyperparameters) before the trainer's
        CheckpointIO does: a truncated or corrupt file is named here too (:class:`~lightning_vidalign.checkpointing.
        CorruptCheckpointError`, with the newest intact checkpoint of its folder), not left to torch's bare error."""
        from lightning_vidalign.checkpointing import naming_corrupt_checkpoint

        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        with naming_corrupt_checkpoint(path) if path else contextlib.nullcontext():
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = config.get("trainer", {}).get("default_root_dir") or os.getcwd()
        _fill_run_dir(config, str(run_dir))


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips (e.g. the litlogger one) from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_console() -> None:
    """Keep the ``vidalign`` console to messages a user acts on (README, "Console"): no Lightning tips,
    no transformers weight-loading bars, no diffusers notes on unused config attributes (diffusers
    logs at error level), no torch ``LeafSpec`` deprecation raised inside Lightning, no advice on
    pre-optimization checkpoints (our modules checkpoint after the batch's optimizer steps on purpose)."""
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # our modules checkpoint the state after the batch's optimizer steps on purpose (resume continues from it)
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps.*")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``vidalign`` console script (``args=None`` reads ``sys.argv``).

    Returns None on purpose: the console-script wrapper calls ``sys.exit(main())``, and any other
    return value would make the process exit with status 1. Use :class:`VidAlignCLI` directly to
    keep the trainer and model in Python.

    The working folder is put first on ``sys.path`` (as ``python -m`` does), so a user's own module
    in the folder the command runs from imports by its dotted name (``--model my_pkg.my_method.MyMethod``).
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    quiet_console()
    argv = sys.argv[1:] if args is None else list(args)
    from lightning_vidalign.checkpointing import CheckpointMismatchError, CorruptCheckpointError

    try:
        if argv[:1] == ["export"]:
            export(argv[1:])
            return
        VidAlignCLI(args=args)
    except (CheckpointMismatchError, CorruptCheckpointError) as e:
        # a refusal with its own full explanation: the message, without Lightning's traceback
        print(f"vidalign: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def export(args: list[str]) -> str:
    """``vidalign export --config CONFIG [--config ...] --ckpt_path FILE|last [--merged [--dtype DTYPE]] [--output DIR]
    [other overrides]``: write a checkpoint's policy for diffusers, on one CPU process whatever the run's strategy
    (``last``: ``<trainer.default_root_dir>/checkpoints/last.ckpt``).

    The model is built from the configs (as ``fit`` would) and the checkpoint's adapter weights are loaded into it
    with :func:`~lightning_vidalign.checkpointing.load_adapter_weights` (the checks of ``init_adapter_from``). Then:

    - default: ``backbone.export_lora(DIR)`` writes ``DIR/pytorch_lora_weights.safetensors``, the file ``fit``
      writes at its end (default ``DIR``: ``<checkpoint folder>/../lora-<checkpoint name>``);
    - ``--merged``: ``backbone.export_merged(DIR, dtype)`` writes the LoRA fused into a complete diffusers folder
      (SVD: ``StableVideoDiffusionPipeline.from_pretrained(DIR)``, which has no LoRA loader; the tiny Wan family:
      ``WanPipeline.from_pretrained(DIR)``), default ``DIR``: ``<checkpoint folder>/../merged-<checkpoint name>``;
      ``--dtype`` (``float32`` default, ``float16``, ``bfloat16``) is the dtype of its denoiser (and SVD VAE) weights.

    Returns the written file (LoRA) or folder (merged).

    Raises:
        SystemExit: without ``--ckpt_path``; ``--dtype`` without ``--merged``; ``--merged`` for a backbone without
            ``export_merged``.
        FileNotFoundError: naming a missing checkpoint. CorruptCheckpointError: naming a truncated checkpoint and
            the newest intact one beside it. CheckpointMismatchError: a checkpoint of another backbone or LoRA
            configuration (the differing fields), or whose adapter tensors do not fit (named).
        ValueError: ``export_merged``'s (e.g. a real Wan, whose UMT5 is not rewritten: use the LoRA file).
    """
    import argparse

    import torch

    from lightning_vidalign.checkpointing import load_adapter_weights

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    own = argparse.ArgumentParser(prog="vidalign export", add_help=False)
    own.add_argument("--ckpt_path")
    own.add_argument("--output")
    own.add_argument("--merged", action="store_true")
    own.add_argument("--dtype", choices=sorted(dtypes))
    known, args = own.parse_known_args(args)  # the rest (configs, overrides) goes to the CLI
    ckpt_path, output = known.ckpt_path, known.output
    if not ckpt_path:
        raise SystemExit("vidalign export: --ckpt_path FILE (or last: the run folder's checkpoints/last.ckpt) is required, with the run's --config")
    if known.dtype and not known.merged:
        raise SystemExit("vidalign export: --dtype applies to --merged only (the LoRA file is written in float32)")
    known.dtype = known.dtype or "float32"
    # the model only: on one CPU process, without the run's callbacks and logger (a login node has no GPU)
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are passed explicitly (no "args and argv" warning)
    try:
        cli = VidAlignCLI(args=[*args, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
                                "--trainer.logger", "false", "--trainer.callbacks", "[]"], run=False)
    finally:
        sys.argv = argv
    backbone = cli.model.backbone
    if known.merged and not hasattr(backbone, "export_merged"):
        raise SystemExit(f"vidalign export --merged: {type(backbone).__name__} has no export_merged (a merged diffusers folder); "
                         "export its LoRA file without --merged")
    if ckpt_path == "last":
        ckpt_path = os.path.join(cli.trainer.default_root_dir, "checkpoints", "last.ckpt")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"vidalign export: checkpoint {ckpt_path!r} does not exist")
    info = load_adapter_weights(cli.model, ckpt_path, announce=False)  # a truncated file or another LoRA config is named
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    run_folder = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    if known.merged:
        path = backbone.export_merged(output or os.path.join(run_folder, f"merged-{stem}"), dtype=dtypes[known.dtype])
        print(f"Merged diffusers folder ({type(backbone).__name__}, LoRA fused, {known.dtype}) of {ckpt_path} (step {info['global_step']}) written to {path}")
    else:
        path = backbone.export_lora(output or os.path.join(run_folder, f"lora-{stem}"))
        print(f"LoRA (diffusers format) of {ckpt_path} (step {info['global_step']}) written to {path}")
    return path


if __name__ == "__main__":
    main()
