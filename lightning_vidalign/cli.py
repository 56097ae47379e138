"""``vidalign`` command line: LightningCLI over algorithms and datamodules."""
from __future__ import annotations

import lightning_vidalign  # noqa: F401  (applies the torchvision shim before lightning imports it)

import logging
import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_vidalign.module import VideoAlignModule
from lightning_vidalign.preemption import InterruptCheckpoint
from lightning_vidalign.utils import INVOCATION

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


class RunFolderSaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` writing ``config.yaml`` to the logger's folder as before (``tb/version_N``),
    or to the run folder (``trainer.default_root_dir``) when the logger has no local folder (an MLflow server, W&B;
    Lightning's asserts there): a resumed launch then writes ``config.1.yaml``, ``config.2.yaml``, ... beside the
    first. Our choice."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False  # (the folder is chosen in setup, on every rank: trainer.log_dir broadcasts)
        super().__init__(*args, **kwargs)
        self._folder: str | None = None
        self._shared = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved:
            log_dir = trainer.log_dir  # (a collective: on every rank, once; never again in save_config, rank 0 only)
            self._folder, self._shared = log_dir or trainer.default_root_dir, log_dir is None
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        os.makedirs(self._folder, exist_ok=True)
        path = os.path.join(self._folder, self.config_filename)
        if self._shared:  # the run folder, shared by the run's launches: a resume keeps the first's config
            stem, ext = os.path.splitext(path)
            n = 1
            while os.path.exists(path):
                path, n = f"{stem}.{n}{ext}", n + 1
        self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)


#: the file of the run folder that names its MLflow run (VidAlignCLI.before_fit)
MLFLOW_RUN_FILE = "mlflow_run_id"


class UsageError(ValueError):
    """A command-line option that ``vidalign`` refuses (Lightning's top-level ``--optimizer``), naming the option to
    use instead."""


class RunFolderInUseError(RuntimeError):
    """``fit`` without ``--ckpt_path`` into a run folder that already holds checkpoints of an earlier run: its
    ``last.ckpt`` would be joined by a ``last-v1.ckpt`` and ``--ckpt_path last`` would no longer say which run
    it means. The message names the folder, its checkpoints and the three ways on."""


def _checkpoint_folders(config, run_dir: str) -> list[str]:
    """``<run_dir>/checkpoints`` and the ``dirpath`` of every ModelCheckpoint in ``config.trainer.callbacks``."""
    folders = [os.path.join(run_dir, "checkpoints")]
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if hasattr(cb, "get") and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (cb.get("init_args") or {}).get("dirpath")
            if dirpath:
                folders.append(str(dirpath))
    return list(dict.fromkeys(os.path.abspath(f) for f in folders))


def refuse_used_run_folder(config, run_dir: str) -> None:
    """Raise :class:`RunFolderInUseError` if a checkpoint folder of this run (:func:`_checkpoint_folders`) already
    holds ``*.ckpt`` files (our choice: refuse rather than auto-version, so ``--ckpt_path last`` always means the
    one run of its folder)."""
    found = []
    for folder in _checkpoint_folders(config, run_dir):
        if os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".ckpt")]
    if found:
        newest = max(found, key=os.path.getmtime)
        raise RunFolderInUseError(
            f"the run folder {run_dir!r} already holds a run ({len(found)} checkpoint(s), newest {newest!r}). "
            f"Resume it: --ckpt_path last; start a new run elsewhere: --trainer.default_root_dir runs/<new name>; "
            f"or delete {os.path.dirname(newest)!r} to start over in this folder.")


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
        kwargs.setdefault("save_config_callback", RunFolderSaveConfig)
        # the optimizer and its warm-up belong to the module (--model.init_args.optimizer / lr_scheduler): Lightning's
        # top-level --optimizer replaced configure_optimizers and silently dropped the module's schedule
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(VideoAlignModule, L.LightningDataModule, *args, **kwargs)

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :class:`~lightning_vidalign.progress.VidAlignProgressBar` and
        :class:`~lightning_vidalign.progress.VidAlignModelSummary` in place of Lightning's default Rich bar and
        summary (ones given in the config are kept), and for ``fit``
        :class:`~lightning_vidalign.preemption.InterruptCheckpoint` (Ctrl-C and SIGTERM end at a saved batch)."""
        from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar

        from lightning_vidalign.progress import VidAlignModelSummary, VidAlignProgressBar

        trainer = super().instantiate_trainer(**kwargs)
        for i, cb in enumerate(trainer.callbacks):
            if type(cb) is RichProgressBar:  # Lightning's default, not one the user configured
                trainer.callbacks[i] = VidAlignProgressBar()
            elif type(cb) is RichModelSummary:  # Lightning's default: the same table without its FLOPs column of 0
                trainer.callbacks[i] = VidAlignModelSummary(max_depth=cb._max_depth)
        if self.subcommand == "fit" and not any(isinstance(cb, InterruptCheckpoint) for cb in trainer.callbacks):
            trainer.callbacks.append(InterruptCheckpoint())  # Ctrl-C / SIGTERM: finish the batch, save, say how to resume
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Lightning's CLI would read the hyperparameters of an explicit ``--ckpt_path FILE`` and put them in place of
        the configured model (a SHIFT config resuming an SFT checkpoint would silently become SFT). Here the given
        configs decide: the checkpoint's run identity is compared with them when it is loaded and another run's is
        refused, naming the differing fields (:class:`~lightning_vidalign.checkpointing.CheckpointMismatchError`).
        A truncated or corrupt file is named by the trainer's loader (``CorruptCheckpointError``)."""

    def parse_arguments(self, parser, args) -> None:
        """Lightning's parsing, after refusing Lightning's top-level ``--optimizer`` / ``--lr_scheduler`` with the
        module's own options named (they are not defined here: ``auto_configure_optimizers=False``)."""
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list):
            for arg in argv:
                top = str(arg).split("=", 1)[0]
                if top in ("--optimizer", "--lr_scheduler") or top.startswith(("--optimizer.", "--lr_scheduler.")):
                    raise UsageError(f"{top} is not an option: the optimizer and its schedule belong to the module, "
                                     f"--model.init_args.optimizer and --model.init_args.lr_scheduler (e.g. "
                                     f"--model.init_args.optimizer.init_args.lr 1e-4), so a warm-up is never dropped silently")
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Fills ``{run_dir}``; ``fit`` without ``--ckpt_path`` into a folder holding checkpoints is refused
        (:class:`RunFolderInUseError`) before anything is built or written."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = config.get("trainer", {}).get("default_root_dir") or os.getcwd()
        _fill_run_dir(config, str(run_dir))
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self.continue_tracker_run(config, str(run_dir))
        if self.subcommand == "fit" and not config.get("ckpt_path"):
            refuse_used_run_folder(config, str(run_dir))
        elif self.subcommand == "fit" and config.get("ckpt_path") == "last":
            folders = _checkpoint_folders(config, str(run_dir))
            if not any(os.path.isfile(os.path.join(f, "last.ckpt")) for f in folders):
                # Lightning's own warning here advises save_last=True, which the configs set: the run is simply new
                from lightning.pytorch.utilities import rank_zero_info

                rank_zero_info(f"--ckpt_path last: no last.ckpt in {folders[0] if len(folders) == 1 else folders} yet, "
                               "so a new run starts there")

    @staticmethod
    def continue_tracker_run(config, run_dir: str) -> str | None:
        """A resumed ``fit`` (``--ckpt_path``) continues the tracker run of the run folder: Weights & Biases — the
        ``WandbLogger``'s ``id`` (unless given) is read from ``<save_dir>/wandb/latest-run`` (W&B's link to the last
        run folder, ``[offline-]run-<time>-<id>``; Lightning's logger resumes it, ``resume="allow"``); MLflow — the
        ``MLFlowLogger``'s ``run_id`` (unless given) from ``<run_dir>/mlflow_run_id``, written at the first start
        (:meth:`before_fit`). Returns the id, or None (another logger, an id given, or no earlier run). Our choice."""
        logger = (config.get("trainer") or {}).get("logger")
        if hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("MLFlowLogger"):
            init = logger.get("init_args")
            path = os.path.join(run_dir, MLFLOW_RUN_FILE)
            if init is None or init.get("run_id") or not os.path.isfile(path):
                return None
            init["run_id"] = open(path).read().strip()
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"MLflow: the resumed run logs to the MLflow run {init['run_id']} (from {path})")
            return init["run_id"]
        if not hasattr(logger, "get") or not str(logger.get("class_path", "")).endswith("WandbLogger"):
            return None
        init = logger.get("init_args")
        if init is None or init.get("id") or init.get("version"):
            return None
        latest = os.path.join(str(init.get("save_dir") or init.get("dir") or run_dir), "wandb", "latest-run")
        if not os.path.exists(latest):
            return None
        run_id = os.path.basename(os.path.realpath(latest)).rsplit("-", 1)[-1]
        init["id"] = run_id
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"W&B: the resumed run logs to the W&B run {run_id} of {os.path.dirname(latest)}")
        return run_id

    def before_fit(self) -> None:
        """Record the MLflow run's id in ``<run_dir>/mlflow_run_id`` (global rank 0), for a resumed fit to continue it
        (:meth:`continue_tracker_run`)."""
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger) and self.trainer.is_global_zero and logger.run_id:
                os.makedirs(self.trainer.default_root_dir, exist_ok=True)
                with open(os.path.join(self.trainer.default_root_dir, MLFLOW_RUN_FILE), "w") as f:
                    f.write(logger.run_id + "\n")

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's run of the subcommand; a ``fit`` that fails before its first training step removes the
        log folder it created (``tb/version_N`` with nothing in it), so failed and refused runs leave no empty
        version behind."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if subcommand == "fit":
                remove_logs_of_failed_start(self.trainer)
            raise


def remove_logs_of_failed_start(trainer) -> list[str]:
    """Remove the logger folders of a run that failed before any training step (``global_step == 0``, rank 0;
    for a resumed run, before its restore) and the folders that leaves empty, up to the run folder
    (``trainer.default_root_dir``). Returns the removed logger folders."""
    import shutil

    removed = []
    if trainer is None or trainer.global_step != 0 or not trainer.is_global_zero:
        return removed
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and os.path.isdir(log_dir):
            shutil.rmtree(log_dir, ignore_errors=True)
            removed.append(log_dir)
            # then the folders it left empty, up to the run folder itself (made by this failed start)
            folder, top = os.path.dirname(os.path.abspath(log_dir)), os.path.abspath(trainer.default_root_dir)
            while folder.startswith(top) and os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
                if folder == top:
                    break
                folder = os.path.dirname(folder)
    return removed


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips (e.g. the litlogger one) from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_console() -> None:
    """Keep the ``vidalign`` console to messages a user acts on (docs/cli.md, "Console"): no Lightning tips,
    no transformers weight-loading bars, no diffusers notes on unused config attributes (diffusers
    logs at error level), no torch ``LeafSpec`` deprecation raised inside Lightning, no advice on
    pre-optimization checkpoints (our modules checkpoint after the batch's optimizer steps on purpose), no advice to
    set ``save_last`` when ``--ckpt_path last`` finds no checkpoint in a new run folder (we say a new run starts), no FSDP2
    "returned a view tensor" warning for the three SVD UNet blocks where it is harmless, no ``sync_dist`` advice
    for our ``val/*`` / ``heldout/*`` values (already global). Each is explained in docs/cli.md, "Console"."""
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # our modules checkpoint the state after the batch's optimizer steps on purpose (resume continues from it)
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps.*")
    # FSDP2 over the SVD UNet: these three diffusers blocks return views (reshape); the warning is about an in-place op
    # on such a view, and none follows (diffusers concatenates, convolves and torch.cat's them; our losses are
    # out of place); FSDP2 and DDP gradients through them agree (tests/test_distributed.py, SVD DPO: 2e-7)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPDownBlockSpatioTemporal|FSDPUNetMidBlockSpatioTemporal|"
                                              r"FSDPUNetSpatioTemporalConditionModel)\) returned a view tensor")
    # the same for the Wan DiT under sequence parallelism (its output, gathered over the group by diffusers' context-
    # parallel hook, is unpatchified by reshape/permute); WanBackbone.predict reads it out of place (tests/test_sequence_parallel.py)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPWanTransformer3DModel\) returned a view tensor")
    # and the HunyuanVideo 1.5 transformer (its output unpatchified by reshape): FSDP2 LoRA gradients equal the unsharded
    # model's exactly (tests/test_fsdp2_hunyuan_views.py)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPHunyuanVideo15Transformer3DModel\) returned a view tensor")
    # diffusers 0.42's context-parallel gather (hooks/context_parallel.py) calls a deprecated torch alias; not our call
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor` is deprecated", category=FutureWarning)
    # our val/* and heldout/* values are already global (torchmetrics' cross-rank compute, or gathered over ranks)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|heldout)/")
    # --ckpt_path last in a new run folder (VidAlignCLI says so itself; Lightning's hint to set save_last is moot)
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint available')
    # raised inside Lightning's own all_gather (lightning.fabric.utilities.distributed), not by our calls
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


#: ``vidalign``, ``vidalign -h`` / ``--help``: every subcommand (Lightning's parser knows only its own four)
TOP_LEVEL_HELP = """usage: vidalign SUBCOMMAND [options]       (vidalign SUBCOMMAND --help: its options)

Post-training of video diffusion models (SFT, SHIFT, the GRPO family, DPO) with PyTorch Lightning.

training and evaluation (LightningCLI: --config FILE_OR_SHIPPED_NAME, --model..., --data..., --trainer...):
  fit            train a method:                 vidalign fit --config configs/shift.yaml
  validate       run the validation loop once
  test           evaluate a model or a run:      vidalign test --config configs/eval.yaml
  predict        sample videos

real models and configs:
  check-model    check a downloaded checkpoint folder before any GPU time: vidalign check-model DIR [--config FILE]
  configs        the shipped configs:            vidalign configs list | vidalign configs copy NAME [DEST]
  estimate       per-GPU memory of the real model sizes (markdown table)

runs and data:
  export         a run's LoRA in diffusers format (--merged: a full folder)
  cache          precompute latents and conditions of a data set
  shard          write a data set as litdata shards for streaming
  serve-reward   serve a reward model over HTTP on LitServe (RemoteReward's server)
  serve-vlm      serve a vision-language chat model (OpenAI API) for VLMJudgeReward

--config NAME also takes a shipped config when no such file exists here (`vidalign configs list`)."""


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``vidalign`` console script (``args=None`` reads ``sys.argv``).

    Returns None on purpose: the console-script wrapper calls ``sys.exit(main())``, and any other
    return value would make the process exit with status 1. Use :class:`VidAlignCLI` directly to
    keep the trainer and model in Python.

    The working folder is put first on ``sys.path`` (as ``python -m`` does), so a user's own module
    in the folder the command runs from imports by its dotted name (``--model my_pkg.my_method.MyMethod``).

    Bad input (:func:`user_error`: a refused checkpoint or run folder, a missing file, a bad config value named
    by our code) is printed as one line ``vidalign: <Error>: <message>`` and exits with status 2; any other
    error keeps its traceback; ``VIDALIGN_TRACEBACK=1`` shows it always.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    quiet_console()
    argv = sys.argv[1:] if args is None else list(args)
    INVOCATION[:] = argv
    try:
        if argv[:1] in ([], ["-h"], ["--help"]):
            print(TOP_LEVEL_HELP)
            return
        from lightning_vidalign.config_files import resolve_config_arguments

        resolved = resolve_config_arguments(argv)
        if resolved != argv:  # a shipped config named by --config NAME
            argv = resolved
            if args is None:  # as typed on the command line: keep LightningCLI reading sys.argv (no "args and argv" warning)
                sys.argv[1:] = resolved
            else:
                args = resolved
        refuse_zoo_config_first(argv)
        if argv[:1] == ["configs"]:
            from lightning_vidalign.config_files import configs_command

            configs_command(argv[1:])
            return
        if argv[:1] == ["check-model"]:
            from lightning_vidalign.check_model import check_model_command

            check_model_command(argv[1:])
            return
        if argv[:1] == ["export"]:
            export(argv[1:])
            return
        if argv[:1] in (["serve-reward"], ["serve-vlm"]):
            try:
                from lightning_vidalign.rewards import serving
            except ModuleNotFoundError as e:
                if e.name not in ("litserve", "fastapi", "starlette"):
                    raise
                raise UsageError(f"vidalign {argv[0]} runs on LitServe, which is not installed ({e.name} is missing): "
                                 "pip install -c constraints.txt -e \".[serve]\"") from None
            (serving.serve_reward if argv[0] == "serve-reward" else serving.serve_vlm)(argv[1:])
            return
        if argv[:1] == ["cache"]:
            cache_command(argv[1:])
            return
        if argv[:1] == ["shard"]:
            shard(argv[1:])
            return
        if argv[:1] == ["estimate"]:
            from lightning_vidalign.memory import estimate

            estimate(argv[1:])
            return
        from lightning_vidalign.preemption import ABORTED

        ABORTED.clear()
        try:
            cli = VidAlignCLI(args=args)
        except (SystemExit, KeyboardInterrupt):
            if ABORTED:  # a second Ctrl-C / SIGTERM (Lightning exits 1 after its graceful shutdown): the shells' code
                raise SystemExit(128 + ABORTED[-1]) from None
            raise
        close_process_group()
        interrupted = [cb for cb in getattr(getattr(cli, "trainer", None), "callbacks", []) if isinstance(cb, InterruptCheckpoint) and cb.preempted]
        if interrupted:  # saved at a batch end after Ctrl-C / SIGTERM: not a finished run (130 / 143, the shells' convention)
            raise SystemExit(128 + int(interrupted[0].received))
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a bad-input error with its own explanation
        cause = user_error(e)
        if cause is None or os.environ.get("VIDALIGN_TRACEBACK"):
            raise
        from lightning_vidalign.rewards.remote import RemoteRewardError, ServiceStartError

        from lightning_vidalign.utils import error_message

        print(f"vidalign: {type(cause).__name__}: {error_message(cause)}", file=sys.stderr)
        # labelled by cause: a service that is down or failing is not the user's input
        if isinstance(cause, ServiceStartError):  # (a worker's own traceback may be above: it is the worker's, not this one)
            print("(the service did not start; VIDALIGN_TRACEBACK=1 shows this command's traceback)", file=sys.stderr)
            raise SystemExit(2) from None
        label = "a service the run uses failed" if isinstance(cause, RemoteRewardError) else "bad input"
        print(f"({label}: no traceback shown; VIDALIGN_TRACEBACK=1 shows it)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        INVOCATION.clear()  # a later use of the package from Python is not this command


def refuse_zoo_config_first(argv: list[str]) -> None:
    """Raise :class:`UsageError` when the first ``--config`` of a ``fit``/``validate``/``test``/``predict`` is a model-zoo
    config (``configs/models/``): it holds a backbone but no method, and LightningCLI would fail with a parser dump."""
    if argv[:1] not in (["fit"], ["validate"], ["test"], ["predict"]):
        return
    from lightning_vidalign.config_files import config_arguments

    configs = [value for _, _, value in config_arguments(argv)]
    if configs and os.path.basename(os.path.dirname(os.path.abspath(configs[0]))) == "models" and configs[0].endswith((".yaml", ".yml")):
        raise UsageError(f"{configs[0]} is a model-zoo config (a backbone, no method): give it as the SECOND --config, after a method "
                         "config, e.g. vidalign fit --config configs/flow_grpo.yaml --config " + configs[0])


def close_process_group() -> None:
    """Drain and destroy the process groups at the end of a successful command (Lightning keeps them for a later fit).

    FSDP2 processes on 2 CPU cores under load sometimes aborted at interpreter exit after the run had finished
    (``terminate called without an active exception``, exit -6; seen in CI after ``destroy_process_group`` alone).
    Gloo's worker threads outlive ``destroy_process_group`` (the C++ groups stay referenced; measured: the
    ``pt_gloo_runloop`` threads are still there after it), and an asynchronous work still queued on them holds
    tensors whose release at interpreter finalization aborts (pytorch/pytorch#179291 describes this). A barrier
    first: on gloo it waits for every earlier work of the group, so nothing is in flight at exit. Called on every
    rank only when the command succeeded (every rank reaches it). No-op without ``torch.distributed``. Our choice."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def _own_code_dirs() -> tuple[str, ...]:
    import lightning_vidalign as pkg

    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (pkg, algorithms, datamodules, rewards))


def user_error(error: BaseException) -> BaseException | None:
    """The bad-input error behind ``error`` to print as one message (no traceback), or None for anything else.

    Follows the ``__cause__`` chain (jsonargparse wraps an error raised while building a class from the config in
    a "Does not validate against any of the Union subtypes" error with a dump of the whole config), outermost
    first, and takes the first error that is one of our refusals (:class:`RunFolderInUseError`, ``CheckpointMismatchError``,
    ``CorruptCheckpointError``, ``VideoDecodeError``, ``ShardError``), a ``FileNotFoundError``, or a ``ValueError`` / ``KeyError``
    raised by this package's own code (our messages name the key or file and what was expected). A bug (any other
    error, or one raised inside a library) keeps its traceback. Our choice."""
    from lightning_vidalign.backbones.base import CheckpointLoadError
    from lightning_vidalign.cache import StaleCacheError
    from lightning_vidalign.checkpointing import CheckpointMismatchError, CorruptCheckpointError
    from lightning_vidalign.datamodules.io import VideoDecodeError
    from lightning_vidalign.datamodules.streaming import ShardError
    from lightning_vidalign.rewards.remote import RemoteRewardError, ServiceStartError

    from lightning_vidalign.utils import cause_chain

    for exc in cause_chain(error):  # outermost first: our refusal wrapping torch's error is the one to show
        if isinstance(exc, (UsageError, RunFolderInUseError, CheckpointMismatchError, CorruptCheckpointError, VideoDecodeError, FileNotFoundError,
                            RemoteRewardError, ServiceStartError, StaleCacheError, ShardError, CheckpointLoadError)):
            return exc
        if isinstance(exc, (ValueError, KeyError)) and exc.__traceback__ is not None:
            tb = exc.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_own_code_dirs()):
                return exc
    return None


def export(args: list[str]) -> str:
    """``vidalign export --config CONFIG [--config ...] --ckpt_path FILE|last [--merged [--dtype DTYPE]] [--output DIR]
    [other overrides]``: write a checkpoint's policy for diffusers, on one CPU process whatever the run's strategy
    (``last``: ``<trainer.default_root_dir>/checkpoints/last.ckpt``).

    The model is built from the configs (as ``fit`` would) and the checkpoint's adapter weights are loaded into it
    with :func:`~lightning_vidalign.checkpointing.load_adapter_weights` (the checks of ``init_adapter_from``). Then:

    - default: ``backbone.export_lora(DIR)`` writes ``DIR/pytorch_lora_weights.safetensors``, the file ``fit``
      writes at its end (default ``DIR``: ``<checkpoint folder>/../lora-<checkpoint name>``; a two-expert Wan 2.2
      A14B also ``DIR/pytorch_lora_weights_transformer_2.safetensors``, the low-noise expert's);
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
        others = sorted(f for f in os.listdir(os.path.dirname(path)) if f.endswith(".safetensors") and f != os.path.basename(path))
        print(f"LoRA (diffusers format) of {ckpt_path} (step {info['global_step']}) written to {path}"
              + (f" (and {', '.join(others)} beside it)" if others else ""))
    return path


def build_offline(args: list[str]) -> VidAlignCLI:
    """The model and data module of ``args`` (``--config`` files and overrides) built as ``vidalign fit`` builds them,
    on one CPU process, without logger, callbacks or strategy, for the offline subcommands (``vidalign cache``,
    ``vidalign shard``); ``sys.argv`` is set aside meanwhile (the CLI would read it). Our choice."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return VidAlignCLI(args=[*args, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
                                 "--trainer.logger", "false", "--trainer.callbacks", "[]"], run=False)
    finally:
        sys.argv = argv


def shard(args: list[str]) -> dict:
    """``vidalign shard --config CONFIG [--config ...] --output DIR [--chunk_bytes 64MB] [--overwrite] [data overrides]``:
    decode the train and val clips of the config's data module (a ``VideoClipDataModule``) once into LitData shards
    (:func:`~lightning_vidalign.datamodules.streaming.write_shards`: ``DIR/train``, ``DIR/val``, with the data settings
    in each ``index.json``). Train from them with the same config and ``--data.init_args.shards DIR``.

    The data module is built from the configs as ``fit`` would build it (on one CPU process; the model is built too,
    as the CLI builds both). Returns ``write_shards``' summary.

    Raises:
        SystemExit: without ``--output``; a data module other than ``VideoClipDataModule``.
        ShardError: ``DIR`` holds files (without ``--overwrite``), or the config reads shards already.
    """
    import argparse

    from lightning_vidalign.datamodules import VideoClipDataModule
    from lightning_vidalign.datamodules.streaming import write_shards

    if {"-h", "--help"} & set(args):
        print("usage: vidalign shard --config CONFIG [--config ...] --output DIR [--chunk_bytes 64MB] [--overwrite] [data overrides]\n\n"
              "Decode the config's train and val clips once into LitData shards: DIR/train and DIR/val, the data settings in each\n"
              "index.json. Then `vidalign fit --config CONFIG --data.init_args.shards DIR` trains from them (the same items in the\n"
              "same order as from the videos); shards written with other clip settings are refused, naming the keys.\n\n"
              "  --output DIR        the shard folder to write (required)\n"
              "  --chunk_bytes SIZE  LitData chunk size, bytes or e.g. 64MB (default 64MB)\n"
              "  --overwrite         replace what DIR holds\n"
              "Other options are `vidalign fit`'s (--config, --data.init_args.*; `vidalign fit --help`).")
        return {}
    own = argparse.ArgumentParser(prog="vidalign shard", add_help=False)
    own.add_argument("--output")
    own.add_argument("--chunk_bytes", default="64MB")
    own.add_argument("--overwrite", action="store_true")
    known, args = own.parse_known_args(args)
    if not known.output:
        raise SystemExit("vidalign shard: --output DIR (the shard folder to write) is required, with the run's --config")
    cli = build_offline(args)
    if not isinstance(cli.datamodule, VideoClipDataModule):
        raise SystemExit(f"vidalign shard: the config's data module is {type(cli.datamodule).__name__}; shards are written from a VideoClipDataModule")
    chunk_bytes = int(known.chunk_bytes) if known.chunk_bytes.isdigit() else known.chunk_bytes
    summary = write_shards(cli.datamodule, known.output, chunk_bytes=chunk_bytes, overwrite=known.overwrite)
    print(f"Shards of {summary['train']} train / {summary['val']} val clips ({summary['bytes'] / 1e6:.1f} MB) written to {summary['output']}; "
          f"train from them with --data.init_args.shards {summary['output']}")
    return summary


def cache_command(args: list[str]) -> str:
    """``vidalign cache --config CONFIG [--config ...] [--device cpu|cuda] [overrides]``: build the latent cache of the
    config's training clips into ``data.init_args.cache_dir`` (required: in the config or as an override).

    The model and the data module are built from the configs as ``fit`` would (one process, no logger or callbacks);
    then :func:`build_cache`. Prints the folder, the number of clips and the encoder. Returns the folder.

    Raises:
        SystemExit: without a ``cache_dir``, or for a data module without a cache (not a ``VideoClipDataModule``).
    """
    import argparse

    import torch

    from lightning_vidalign.cache import build_cache

    if {"-h", "--help"} & set(args):
        print("usage: vidalign cache --config CONFIG [--config ...] --data.init_args.cache_dir DIR [--device cpu|cuda] [other overrides]\n\n"
              "Encode the config's training clips once (VAE latents, clip-only condition tensors, first frames, captions) into DIR.\n"
              "Then `vidalign fit --config CONFIG --data.init_args.cache_dir DIR` trains from it (add --data.init_args.cache_video true\n"
              "where the algorithm needs the real pixels: SHIFT's adversarial reward, DPO's synthetic negatives). A cache built with\n"
              "another encoder or other data settings, or from files that changed since, is refused by fit, naming the difference.")
        return ""
    own = argparse.ArgumentParser(prog="vidalign cache", add_help=False)
    own.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    known, rest = own.parse_known_args(args)
    cli = build_offline(rest)
    dm = cli.datamodule
    if not getattr(dm, "supports_latent_cache", False):
        raise SystemExit(f"vidalign cache: the data module {type(dm).__name__} has no latent cache (VideoClipDataModule has: data.init_args.cache_dir)")
    cache_dir = getattr(dm, "cache_dir", None)
    if not cache_dir:
        raise SystemExit("vidalign cache: set the folder to write, --data.init_args.cache_dir DIR (the same option makes fit train from it)")
    import shlex

    command = "vidalign cache " + " ".join(shlex.quote(a) for a in args)
    manifest = build_cache(cli.model.backbone, dm, cache_dir, device=known.device, command=command)
    enc = manifest["encoder"]
    print(f"Latent cache of {len(manifest['clips'])} training clips written to {cache_dir} "
          f"({enc['backbone'].rsplit('.', 1)[-1]} {enc['pretrained_path']}, VAE {enc['vae_dtype']}, encoders {enc['encoder_dtype']}); "
          f"train from it with --data.init_args.cache_dir {cache_dir}")
    return cache_dir


if __name__ == "__main__":
    main()
