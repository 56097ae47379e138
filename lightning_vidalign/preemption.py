"""Preemption handling for SLURM (or any scheduler that signals before killing a job)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path, self.preempted = path, True
        log.warning("PreemptionCheckpoint: %s received; checkpoint written to %s; stopping", self.signal_name, path)
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and (self.requeue == "always" or (self.requeue == "auto" and job)):
            if not job:
                log.error("PreemptionCheckpoint: requeue='always' but SLURM_JOB_ID is not set")
            else:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                log.warning("PreemptionCheckpoint: scontrol requeue %s -> rc %d %s", job, result.returncode, result.stderr.strip())
        trainer.should_stop = True
