"""Learned reward models used by published video RL work (issue 22), as reward callbacks.

Frame-level preference / alignment models scored per frame and aggregated over frames:
:class:`CLIPScoreReward`, :class:`PickScoreReward`, :class:`HPSReward`. A video reward model:
:class:`VideoAlignReward` (VideoReward: VQ / MQ / TA heads on Qwen2-VL). Large VLMs over HTTP:
:class:`VLMJudgeReward` (any OpenAI-compatible chat endpoint, e.g. vLLM or SGLang).

Nothing is downloaded: every model loads from a local folder or file and a missing file is named in a
:class:`MissingRewardFileError`. Each class reproduces the public inference code of its model (frame
sampling, resolution, normalisation, prompt template, de-normalisation); the source is given in its
docstring. All take videos ``(B, T, 3, H, W)`` in ``[0, 1]`` (the :class:`RewardCallback` contract) and
the captions from ``batch["caption"]`` (or ``"prompt"`` / ``"text"``).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from torch import Tensor

from lightning_vidalign.rewards.base import RewardCallback, batch_captions


# ------------------------------------------------------------------------------ named errors
class MissingRewardFileError(FileNotFoundError):
    """A reward model's file or folder is not where the configuration says (nothing is downloaded)."""


class RewardInputError(ValueError):
    """Videos given to a reward have the wrong shape, range or count."""


class NonFiniteRewardError(FloatingPointError):
    """A reward model produced NaN or infinite scores (never passed on as a reward)."""


def require_files(folder: str, files: list[str], who: str) -> None:
    """Raise :class:`MissingRewardFileError` naming each of ``files`` missing from ``folder``."""
    if not os.path.isdir(folder):
        raise MissingRewardFileError(f"{who}: model folder {folder!r} does not exist (weights are never downloaded: give a local folder)")
    missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise MissingRewardFileError(f"{who}: {', '.join(repr(os.path.join(folder, f)) for f in missing)} missing (weights are never downloaded)")


def require_file(path: str, who: str) -> None:
    if not os.path.isfile(path):
        raise MissingRewardFileError(f"{who}: file {path!r} does not exist (weights are never downloaded: give a local file)")


def check_videos(videos: Tensor, who: str) -> Tensor:
    """Check ``(B, T, 3, H, W)`` in ``[0, 1]`` and return the videos clamped to ``[0, 1]`` as fp32 on CPU.

    Raises:
        RewardInputError: another shape, or values far outside ``[0, 1]`` (e.g. a video in ``[-1, 1]``
            or ``[0, 255]``; decoders' small overshoots are clamped).
    """
    if not torch.is_tensor(videos) or videos.dim() != 5 or videos.shape[2] != 3:
        shape = tuple(videos.shape) if torch.is_tensor(videos) else type(videos).__name__
        raise RewardInputError(f"{who}: expected videos (B, T, 3, H, W), got {shape}")
    if videos.shape[0] == 0 or videos.shape[1] == 0:
        raise RewardInputError(f"{who}: empty videos {tuple(videos.shape)}")
    v = videos.detach().float()
    lo, hi = float(v.min()), float(v.max())
    if lo < -0.25 or hi > 1.25:
        raise RewardInputError(f"{who}: videos must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (a [-1, 1] or [0, 255] video?)")
    return v.clamp(0, 1).cpu()


def check_finite(scores: Tensor, who: str) -> Tensor:
    if not torch.isfinite(scores).all():
        raise NonFiniteRewardError(f"{who}: non-finite scores {scores.tolist()} (model weights or inputs broken; no reward is made up)")
    return scores


def to_uint8(videos: Tensor) -> np.ndarray:
    """``(B, T, 3, H, W)`` in ``[0, 1]`` → ``(B, T, H, W, 3)`` uint8, as the frames of a saved video."""
    return (videos.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous().numpy()


def frame_indices(num: int, count: int | None) -> list[int]:
    """``count`` frame indices spread uniformly over ``num`` frames (first and last included: rounded
    ``linspace(0, num - 1, count)``, the sampling of qwen-vl-utils and VideoAlign); all frames when
    ``count`` is None or ``>= num``."""
    if count is None or count >= num:
        return list(range(num))
    if count < 1:
        raise ValueError(f"frame count must be >= 1, got {count}")
    return torch.linspace(0, num - 1, count).round().long().tolist()


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {name!r}") from None


# ------------------------------------------------------------------ frame-level CLIP-like models
class FrameTextReward(RewardCallback):
    """Base of image-text models applied to a video frame by frame.

    Each video is scored on ``num_frames`` frames spread uniformly over it (:func:`frame_indices`; None:
    all frames), each frame against the video's caption, and the per-frame scores are aggregated
    over the frames: ``"mean"`` (default), ``"min"`` (the worst frame), or ``"first"`` (first frame only).
    Our choice: the image models define no video score; the mean is what video RL work that uses image
    rewards on frames reports. Frames are quantised to uint8 first, as the images the models were
    trained and evaluated on. :meth:`score_components` gives ``frame_min`` and ``frame_max``.
    """

    def __init__(self, name: str, weight: float = 1.0, num_frames: int | None = None, aggregate: str = "mean", batch_frames: int = 32):
        super().__init__(name=name, weight=weight)
        if aggregate not in ("mean", "min", "first"):
            raise ValueError(f"{type(self).__name__}: aggregate must be 'mean', 'min' or 'first', got {aggregate!r}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"{type(self).__name__}: num_frames must be >= 1 or None, got {num_frames}")
        self.num_frames, self.aggregate, self.batch_frames = num_frames, aggregate, max(1, int(batch_frames))
        self._last: dict[str, Tensor] = {}

    # subclasses: per-frame scores for images (list of HWC uint8) paired with texts (list of str)
    def frame_scores(self, images: list[np.ndarray], texts: list[str]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        who = type(self).__name__
        v = check_videos(videos, who)
        caps = batch_captions(batch, v.shape[0], who)
        idx = [0] if self.aggregate == "first" else frame_indices(v.shape[1], self.num_frames)
        frames = to_uint8(v[:, idx])  # (B, F, H, W, 3)
        b, f = frames.shape[:2]
        images = [frames[i, j] for i in range(b) for j in range(f)]
        texts = [caps[i] for i in range(b) for _ in range(f)]
        parts = [self.frame_scores(images[k : k + self.batch_frames], texts[k : k + self.batch_frames]) for k in range(0, len(images), self.batch_frames)]
        per_frame = check_finite(torch.cat(parts).float().cpu().view(b, f), who)
        r = per_frame.min(1).values if self.aggregate == "min" else per_frame.mean(1)
        self._last = {"frame_min": per_frame.min(1).values, "frame_max": per_frame.max(1).values}
        return r.to(videos.device)

    def score_components(self) -> dict[str, Tensor]:
        return dict(self._last)


def _features(out) -> Tensor:
    """transformers 4 returns the projected embeddings, 5 an output whose ``pooler_output`` they are."""
    return out if torch.is_tensor(out) else out.pooler_output


class _HFCLIPReward(FrameTextReward):
    """A transformers ``CLIPModel`` and its processor (PIL image processor, CLIP tokenizer) from local folders."""

    MODEL_FILES = ["config.json"]

    def __init__(self, path: str, processor_path: str | None, name: str, weight: float, num_frames, aggregate, batch_frames, dtype: str):
        super().__init__(name=name, weight=weight, num_frames=num_frames, aggregate=aggregate, batch_frames=batch_frames)
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        who = type(self).__name__
        processor_path = processor_path or path
        require_files(path, self.MODEL_FILES, who)
        if not any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")):
            raise MissingRewardFileError(f"{who}: no weights in {path!r} (expected model.safetensors or pytorch_model.bin)")
        require_files(processor_path, ["preprocessor_config.json", "vocab.json", "merges.txt"], who)
        self.path, self.processor_path, self.dtype = path, processor_path, _dtype(dtype)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).eval().requires_grad_(False)
        # the PIL image processor: resize (shortest side, bicubic), centre crop, rescale, normalise, as the
        # CLIPImageProcessor of transformers 4 that the reference code ran
        self.image_processor = CLIPImageProcessorPil.from_pretrained(processor_path)
        self.tokenizer = CLIPTokenizer.from_pretrained(processor_path)
        self.max_length = min(int(self.model.config.text_config.max_position_embeddings), 77)

    def to(self, device) -> "RewardCallback":
        super().to(device)
        self.model.to(self.device)
        return self

    def embeddings(self, images: list[np.ndarray], texts: list[str]) -> tuple[Tensor, Tensor]:
        """L2-normalised image and text embeddings ``(N, D)`` (fp32)."""
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        img = _features(self.model.get_image_features(pixel_values=pixels)).float()
        txt = _features(self.model.get_text_features(**tok)).float()
        return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


class CLIPScoreReward(_HFCLIPReward):
    """CLIP score of each frame with the caption, aggregated over frames (:class:`FrameTextReward`).

    ``r = scale · max(cos(E_I(frame), E_T(prefix + caption)), 0)`` averaged over frames. Defaults follow
    torchmetrics' ``CLIPScore`` (``scale = 100``, no prefix; torchmetrics/functional/multimodal/
    clip_score.py), the form T2V evaluations report; Hessel et al. 2021 (CLIPScore, jmhessel/clipscore)
    is ``scale=2.5, prefix="A photo depicts "``. Preprocessing: the model folder's CLIP image processor
    (resize the shortest side to 224 bicubic, centre crop 224, OpenAI CLIP mean/std) and tokenizer
    (77 tokens, truncated). Range ``[0, scale]``.

    Args:
        path: local folder of a transformers ``CLIPModel`` (e.g. openai/clip-vit-large-patch14).
        processor_path: folder of its processor (``preprocessor_config.json``, ``vocab.json``,
            ``merges.txt``); default ``path``.
        name, weight: see :class:`RewardCallback`.
        num_frames, aggregate, batch_frames: frames scored, aggregation, frames per forward.
        scale, prefix: see above.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.

    Raises:
        MissingRewardFileError: a file of the model or processor is missing (named).
    """

    def __init__(self, path: str, processor_path: str | None = None, name: str = "clip_score", weight: float = 1.0, num_frames: int | None = 8,
                 aggregate: str = "mean", batch_frames: int = 32, scale: float = 100.0, prefix: str = "", dtype: str = "float32"):
        super().__init__(path, processor_path, name, weight, num_frames, aggregate, batch_frames, dtype)
        self.scale, self.prefix = float(scale), prefix

    def frame_scores(self, images, texts):
        img, txt = self.embeddings(images, [self.prefix + t for t in texts])
        return self.scale * (img * txt).sum(-1).clamp(min=0)


class PickScoreReward(_HFCLIPReward):
    """PickScore (Kirstain et al. 2023) of each frame with the caption, aggregated over frames.

    Source: yuvalkirstain/PickScore README (inference): processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
    (resize shortest side 224 bicubic, centre crop 224, OpenAI CLIP mean/std; text ``padding=True,
    truncation=True, max_length=77``), model ``yuvalkirstain/PickScore_v1`` (a CLIP ViT-H/14);
    ``score = logit_scale.exp() · cos(E_I, E_T)`` (about 18–24 on real images; flow_grpo divides by 26:
    use ``weight``). Frames aggregated as in :class:`FrameTextReward`.

    Args:
        path: local folder of ``PickScore_v1`` (transformers ``CLIPModel``).
        processor_path: local folder of the ``CLIP-ViT-H-14-laion2B-s32B-b79K`` processor files
            (``preprocessor_config.json``, ``vocab.json``, ``merges.txt``); default ``path``.
        name, weight, num_frames, aggregate, batch_frames, dtype: see :class:`CLIPScoreReward`.

    Raises:
        MissingRewardFileError: a file of the model or processor is missing (named).
    """

    def __init__(self, path: str, processor_path: str | None = None, name: str = "pickscore", weight: float = 1.0, num_frames: int | None = 8,
                 aggregate: str = "mean", batch_frames: int = 32, dtype: str = "float32"):
        super().__init__(path, processor_path, name, weight, num_frames, aggregate, batch_frames, dtype)

    def frame_scores(self, images, texts):
        img, txt = self.embeddings(images, texts)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


class HPSReward(FrameTextReward):
    """HPSv2 / HPSv2.1 (Wu et al. 2023, Human Preference Score v2) of each frame with the caption,
    aggregated over frames (:class:`FrameTextReward`).

    Source: tgxs002/HPSv2 ``hpsv2/img_score.py``: an open_clip ``ViT-H-14`` with the fine-tuned
    ``state_dict`` of ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``; ``preprocess_val`` = resize
    the longest side to 224 (bicubic, aspect kept) and pad to 224×224 with black (open_clip
    ``resize_mode="longest"``, HPSv2's ``resize_longest_max=True``), ``ToTensor``, OpenAI CLIP mean/std;
    text through ``get_tokenizer("ViT-H-14")`` (77 tokens); ``score = diag(f_I · f_Tᵀ)`` with the
    L2-normalised features (a cosine, no logit scale: about 0.2–0.35 on real images).

    Args:
        checkpoint: local HPS checkpoint file (``{"state_dict": ...}`` or a bare state dict).
        arch: open_clip architecture name (``"ViT-H-14"``), or a JSON file of an open_clip model config
            (registered under its file stem; used by the tests' tiny tower).
        name, weight, num_frames, aggregate, batch_frames: see :class:`FrameTextReward`.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (the reference runs under fp16 autocast).

    Raises:
        MissingRewardFileError: the checkpoint (or architecture JSON) is missing.
        RuntimeError: the checkpoint does not fit the architecture (missing / unexpected keys named).
    """

    def __init__(self, checkpoint: str, arch: str = "ViT-H-14", name: str = "hps", weight: float = 1.0, num_frames: int | None = 8,
                 aggregate: str = "mean", batch_frames: int = 32, dtype: str = "float32"):
        super().__init__(name=name, weight=weight, num_frames=num_frames, aggregate=aggregate, batch_frames=batch_frames)
        import open_clip
        from open_clip.transform import image_transform

        who = "HPSReward"
        require_file(checkpoint, who)
        if arch.endswith(".json"):
            require_file(arch, who)
            open_clip.add_model_config(arch)
            arch = os.path.splitext(os.path.basename(arch))[0]
        self.checkpoint, self.arch, self.dtype = checkpoint, arch, _dtype(dtype)
        model = open_clip.create_model(arch, pretrained=None, load_weights=False, output_dict=True)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{who}: checkpoint {checkpoint!r} does not fit open_clip {arch!r}: missing {missing[:8]}, unexpected {unexpected[:8]}")
        self.model = model.to(self.dtype).eval().requires_grad_(False)
        size = model.visual.image_size
        self.transform = image_transform(size, is_train=False, resize_mode="longest", fill_color=0)
        self.tokenizer = open_clip.get_tokenizer(arch)

    def to(self, device) -> "RewardCallback":
        super().to(device)
        self.model.to(self.device)
        return self

    def frame_scores(self, images, texts):
        from PIL import Image

        pixels = torch.stack([self.transform(Image.fromarray(im)) for im in images]).to(self.device, self.dtype)
        tokens = self.tokenizer(texts).to(self.device)
        img = self.model.encode_image(pixels, normalize=True).float()
        txt = self.model.encode_text(tokens, normalize=True).float()
        return (img * txt).sum(-1)
