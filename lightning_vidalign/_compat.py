"""Import-time compatibility shim for a torchvision whose compiled ops cannot load.

Why: ``timm`` (and through it ``lightning``, ``torchmetrics``, ``peft``) imports ``torchvision``.
On a CPU-only machine the only torchvision wheel matching ``torch==2.13.0`` is a CUDA build whose
``_C.so`` cannot be loaded against CPU torch; torchvision then registers fake kernels for
``torchvision::nms``/``qnms`` and fails with ``operator torchvision::nms does not exist``.

What: before torchvision's first import, try to load its ``_C`` library exactly as torchvision
would. Only if that fails, define the two missing operator *schemas* (no kernels), so the
pure-Python parts of torchvision import. ``torchvision.ops.nms`` and the image codecs stay
unavailable (calling them raises), and nothing in this project uses them. Everywhere else (a
working torchvision, or none installed) this is a no-op. Source: our choice (see shared ASSETS.md).
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_LIB = None  # keeps the torch.library.Library alive (dropping it would deregister the schemas)
SHIM_APPLIED = False

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def apply_torchvision_shim() -> bool:
    """Define torchvision's missing op schemas when its compiled extension cannot load.

    Returns:
        True if the shim was applied (torchvision's ``_C`` failed to load), False otherwise.
    """
    global _LIB, SHIM_APPLIED
    if SHIM_APPLIED or "torchvision" in sys.modules:
        return SHIM_APPLIED
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    if libs:
        try:
            torch.ops.load_library(libs[0])
            return False
        except (OSError, ImportError, RuntimeError) as err:
            reason = str(err).splitlines()[0]
    else:
        reason = "no compiled _C library in the torchvision package"
    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "nms"):
        return False
    _LIB = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _LIB.define(schema)
    SHIM_APPLIED = True
    log.debug("torchvision compiled ops unavailable (%s); defined op schemas only", reason)
    return True
