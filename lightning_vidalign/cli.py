"""``vidalign`` command line: LightningCLI over algorithms and datamodules."""
from __future__ import annotations

import lightning_vidalign  # noqa: F401  (applies the torchvision shim before lightning imports it)

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_vidalign.module import VideoAlignModule

# importing registers the classes so configs may use short names (SHIFT, IMRReward, ...)
from lightning_vidalign import algorithms, datamodules, rewards  # noqa: F401,E402
from lightning_vidalign.backbones import SVDBackbone  # noqa: F401,E402


class VidAlignCLI(LightningCLI):
    """``vidalign fit|validate|test|predict --config CONFIG``; any ``VideoAlignModule`` subclass
    (``--model my_pkg.MyMethod``) and any ``LightningDataModule``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(VideoAlignModule, L.LightningDataModule, *args, **kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``vidalign`` console script (``args=None`` reads ``sys.argv``).

    Returns None on purpose: the console-script wrapper calls ``sys.exit(main())``, and any other
    return value would make the process exit with status 1. Use :class:`VidAlignCLI` directly to
    keep the trainer and model in Python.
    """
    VidAlignCLI(args=args)


if __name__ == "__main__":
    main()
