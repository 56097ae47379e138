"""lightning-vidalign: post-training of video diffusion models with PyTorch Lightning.

Subpackages: ``lightning_vidalign.algorithms`` (SFT, SHIFT, ...), ``lightning_vidalign.rewards``
(reward callbacks and motion scorers), ``lightning_vidalign.datamodules`` (video data),
``lightning_vidalign.backbones`` (policies wrapping diffusers models).
"""
from lightning_vidalign._compat import apply_torchvision_shim

apply_torchvision_shim()

__version__ = "0.1.0"
