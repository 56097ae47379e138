"""The ``vidalign`` console progress bar."""
from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count
from rich.progress import ProgressColumn
from rich.text import Text


class VidAlignProgressBar(RichProgressBar):
    """Lightning's Rich progress bar with four fixes for step-counted runs (our choice):

    - in a run that ends on ``trainer.max_steps`` (``max_epochs`` -1, the configs' setting) the bar counts
      the run's batches, ``global_step / max_steps``, across epochs and resumes, so it agrees with the final
      "``max_steps=N`` reached" line (Lightning's bar counts the batch index within an epoch against the
      batches left, which after a mid-epoch resume reads e.g. ``4/2``);
    - "Epoch N" without the ``/-2`` Lightning prints when ``max_epochs`` is -1;
    - no ``v_num`` (the logger version is in the run folder's path);
    - metrics with 3 significant digits (``.3g``), so a learning rate of 2e-4 is not shown as 0.000;
    - in such a run, elapsed time, time left and speed cover this fit's batches (from the start of ``fit``, not of
      the epoch; a resume's earlier batches do not count), the speed in ``s/it`` below one batch per second
      (video steps take seconds: Lightning's bar showed ``0.00it/s``) and ``-`` before the first batch;
    - log lines printed while the bar is on a terminal (Lightning's "``max_steps=N`` reached", our LoRA path) stay on
      screen: the stream handlers of Lightning's and our loggers write through Rich's redirected ``sys.stdout`` /
      ``sys.stderr`` while the bar is live (they held the original streams, and the bar's redraw erased the lines).
    """

    #: loggers whose plain stream handlers write through the live bar's redirected streams
    LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_vidalign", "")

    def __init__(self, refresh_rate: int = 1, leave: bool = False, console_kwargs: dict | None = None):
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=RichProgressBarTheme(metrics_format=".3g"), console_kwargs=console_kwargs)

    def _init_progress(self, trainer) -> None:
        super()._init_progress(trainer)
        self._route_log_handlers()

    def _stop_progress(self) -> None:
        self._restore_log_handlers()
        super()._stop_progress()

    def _route_log_handlers(self) -> None:
        """Point the plain ``StreamHandler``s on the streams Rich proxies at the live display's proxies (on a
        terminal Rich replaces ``sys.stdout``/``sys.stderr`` while live; a line written there is printed above the bar)."""
        if getattr(self, "_routed", None):
            return
        from rich.file_proxy import FileProxy

        # each proxy by the stream it wraps (none when the console is not a terminal: nothing is redrawn)
        originals = {id(p.rich_proxied_file): p for p in (sys.stdout, sys.stderr) if isinstance(p, FileProxy)}
        self._routed = []
        for name in self.LOGGERS:
            for handler in logging.getLogger(name).handlers:
                target = originals.get(id(getattr(handler, "stream", None)))
                if type(handler) is logging.StreamHandler and target is not None:
                    self._routed.append((handler, handler.setStream(target)))

    def _restore_log_handlers(self) -> None:
        for handler, stream in getattr(self, "_routed", None) or []:
            if handler.stream is not stream:
                handler.setStream(stream)
        self._routed = None

    def configure_columns(self, trainer) -> list:
        columns = super().configure_columns(trainer)
        return columns[:-2] + [_RunTimeColumn(self, columns[-2]), _RunSpeedColumn(self, columns[-1])]

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start = (time.monotonic(), trainer.global_step)

    def run_rate(self, task) -> tuple[float, float | None] | None:
        """``(elapsed seconds, batches per second or None)`` of this fit for the train task of a step-counted run;
        None for any other task (validation) or another kind of run."""
        start = getattr(self, "_fit_start", None)
        if start is None or task.id != self.train_progress_bar_id or not self._counts_run_batches():
            return None
        elapsed = time.monotonic() - start[0]
        done = self.trainer.global_step - start[1]
        return elapsed, (done / elapsed if done > 0 and elapsed > 0 else None)

    def _counts_run_batches(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._counts_run_batches():
            return self.trainer.max_steps
        return super().total_train_batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._counts_run_batches() and self.progress is not None and self.train_progress_bar_id is not None and not self._leave:
            # a later epoch of the same run: the same task, new description (Lightning resets it: time and speed restart)
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_run_batches() and self.train_progress_bar_id is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._counts_run_batches():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "")
        return description

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def _clock(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=int(seconds)))


class _RunColumn(ProgressColumn):
    """A column that shows this fit's figures for the train task of a step-counted run (:meth:`run_text`) and
    Lightning's column (``fallback``) for any other task."""

    def __init__(self, bar: VidAlignProgressBar, fallback: ProgressColumn):
        super().__init__()
        self.bar, self.fallback = bar, fallback

    def render(self, task) -> Text:
        rate = self.bar.run_rate(task)
        return self.fallback.render(task) if rate is None else Text(self.run_text(task, *rate), style=self.fallback.style)

    def run_text(self, task, elapsed: float, speed: float | None) -> str:
        raise NotImplementedError


class _RunTimeColumn(_RunColumn):
    """``elapsed • left`` of this fit."""

    max_refresh = 0.5

    def run_text(self, task, elapsed: float, speed: float | None) -> str:
        return f"{_clock(elapsed)} • {_clock((task.total - task.completed) / speed if speed else None)}"


class _RunSpeedColumn(_RunColumn):
    """Speed of this fit: ``it/s``, or ``s/it`` below 1 it/s; ``-`` before the first batch."""

    def run_text(self, task, elapsed: float, speed: float | None) -> str:
        return "-it/s" if not speed else (f"{speed:.2f}it/s" if speed >= 1 else f"{1 / speed:.1f}s/it")


class VidAlignModelSummary(RichModelSummary):
    """Lightning's Rich model summary without the FLOPs column and its ``Total FLOPs: 0`` line (our choice):
    Lightning counts FLOPs only through a module's ``example_input_array``, which a video alignment module has
    no single one of (its forward passes differ per algorithm), so the column was always 0."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int = 0, **summarize_kwargs) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, style="dim" if not name.strip() else None,
                             justify="right" if name in ("Params", "Params per Device", "In sizes", "Out sizes") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        frozen = total_parameters - trainable_parameters
        grid.add_row(f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}    "
                     f"[bold]Frozen[/]: {get_human_readable_count(int(frozen))}    "
                     f"[bold]Total[/]: {get_human_readable_count(int(total_parameters))} ({get_formatted_model_size(model_size)} MB)")
        console.print(grid)


__all__ = ["VidAlignModelSummary", "VidAlignProgressBar"]
