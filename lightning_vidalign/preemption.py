"""Preemption handling for SLURM (or any scheduler that signals before killing a job)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

import lightning as L

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """Save a checkpoint and stop cleanly when the job is told it will be preempted.

    The signal handler only sets a flag (nothing unsafe runs inside it). At the end of every
    training batch all ranks agree (any rank flagged -> all stop, through the strategy's
    ``reduce_boolean_decision``), save one checkpoint together (``trainer.save_checkpoint``, so every
    rank takes part in a sharded save), global rank 0 requeues the SLURM job (``scontrol requeue
    $SLURM_JOB_ID``) when running under SLURM, and the run stops. The requeued job resumes with
    ``--ckpt_path last`` (the file is ``<dirpath>/last.ckpt``, which Lightning's ``"last"`` finds).

    Use it instead of Lightning's ``SLURMEnvironment(auto_requeue=True)``, which saves from inside
    the signal handler, possibly mid-step (set ``auto_requeue: false`` on the plugin; see
    ``configs/slurm/vidalign.sbatch``).

    Args:
        dirpath: directory of the checkpoint (default: the ``ModelCheckpoint``'s, else
            ``<default_root_dir>/checkpoints``).
        filename: checkpoint file name.
        signal_name: ``SIGUSR1`` (``#SBATCH --signal=USR1@<seconds>``) or any ``signal`` name.
        requeue: ``"auto"`` (when ``SLURM_JOB_ID`` is set), ``"always"`` or ``"never"``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt", signal_name: str = "SIGUSR1", requeue: str = "auto"):
        super().__init__()
        if requeue not in ("auto", "always", "never"):
            raise ValueError(f"PreemptionCheckpoint: requeue must be 'auto', 'always' or 'never', got {requeue!r}")
        if not hasattr(signal, signal_name):
            raise ValueError(f"PreemptionCheckpoint: unknown signal {signal_name!r}")
        self.dirpath, self.filename, self.signal_name, self.requeue = dirpath, filename, signal_name, requeue
        self.requested = False
        self.preempted = False
        self.saved_path: str | None = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(getattr(signal, self.signal_name), self._handler)
        else:
            log.warning("PreemptionCheckpoint: not in the main thread, %s is not handled", self.signal_name)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(getattr(signal, self.signal_name), self._previous)
            self._previous = None

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        dirpath = self.dirpath
        if dirpath is None and trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "dirpath", None):
            dirpath = trainer.checkpoint_callback.dirpath
        dirpath = dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, self.filename)

    def save(self, trainer: L.Trainer) -> str:
        """Save the run's state at this batch end on every rank; returns the file. With a ``ModelCheckpoint`` that keeps
        ``last.ckpt`` (``save_last``) and no ``dirpath``/``filename`` of ours, that callback writes it (its own file,
        ``last_model_path`` and bookkeeping: it then writes no ``last-v1.ckpt`` of the stopped state at the end of
        training; ``save_last="link"`` is not handed over: it links to the last periodic file, an older state);
        otherwise :meth:`checkpoint_path`."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        keeper = trainer.checkpoint_callback
        if isinstance(keeper, ModelCheckpoint) and keeper.save_last is True and self.dirpath is None and self.filename == "last.ckpt":
            keeper._save_last_checkpoint(trainer, keeper._monitor_candidates(trainer))  # (Lightning's own last-checkpoint path)
            return keeper.last_model_path
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        return path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = self.save(trainer)
        self.saved_path, self.preempted = path, True
        log.warning("PreemptionCheckpoint [%s, rank %d]: %s received; checkpoint written to %s; stopping", time.strftime("%H:%M:%S"),
                    trainer.global_rank, self.signal_name, path)
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and (self.requeue == "always" or (self.requeue == "auto" and job)):
            if not job:
                log.error("PreemptionCheckpoint: requeue='always' but SLURM_JOB_ID is not set")
            else:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                log.warning("PreemptionCheckpoint [%s]: scontrol requeue %s -> rc %d %s", time.strftime("%H:%M:%S"), job, result.returncode,
                            result.stderr.strip())
        stop_now(trainer)


def stop_now(trainer: L.Trainer) -> None:
    """Stop after this batch without the validation Lightning would still run at this step (sampling videos and the
    held-out metrics can outlast a scheduler's grace period; the saved state does not include them either)."""
    trainer.should_stop = True
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if epoch_loop is not None and hasattr(epoch_loop, "_skip_next_val"):
        epoch_loop._skip_next_val = True  # (Lightning 2.6's own flag for this)


#: the signals that aborted a run at once (a second Ctrl-C / SIGTERM): ``vidalign`` exits with ``128 + signal``
ABORTED: list[int] = []


def resume_command(argv: list[str] | None = None, checkpoint: str = "last") -> str:
    """The command that resumes this run: ``vidalign`` with this command's arguments, any ``--ckpt_path`` replaced by
    ``--ckpt_path <checkpoint>`` (``last``, or the file the interrupt wrote when no ``ModelCheckpoint`` finds it)."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        out.append(arg)
    return "vidalign " + " ".join(shlex.quote(a) for a in out + ["--ckpt_path", checkpoint])


def _frozen_copy(value):
    """A copy of a checkpoint dict that later training cannot change: tensors cloned to CPU, containers rebuilt,
    other values deep-copied where they can be (kept as they are where they cannot, e.g. a lambda in the hyperparameters)."""
    import copy

    import torch

    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if type(value) is dict:
        return {k: _frozen_copy(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_frozen_copy(v) for v in value)
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - not copyable (a lambda, a lock): not changed by training either
        return value


class InterruptCheckpoint(PreemptionCheckpoint):
    """Ctrl-C (SIGINT) and SIGTERM stop a run at a consistent point and keep it, and so does an error inside a batch
    (issue 36).

    The first signal only sets a flag and says what happens; the current batch finishes, all ranks agree at its end
    (:class:`PreemptionCheckpoint`'s protocol: any rank flagged stops them all), save ``last.ckpt`` where
    ``--ckpt_path last`` finds it, print the command that resumes the run, and stop; ``vidalign`` then exits with
    ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), so a script does not take the run for finished. A second
    SIGINT stops at once, without saving (Lightning's ``KeyboardInterrupt`` path), a second SIGTERM too (the default
    action). Without it, Lightning stops on Ctrl-C mid-batch and saves nothing: every batch since the last periodic
    checkpoint was lost. ``vidalign fit`` adds it to every run. Our design, after the SLURM preemption path.

    **An error inside a batch** (the reward service down after its retries, a non-finite loss with
    ``on_nonfinite="raise"``, a video that does not decode): the state at the end of the last completed batch is
    written to ``last.ckpt`` (nothing of the failed batch in it: an in-memory copy of the checkpoint taken at every
    batch end, the content ``trainer.save_checkpoint`` writes there) and the resume command is printed; the error
    then ends the run as before. The copy costs one checkpoint's size in CPU memory and a copy per batch: with
    ``error_checkpoint="auto"`` it is kept when the trainable parameters take at most ``auto_limit_gb`` (fp32 with
    AdamW's two moments: LoRA runs; full fine-tuning of a real model falls back to the last periodic checkpoint), and
    only on one device or under DDP (FSDP2's dump gathers every parameter; DeepSpeed and distributed checkpoints are
    folders: there the last periodic checkpoint remains). Kept and written by global rank 0 when the error reaches it
    (a service down for every rank does; an error on another rank alone ends the run as before). A second Ctrl-C
    (abort) saves nothing. A stop skips the validation Lightning would still run at that step.

    Args:
        dirpath, filename: as :class:`PreemptionCheckpoint` (default: the ``ModelCheckpoint``'s ``last.ckpt``).
        signals: the signal names handled.
        error_checkpoint: ``"auto"``, True or False (above).
        auto_limit_gb: the ``"auto"`` bound in GB of ``3 × 4`` bytes per trainable parameter.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt", signals: tuple[str, ...] = ("SIGINT", "SIGTERM"),
                 error_checkpoint: bool | str = "auto", auto_limit_gb: float = 2.0):
        super().__init__(dirpath=dirpath, filename=filename, signal_name=signals[0], requeue="never")
        if error_checkpoint not in (True, False, "auto"):
            raise ValueError(f"InterruptCheckpoint: error_checkpoint must be True, False or 'auto', got {error_checkpoint!r}")
        self.error_checkpoint, self.auto_limit_gb = error_checkpoint, float(auto_limit_gb)
        self._snapshot: tuple[int, dict] | None = None  # (global step, checkpoint) at the last batch end
        self.error_saved_path: str | None = None
        for name in signals:
            if not hasattr(signal, name):
                raise ValueError(f"InterruptCheckpoint: unknown signal {name!r}")
        self.signals = tuple(signals)
        self.received: int | None = None  # the first signal's number
        self._previous_handlers: dict[int, object] = {}
        self._trainer: L.Trainer | None = None
        self._keep_snapshots: bool | None = None

    def _handler(self, signum, frame) -> None:
        if self.received is None and self._stopping():
            # the run already stops at a saved batch (a SLURM preemption: `scontrol requeue` cancels the job, whose tasks
            # then get SIGTERM): let every rank finish its shutdown together (a rank killed here would leave the others
            # waiting in the last barrier until SLURM's SIGKILL)
            return
        if self.received is not None:  # a second signal: stop at once
            self._restore()
            ABORTED.append(int(signum))
            trainer = self._trainer
            path = self.checkpoint_path(trainer) if trainer is not None else None
            left = (f"{path} holds the last periodic save" if path and os.path.isfile(path) else "no checkpoint of this run was saved")
            os.write(2, f"\nvidalign: second {signal.Signals(signum).name}: stopping now, without saving; {left}\n".encode())
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)  # (not Lightning's SIGTERM handler, which would go on to the batch end)
            os.kill(os.getpid(), signum)
            return
        self.received, self.requested = signum, True
        name = signal.Signals(signum).name
        # os.write: a print here could re-enter a write of the progress bar that the signal interrupted
        os.write(2, (f"\nvidalign: {name} received: the current batch finishes, then last.ckpt is saved and the run stops "
                     f"({'Ctrl-C' if signum == signal.SIGINT else name} again: stop at once, without saving)\n").encode())

    def _stopping(self) -> bool:
        """Whether a callback of this run (a :class:`PreemptionCheckpoint`) already saved and stops it."""
        trainer = self._trainer
        return trainer is not None and any(getattr(cb, "preempted", False) for cb in trainer.callbacks)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass  # (handlers from on_train_start: after Lightning's own SIGTERM handler, which they replace during training)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self.requested, self.preempted, self.received, self._snapshot = False, False, None, None  # (each fit afresh)
        self.saved_path = self.error_saved_path = None
        self._keep_snapshots: bool | None = None  # (decided at the first batch end of each fit: not a parameter count per batch)
        if threading.current_thread() is not threading.main_thread():
            log.warning("InterruptCheckpoint: not in the main thread, %s not handled", ", ".join(self.signals))
            return
        for name in self.signals:
            num = getattr(signal, name)
            self._previous_handlers[num] = signal.signal(num, self._handler)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for num, previous in self._previous_handlers.items():
                signal.signal(num, previous)
        self._previous_handlers = {}

    def keeps_snapshots(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether the batch-end copy is kept: only under a strategy that writes the checkpoint as one file through its
        ``checkpoint_io`` and dumps it cheaply (one device, DDP): FSDP2's dump gathers every parameter, frozen ones
        included, and DeepSpeed / distributed checkpoints are folders. Then ``error_checkpoint``; ``"auto"``:
        trainable parameters within the bound."""
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if not self.error_checkpoint or not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            return False
        if self.error_checkpoint is True:
            return True
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        return 12 * trainable / 1e9 <= self.auto_limit_gb

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, Exception) or self.preempted:
            return  # (an abort (KeyboardInterrupt), or already saved by a signal)
        if self._snapshot is None:  # said, so that a user does not look for a checkpoint that is not there
            if trainer.is_global_zero and self._trainer is trainer:
                import sys

                why = ("no batch of this launch completed before it: nothing new to save; once the cause is fixed, run the same command again"
                       if self._keep_snapshots is None else
                       "this strategy keeps no per-batch copy (FSDP2, DeepSpeed, or more trainable parameters than the bound): "
                       "the last periodic checkpoint is the state to resume from (--ckpt_path last)")
                print(f"vidalign: the run stopped on an error; {why}", file=sys.stderr, flush=True)
            return
        step, checkpoint = self._snapshot
        path = self.checkpoint_path(trainer)
        if trainer.is_global_zero:
            import sys

            try:
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            except Exception as e:  # noqa: BLE001 - logged; the run's own error is the one to report
                log.error("InterruptCheckpoint: the state after batch %d could not be written to %s: %s", step, path, e)
                return
            self.error_saved_path = path
            print(f"vidalign: the run stopped on an error in batch {step + 1}; the state after batch {step} is saved in {path}\n"
                  f"  resume (once the cause is fixed): {resume_command(checkpoint=self.resume_argument(trainer, path))}",
                  file=sys.stderr, flush=True)

    @staticmethod
    def resume_argument(trainer: L.Trainer, path: str) -> str:
        """``last`` when the run's ``ModelCheckpoint`` keeps ``path`` (``--ckpt_path last`` finds it), else the file."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        keeper = trainer.checkpoint_callback
        if isinstance(keeper, ModelCheckpoint) and keeper.dirpath and os.path.abspath(os.path.dirname(path)) == os.path.abspath(keeper.dirpath) \
                and os.path.basename(path).startswith("last"):
            return "last"
        return path

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            if self._keep_snapshots is None:
                self._keep_snapshots = self.keeps_snapshots(trainer, pl_module)
            if self._keep_snapshots:  # every rank dumps (the dump may gather); rank 0 keeps the copy it writes
                dumped = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                self._snapshot = (trainer.global_step, _frozen_copy(dumped) if trainer.is_global_zero else {})
            return
        path = self.save(trainer)
        self.saved_path, self.preempted = path, True
        if self.received is None:  # another rank was signalled
            self.received = int(signal.SIGINT if "SIGINT" in self.signals else getattr(signal, self.signals[0]))
        if trainer.is_global_zero:
            import sys

            print(f"vidalign: stopped after batch {trainer.global_step} ({signal.Signals(self.received).name}); the run is saved in {path}\n"
                  f"  resume: {resume_command(checkpoint=self.resume_argument(trainer, path))}", file=sys.stderr, flush=True)
        stop_now(trainer)
