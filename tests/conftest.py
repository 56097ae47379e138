import os
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # for tests/custom_method.py (--model my_pkg.MyMethod)


@pytest.fixture(scope="session")
def datamodule():
    from lightning_vidalign.datamodules import VideoClipDataModule

    dm = VideoClipDataModule(num_frames=8, fps=7, height=64, width=64, batch_size=2)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="session")
def real_batch(datamodule):
    return next(iter(datamodule.train_dataloader()))


@pytest.fixture()
def backbone():
    from lightning_vidalign.backbones import SVDBackbone

    return SVDBackbone(lora_rank=4, lora_alpha=8)
