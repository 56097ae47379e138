"""The ``vidalign`` console progress bar."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count


class VidAlignProgressBar(RichProgressBar):
    """Lightning's Rich progress bar with four fixes for step-counted runs (our choice):

    - in a run that ends on ``trainer.max_steps`` (``max_epochs`` -1, the configs' setting) the bar counts
      the run's batches, ``global_step / max_steps``, across epochs and resumes, so it agrees with the final
      "``max_steps=N`` reached" line (Lightning's bar counts the batch index within an epoch against the
      batches left, which after a mid-epoch resume reads e.g. ``4/2``);
    - "Epoch N" without the ``/-2`` Lightning prints when ``max_epochs`` is -1;
    - no ``v_num`` (the logger version is in the run folder's path);
    - metrics with 3 significant digits (``.3g``), so a learning rate of 2e-4 is not shown as 0.000.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=RichProgressBarTheme(metrics_format=".3g"))

    def _counts_run_batches(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._counts_run_batches():
            return self.trainer.max_steps
        return super().total_train_batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
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
