"""The ``vidalign`` console progress bar."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme


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


__all__ = ["VidAlignProgressBar"]
