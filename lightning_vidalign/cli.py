"""``vidalign`` command line: LightningCLI over algorithms and datamodules."""
from __future__ import annotations

import lightning_vidalign  # noqa: F401  (applies the torchvision shim before lightning imports it)

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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = config.get("trainer", {}).get("default_root_dir") or os.getcwd()
        _fill_run_dir(config, str(run_dir))


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
    VidAlignCLI(args=args)


if __name__ == "__main__":
    main()
