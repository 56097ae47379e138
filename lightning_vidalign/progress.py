"""The ``vidalign`` console progress bar."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count


class VidAlignProgressBar(RichProgressBar):
    """Lightning's Rich progress bar with three fixes for step-counted runs (our choice):

    - "Epoch N" without the ``/-2`` Lightning prints when ``max_epochs`` is -1 (runs here end on
      ``trainer.max_steps``, counted in batches);
    - no ``v_num`` (the logger version is in the run folder's path);
    - metrics with 3 significant digits (``.3g``), so a learning rate of 2e-4 is not shown as 0.000.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=RichProgressBarTheme(metrics_format=".3g"))

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
