"""lightning-vidalign: post-training of video diffusion models with PyTorch Lightning.

Subpackages: ``lightning_vidalign.algorithms`` (SFT, SHIFT, ...), ``lightning_vidalign.rewards``
(reward callbacks and motion scorers), ``lightning_vidalign.datamodules`` (video data),
``lightning_vidalign.backbones`` (policies wrapping diffusers models).
"""
from lightning_vidalign._compat import apply_torchvision_shim

apply_torchvision_shim()

# registers the pipeline components named in the Wan demo base's model_index.json (diffusers takes a library it does
# not know from sys.modules only); nothing heavy is imported until diffusers asks for a class
from lightning_vidalign import diffusers_components  # noqa: E402,F401

__version__ = "0.1.0"
