"""A user's own method in one file (used by the CLI test: --model custom_method.MyMethod)."""
from lightning_vidalign.algorithms import SFT


class MyMethod(SFT):
    """SFT with a doubled loss: a new method is one subclass."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/my_method", 1.0)
        return out
