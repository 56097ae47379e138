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


# ------------------------------------------------------------------------------ VideoAlign
VIDEOALIGN_SPECIAL_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
# qwen-vl-utils / VideoAlign vision_process.py constants
_FRAME_FACTOR, _IMAGE_FACTOR = 2, 28
_FPS_MIN_FRAMES, _FPS_MAX_FRAMES = 4, 768
_VIDEO_MIN_PIXELS = 128 * 28 * 28


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def qwen_smart_resize(height: int, width: int, factor: int = _IMAGE_FACTOR, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """qwen-vl-utils ``smart_resize``: sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``,
    aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise RewardInputError(f"aspect ratio must be below 200, got {height}x{width}")
    h = max(factor, _round_by(height, factor))
    w = max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_num_frames(total: int, video_fps: float | None, fps: float | None, nframes: int | None) -> int:
    """qwen-vl-utils ``smart_nframes``: ``nframes`` rounded to even, or ``total / video_fps · fps``
    clamped to ``[4, min(768, total)]`` and rounded to even; at most ``total``."""
    if nframes is not None:
        n = _round_by(nframes, _FRAME_FACTOR)
    else:
        if video_fps is None:
            raise ValueError("VideoAlignReward: the scored videos' frame rate is needed (video_fps=, or batch['fps']) to sample at the checkpoint's fps")
        lo = math.ceil(_FPS_MIN_FRAMES / _FRAME_FACTOR) * _FRAME_FACTOR
        hi = math.floor(min(_FPS_MAX_FRAMES, total) / _FRAME_FACTOR) * _FRAME_FACTOR
        n = _round_by(min(max(total / video_fps * fps, lo), hi), _FRAME_FACTOR)
    n = min(n, total)
    if not _FRAME_FACTOR <= n <= total:
        raise RewardInputError(f"VideoAlignReward: {total} frames cannot give an even frame count >= {_FRAME_FACTOR} (got {n}); videos need >= 2 frames")
    return n


def _legacy_key(k: str) -> str | None:
    """A state-dict key of VideoAlign's ``Qwen2VLRewardModelBT`` (transformers 4: ``visual.*``,
    ``model.*`` the text model; or transformers 5 names) → our :class:`VideoRewardModel` key (None: unused)."""
    for p in ("base_model.model.", "module."):
        if k.startswith(p):
            k = k[len(p):]
    if k.startswith("lm_head."):
        return None
    if k.startswith("rm_head."):
        return k
    if k.startswith("visual."):
        return "model." + k
    if k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + k[len("model."):]
    return k


class VideoRewardModel(torch.nn.Module):
    """Qwen2-VL with VideoAlign's linear reward head (``Qwen2VLRewardModelBT`` of KwaiVGI/VideoAlign).

    As the reference's ``forward``: visual tokens scattered into the text embeddings, the text model run
    with *1-D* positions ``arange(L)`` on all three M-RoPE axes (the reference calls the text model with
    ``position_ids=None``, which transformers 4 filled that way; Qwen2-VL's own 3-D video positions are
    not used), ``rm_head`` on the last hidden states, pooled at the reward tokens (``"special"``: the
    three ``<|VQ/MQ/TA_reward|>`` tokens, diagonal when ``output_dim == 3``), the last non-pad token
    (``"last"``) or the mean.
    """

    def __init__(self, model, output_dim: int, reward_token: str, special_token_ids: list[int] | None, pad_token_id: int | None):
        super().__init__()
        self.model = model
        hidden = model.config.text_config.hidden_size
        self.rm_head = torch.nn.Linear(hidden, output_dim, bias=False)
        self.output_dim, self.special_token_ids, self.pad_token_id = output_dim, special_token_ids, pad_token_id
        self.reward_token = "special" if special_token_ids is not None else reward_token

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values_videos: Tensor, video_grid_thw: Tensor, **_) -> Tensor:
        b, n = input_ids.shape
        positions = torch.arange(n, device=input_ids.device).view(1, 1, n).expand(3, b, n)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, use_cache=False).last_hidden_state
        logits = self.rm_head(hidden)
        if self.reward_token == "special":
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for t in self.special_token_ids:
                mask |= input_ids == t
            if int(mask.sum()) != 3 * b:
                raise RewardInputError(f"VideoAlignReward: expected the 3 reward tokens once per prompt, found {int(mask.sum())} in {b} prompts (prompt template without them?)")
            pooled = logits[mask].view(b, 3, -1)
            return (pooled.diagonal(dim1=1, dim2=2) if self.output_dim == 3 else pooled).reshape(b, -1)
        if self.pad_token_id is None:
            last = torch.full((b,), -1, device=input_ids.device)
        else:
            last = (torch.eq(input_ids, self.pad_token_id).int().argmax(-1) - 1) % n
        if self.reward_token == "last":
            return logits[torch.arange(b, device=logits.device), last]
        if self.reward_token == "mean":
            length = last.clamp(0, n - 1)
            return torch.stack([logits[i, : length[i]].mean(0) for i in range(b)])
        raise ValueError(f"VideoAlignReward: unknown reward_token {self.reward_token!r}")


class VideoAlignReward(RewardCallback):
    """VideoAlign / VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback"):
    visual quality (VQ), motion quality (MQ) and text alignment (TA) of a video from Qwen2-VL-2B with a
    reward head, and their weighted sum.

    Source: KwaiVGI/VideoAlign ``inference.py`` (``VideoVLMRewardInference``), ``prompt_template.py``,
    ``vision_process.py`` (qwen-vl-utils) and ``trainer.py`` (``Qwen2VLRewardModelBT``), reproduced:

    - the checkpoint folder's ``model_config.json``: ``data_config`` (``fps`` 2.0 or ``num_frames``,
      ``max_frame_pixels``, ``eval_dim``, ``prompt_template_type``), ``model_config`` (base model,
      ``output_dim``, ``use_special_tokens``, ``reward_token``), ``inference_config`` (per-head mean/std);
      weights in ``checkpoint-<step>/`` (latest by default): ``model.pth`` (full state dict) or a LoRA
      (``adapter_model.safetensors`` + ``adapter_config.json`` + ``non_lora_state_dict.pth``) on the base
      model, merged into the weights here (the same function as the unmerged adapter);
    - frames: ``nframes`` = the video's duration × ``fps`` (2 by default) clamped to ``[4, min(768, T)]``
      and rounded to even (or ``num_frames`` rounded to even), taken at ``round(linspace(0, T-1, n))``;
      each frame resized with ``smart_resize`` (sides multiples of 28, area in
      ``[128·28², max_frame_pixels]``), bicubic with antialias on 0–255 values, rounded to uint8 as
      torchvision does on the decoded uint8 frames; then the base model's Qwen2-VL processor (rescale
      1/255, CLIP mean/std, 14-pixel patches, 2-frame temporal patches). Our videos are tensors: no codec
      round trip (the reference decodes an mp4);
    - text: ``build_prompt(caption, eval_dim, prompt_template_type)`` (e.g. ``"detailed_special"`` with
      the three reward tokens) as the user turn after the video, the processor's chat template with the
      generation prompt, right padding;
    - scores: the pooled logits ``(VQ, MQ, TA)``; ``use_norm``: ``(x - mean) / std`` per head from
      ``inference_config``; the reference's ``Overall = VQ + MQ + TA`` is ``weights=(1, 1, 1)`` here.

    Args:
        path: local VideoReward folder (``model_config.json``, ``checkpoint-*/``).
        base_model: local folder of the base Qwen2-VL (``config.json``, processor and tokenizer files;
            weights too when the checkpoint is a LoRA); default ``model_config.model_name_or_path``.
        checkpoint_step: ``checkpoint-<step>`` to load (-1: the latest, as the reference).
        name, weight: see :class:`RewardCallback`.
        weights: ``(w_VQ, w_MQ, w_TA)`` of the returned sum.
        use_norm: de-normalise as the reference's ``use_norm=True``.
        video_fps: frame rate of the scored videos (for fps-based frame sampling); ``batch["fps"]`` wins.
        batch_size: videos per forward.
        dtype: ``"float32"`` (default), ``"bfloat16"`` (the reference's default on GPU) or ``"float16"``.

    Raises:
        MissingRewardFileError: ``model_config.json``, a checkpoint folder or file, or a base-model file is missing.
        NonFiniteRewardError: non-finite scores.
    """

    def __init__(self, path: str, base_model: str | None = None, checkpoint_step: int = -1, name: str = "videoalign", weight: float = 1.0,
                 weights: tuple[float, float, float] | list[float] = (1.0, 1.0, 1.0), use_norm: bool = True, video_fps: float | None = None,
                 batch_size: int = 4, dtype: str = "float32"):
        super().__init__(name=name, weight=weight)
        from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLModel

        who = "VideoAlignReward"
        require_files(path, ["model_config.json"], who)
        cfg = json.load(open(os.path.join(path, "model_config.json")))
        for key in ("data_config", "model_config"):
            if key not in cfg:
                raise KeyError(f"{who}: {os.path.join(path, 'model_config.json')} has no {key!r} (keys {sorted(cfg)})")
        self.data_config, model_config = cfg["data_config"], cfg["model_config"]
        if self.data_config.get("sample_type", "uniform") != "uniform":
            raise NotImplementedError(f"{who}: data_config.sample_type {self.data_config['sample_type']!r} (only 'uniform', VideoReward's, is reproduced)")
        self.inference_config = cfg.get("inference_config")
        self.peft_config = cfg.get("peft_lora_config") or {}
        if len(weights) != 3:
            raise ValueError(f"{who}: weights must be (w_VQ, w_MQ, w_TA), got {weights}")
        self.weights, self.use_norm, self.video_fps = [float(w) for w in weights], use_norm, video_fps
        self.batch_size, self.dtype = max(1, int(batch_size)), _dtype(dtype)

        # checkpoint-<step>: the latest, or the one asked for
        steps = sorted(int(d.split("-")[-1]) for d in os.listdir(path) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit())
        if not steps:
            raise MissingRewardFileError(f"{who}: no checkpoint-<step> folder in {path!r}")
        step = steps[-1] if checkpoint_step in (None, -1) else checkpoint_step
        ckpt = os.path.join(path, f"checkpoint-{step}")
        if step not in steps:
            raise MissingRewardFileError(f"{who}: {ckpt!r} does not exist (have checkpoint-{steps})")
        full = os.path.join(ckpt, "model.pth")
        if not os.path.exists(full):
            require_files(ckpt, ["adapter_model.safetensors", "adapter_config.json", "non_lora_state_dict.pth"], who + " (LoRA checkpoint; or a full model.pth)")
        self.path, self.checkpoint = path, ckpt

        base = base_model or model_config.get("model_name_or_path")
        if not base or not os.path.isdir(base):
            raise MissingRewardFileError(f"{who}: base model folder {base!r} does not exist (model_config.model_name_or_path; give base_model= a local Qwen2-VL folder)")
        require_files(base, ["config.json"], who)
        if not any(os.path.exists(os.path.join(base, f)) for f in ("preprocessor_config.json", "processor_config.json")):
            raise MissingRewardFileError(f"{who}: no processor in {base!r} (expected preprocessor_config.json or processor_config.json)")
        if not any(os.path.exists(os.path.join(base, f)) for f in ("tokenizer.json", "vocab.json")):
            raise MissingRewardFileError(f"{who}: no tokenizer in {base!r} (expected tokenizer.json or vocab.json + merges.txt)")
        self.base_model = base
        self.processor = AutoProcessor.from_pretrained(base, padding_side="right")
        tok = self.processor.tokenizer
        special = None
        if model_config.get("use_special_tokens", False):
            tok.add_tokens(VIDEOALIGN_SPECIAL_TOKENS, special_tokens=True)
            special = tok.convert_tokens_to_ids(VIDEOALIGN_SPECIAL_TOKENS)

        if os.path.exists(full):  # every weight in the checkpoint: the base model's weights are not needed
            backbone = Qwen2VLModel(Qwen2VLConfig.from_pretrained(base))
        else:
            if not any(os.path.exists(os.path.join(base, f)) for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
                raise MissingRewardFileError(f"{who}: the LoRA checkpoint {ckpt!r} needs the base model's weights, none in {base!r} (model.safetensors)")
            backbone = Qwen2VLModel.from_pretrained(base, dtype=torch.float32)
        if special is not None:
            backbone.resize_token_embeddings(len(tok))  # as the reference: model.resize_token_embeddings(len(tokenizer))
        model = VideoRewardModel(backbone, int(model_config.get("output_dim", 1)), model_config.get("reward_token", "last"), special, tok.pad_token_id)
        self._load(model, full if os.path.exists(full) else None, ckpt, who)
        self.model = model.to(self.dtype).eval().requires_grad_(False)
        self._last: dict[str, Tensor] = {}

    @staticmethod
    def _load(model: VideoRewardModel, full: str | None, ckpt: str, who: str) -> None:
        if full is not None:
            raw = torch.load(full, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            raw = torch.load(os.path.join(ckpt, "non_lora_state_dict.pth"), map_location="cpu", weights_only=True)
            lora = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
            adapter = json.load(open(os.path.join(ckpt, "adapter_config.json")))
            VideoAlignReward._merge_lora(model, lora, adapter, who)
        state = {}
        for k, v in raw.items():
            if ".lora_" in k:
                continue
            k = _legacy_key(k.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".").replace(".original_module.", "."))
            if k is not None:
                state[k] = v
        own = model.state_dict()
        unexpected = sorted(k for k in state if k not in own)
        wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
        if unexpected or wrong:
            raise RuntimeError(f"{who}: checkpoint {ckpt!r} does not fit the base model: unexpected keys {unexpected[:8]}, wrong shapes {wrong[:8]}")
        if full is not None:
            missing = sorted(k for k in own if k not in state and not k.endswith("inv_freq"))
            if missing:
                raise RuntimeError(f"{who}: {full!r} lacks weights {missing[:8]} ({len(missing)} in all)")
        elif "rm_head.weight" not in state:
            raise RuntimeError(f"{who}: {os.path.join(ckpt, 'non_lora_state_dict.pth')!r} has no rm_head weight")
        model.load_state_dict(state, strict=False)

    @staticmethod
    def _merge_lora(model: VideoRewardModel, lora: dict[str, Tensor], adapter: dict, who: str) -> None:
        """``W += s · B A`` (embeddings: ``(B A)ᵀ``), ``s = alpha / r`` (``alpha / √r`` with rsLoRA): peft's merge."""
        r, alpha = adapter["r"], adapter["lora_alpha"]
        s = alpha / math.sqrt(r) if adapter.get("use_rslora") else alpha / r
        modules = dict(model.named_modules())
        for key in [k for k in lora if ".lora_A." in k or ".lora_embedding_A" in k]:
            emb = ".lora_embedding_A" in key
            prefix = key.split(".lora_embedding_A" if emb else ".lora_A.")[0]
            a = lora[key]
            bkey = prefix + (".lora_embedding_B" + key.split(".lora_embedding_A")[1] if emb else ".lora_B." + key.split(".lora_A.")[1])
            if bkey not in lora:
                raise RuntimeError(f"{who}: LoRA {key!r} without its {bkey!r}")
            target = _legacy_key(prefix)
            if target not in modules:
                raise RuntimeError(f"{who}: LoRA target {prefix!r} (ours {target!r}) is not a module of the base model")
            w = modules[target].weight
            delta = (lora[bkey].float() @ a.float()) * s
            with torch.no_grad():
                w += (delta.T if emb else delta).to(w.dtype)

    def to(self, device) -> "RewardCallback":
        super().to(device)
        self.model.to(self.device)
        return self

    def prompt(self, caption: str) -> str:
        """VideoAlign's ``build_prompt(caption, eval_dim, prompt_template_type)``."""
        return videoalign_prompt(caption, self.data_config.get("eval_dim", "VQ"), self.data_config.get("prompt_template_type", "none"))

    def frames(self, video: Tensor, video_fps: float | None) -> Tensor:
        """One video ``(T, 3, H, W)`` in ``[0, 1]`` → the frames the reference feeds the processor:
        ``(n, 3, h, w)`` float in ``[0, 255]`` (uint8 values)."""
        t, _, h, w = video.shape
        n = qwen_num_frames(t, video_fps, self.data_config.get("fps", 2.0), self.data_config.get("num_frames"))
        idx = torch.linspace(0, t - 1, n).round().long()
        x = (video[idx].clamp(0, 1) * 255).round()  # the decoded uint8 frames
        rh, rw = qwen_smart_resize(h, w, min_pixels=_VIDEO_MIN_PIXELS, max_pixels=int(self.data_config.get("max_frame_pixels", 16384 * 28 * 28)))
        x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0, 255).round()

    @torch.no_grad()
    def score_heads(self, videos: Tensor, captions: list[str], video_fps: float | None = None) -> Tensor:
        """``(B, 3)`` VQ, MQ, TA (de-normalised when ``use_norm``)."""
        video_fps = video_fps if video_fps is not None else self.video_fps
        out = []
        for i in range(0, videos.shape[0], self.batch_size):
            vids = [self.frames(v, video_fps) for v in videos[i : i + self.batch_size]]
            caps = captions[i : i + self.batch_size]
            chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": self.prompt(c)}]}] for c in caps]
            text = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
            inputs = self.processor(text=text, videos=vids, padding=True, return_tensors="pt", do_rescale=True, cap_pixels_per_frame=False)
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")}
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
            out.append(self.model(**inputs).float().cpu())
        heads = torch.cat(out)
        if heads.shape[1] != 3:
            raise RewardInputError(f"VideoAlignReward: the model gives {heads.shape[1]} scores per video, expected 3 (VQ, MQ, TA): check model_config output_dim / reward_token")
        if self.use_norm and self.inference_config:
            ic = self.inference_config
            heads = (heads - torch.tensor([ic["VQ_mean"], ic["MQ_mean"], ic["TA_mean"]])) / torch.tensor([ic["VQ_std"], ic["MQ_std"], ic["TA_std"]])
        return heads

    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        v = check_videos(videos, "VideoAlignReward")
        caps = batch_captions(batch, v.shape[0], "VideoAlignReward")
        fps = batch.get("fps") if isinstance(batch, dict) else None
        if torch.is_tensor(fps):
            fps = float(fps.flatten()[0])
        heads = check_finite(self.score_heads(v, caps, fps), "VideoAlignReward")
        self._last = {"VQ": heads[:, 0], "MQ": heads[:, 1], "TA": heads[:, 2], "overall": heads.sum(1)}
        return (heads @ torch.tensor(self.weights)).to(videos.device)

    def score_components(self) -> dict[str, Tensor]:
        return dict(self._last)


_VA_DIMENSIONS = {
    "VQ": ["visual quality", "the quality of the video in terms of clearness, resolution, brightness, and color"],
    "TA": ["text-to-video alignment", "the alignment between the text prompt and the video content and motion"],
    "MQ": ["motion quality", "the quality of the motion in terms of consistency, smoothness, and completeness"],
    "ALL": ["Overall Performance", "the overall performance of the video in terms of visual quality, text-to-video alignment, and motion quality"],
}
# KwaiVGI/VideoAlign prompt_template.py, verbatim (the reward was trained on these exact strings)
_VA_SIMPLE = '\nPlease evaluate the {dimension_name} of a generated video. Consider {dimension_description}.\nThe text prompt used for generation is "{text_prompt}".\n'
_VA_VIDEOSCORE = (
    "\nSuppose you are an expert in judging and evaluating the quality of AI-generated videos,\n"
    "please watch the frames of a given video and see the text prompt for generating the video,\n"
    "then give scores based on its {dimension_name}, i.e., {dimension_description}.\n"
    "Output a float number from 1.0 to 5.0 for this dimension,\n"
    "the higher the number is, the better the video performs in that sub-score,\n"
    "the lowest 1.0 means Bad, the highest 5.0 means Perfect/Real (the video is like a real video).\n"
    'The text prompt used for generation is "{text_prompt}".\n'
)
_VA_HEAD = (
    "\nYou are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. "
    "Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.\n\n"
)
_VA_VQ = (
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n"
)
_VA_MQ = (
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.\n"
)
_VA_TA = (
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.\n\n"
    "Textual prompt - {text_prompt}\n"
)
_VA_DETAILED_SPECIAL = (
    _VA_HEAD + _VA_VQ + "\nPlease provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n" + _VA_MQ + "\nPlease provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n\n"
    + _VA_TA + "Please provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
)
_VA_DETAILED = _VA_HEAD + _VA_VQ + "\n" + _VA_MQ + "\n\n" + _VA_TA + "Please provide the ratings of Visual Quality, Motion Quality, and Text Alignment.\n"


def videoalign_prompt(prompt: str, dimension, template_type: str) -> str:
    """VideoAlign's ``build_prompt`` (KwaiVGI/VideoAlign prompt_template.py): the text of the user turn."""
    if isinstance(dimension, list) and len(dimension) > 1:
        name = "overall performance(" + ", ".join(_VA_DIMENSIONS[d][0] for d in dimension) + ")"
        description = "the overall performance of the video"
    else:
        if isinstance(dimension, list):
            dimension = dimension[0]
        name, description = _VA_DIMENSIONS[dimension]
    if template_type == "none":
        return prompt
    if template_type == "simple":
        return _VA_SIMPLE.format(dimension_name=name, dimension_description=description, text_prompt=prompt)
    if template_type == "video_score":
        return _VA_VIDEOSCORE.format(dimension_name=name, dimension_description=description, text_prompt=prompt)
    if template_type == "detailed_special":
        return _VA_DETAILED_SPECIAL.format(text_prompt=prompt)
    if template_type == "detailed":
        return _VA_DETAILED.format(text_prompt=prompt)
    raise ValueError(f"VideoAlignReward: unknown prompt_template_type {template_type!r} (none, simple, video_score, detailed_special, detailed)")


# ------------------------------------------------------------------------------ VLM judge over HTTP
class VLMJudgeParseError(ValueError):
    """A judge's reply holds no score the parser can read (or one outside ``score_range``)."""


class VLMJudgeRequestError(RuntimeError):
    """The judge endpoint failed (timeout, connection refused, HTTP error, malformed response) on every
    one of its bounded attempts."""


VLM_JUDGE_PROMPT = (
    "You are given {num_frames} frames sampled uniformly, in order, from a generated video, and the text prompt it was generated from.\n"
    "Text prompt: \"{caption}\"\n"
    "Rate how well the video matches the prompt and how good its visual and motion quality are, on a scale from 1 (worst) to 10 (best).\n"
    "Answer with one line of the form \"Score: <number>\"."
)


class VLMJudgeReward(RewardCallback):
    """A vision-language model judge behind any OpenAI-compatible chat-completions endpoint (vLLM,
    SGLang, LMDeploy, a hosted API), e.g. Qwen2.5-VL-7B/72B or UnifiedReward served by ``vllm serve``.

    Per video, one ``POST {base_url}/chat/completions`` with ``model``, ``temperature``, ``max_tokens``
    and one user message: the prompt (``prompt_template`` formatted with ``caption`` and ``num_frames``)
    followed by ``num_frames`` frames spread uniformly over the video (:func:`frame_indices`) as
    ``image_url`` parts holding ``data:image/<fmt>;base64,...`` (uint8 frames, optionally resized so the
    longest side is ``max_side``; PNG is lossless, JPEG ~10x smaller) — the OpenAI vision message
    format, which vLLM serves for multi-image models (raise its ``--limit-mm-per-prompt``). The reply's
    ``choices[0].message.content`` is parsed with ``score_pattern`` (first group, a number); a reply
    without a match, or with a score outside ``score_range``, raises :class:`VLMJudgeParseError` (no
    reward is made up). Transport failures (timeout, refused connection, HTTP 429/5xx, a body that is
    not a chat completion) are retried ``max_retries`` times with ``retry_backoff·2^k`` s waits, then
    raise :class:`VLMJudgeRequestError`; other HTTP errors (4xx) raise at once. Videos are sent
    ``concurrency`` at a time; scores keep the videos' order. The prompt and scale are our choice (the
    peers' judge prompts differ per judge: pass yours).

    Args:
        base_url: endpoint root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name.
        name, weight: see :class:`RewardCallback`.
        prompt_template: text with ``{caption}`` (and optionally ``{num_frames}``).
        system_prompt: optional system message.
        num_frames: frames sent per video.
        max_side: resize frames so the longest side is at most this (None: as generated).
        image_format: ``"png"`` or ``"jpeg"``.
        score_pattern: regular expression whose first group is the score (case-insensitive).
        score_range: ``(lo, hi)`` accepted scores, or None.
        timeout: seconds per request. max_retries: extra attempts after a transport failure.
        retry_backoff: first wait in seconds between attempts (doubling).
        temperature, max_tokens: sampling settings sent with each request.
        api_key_env: name of an environment variable holding a bearer token (None: no header).
        concurrency: requests in flight at once.
    """

    def __init__(self, base_url: str, model: str, name: str = "vlm_judge", weight: float = 1.0, prompt_template: str = VLM_JUDGE_PROMPT,
                 system_prompt: str | None = None, num_frames: int = 8, max_side: int | None = None, image_format: str = "png",
                 score_pattern: str = r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", score_range: tuple[float, float] | list[float] | None = (1.0, 10.0),
                 timeout: float = 60.0, max_retries: int = 2, retry_backoff: float = 0.5, temperature: float = 0.0, max_tokens: int = 32,
                 api_key_env: str | None = None, concurrency: int = 4):
        super().__init__(name=name, weight=weight)
        import re

        if "{caption}" not in prompt_template:
            raise ValueError("VLMJudgeReward: prompt_template must contain {caption}")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"VLMJudgeReward: image_format must be 'png' or 'jpeg', got {image_format!r}")
        if max_retries < 0 or timeout <= 0 or num_frames < 1:
            raise ValueError(f"VLMJudgeReward: need max_retries >= 0, timeout > 0, num_frames >= 1 (got {max_retries}, {timeout}, {num_frames})")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.prompt_template, self.system_prompt = model, prompt_template, system_prompt
        self.num_frames, self.max_side, self.image_format = int(num_frames), max_side, image_format
        self.pattern = re.compile(score_pattern, re.IGNORECASE)
        self.score_range = tuple(score_range) if score_range is not None else None
        self.timeout, self.max_retries, self.retry_backoff = float(timeout), int(max_retries), float(retry_backoff)
        self.temperature, self.max_tokens, self.api_key_env, self.concurrency = temperature, max_tokens, api_key_env, max(1, int(concurrency))
        self.last_replies: list[str] = []  # the judge's replies of the last score call, in the videos' order

    def encode_frame(self, frame: np.ndarray) -> str:
        """``(H, W, 3)`` uint8 → a ``data:`` URL."""
        import base64
        import io

        from PIL import Image

        img = Image.fromarray(frame)
        if self.max_side and max(img.size) > self.max_side:
            s = self.max_side / max(img.size)
            img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format=self.image_format.upper(), **({"quality": 95} if self.image_format == "jpeg" else {}))
        return f"data:image/{self.image_format};base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def request_body(self, frames: np.ndarray, caption: str) -> dict:
        text = self.prompt_template.format(caption=caption, num_frames=len(frames))
        content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": self.encode_frame(f)}} for f in frames]
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [{"role": "user", "content": content}]
        return {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def parse(self, reply: str) -> float:
        """The score in ``reply``. Raises :class:`VLMJudgeParseError` (no match, out of range) or
        :class:`NonFiniteRewardError`."""
        m = self.pattern.search(reply or "")
        if m is None:
            raise VLMJudgeParseError(f"VLMJudgeReward: no score matching {self.pattern.pattern!r} in the reply {reply[:300]!r}")
        value = float(m.group(1))
        if not math.isfinite(value):
            raise NonFiniteRewardError(f"VLMJudgeReward: non-finite score in the reply {reply[:300]!r}")
        if self.score_range is not None and not self.score_range[0] <= value <= self.score_range[1]:
            raise VLMJudgeParseError(f"VLMJudgeReward: score {value} outside {list(self.score_range)} in the reply {reply[:300]!r}")
        return value

    def post(self, body: dict) -> str:
        """One chat completion with bounded retries; returns the reply text."""
        import time
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = "Bearer " + os.environ[self.api_key_env]
        errors = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode())
                return payload["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode(errors="replace")
                if e.code != 429 and e.code < 500:
                    raise VLMJudgeRequestError(f"VLMJudgeReward: {self.url} answered HTTP {e.code}: {detail}") from e
                errors.append(f"HTTP {e.code}")
            except (TimeoutError, OSError) as e:  # socket timeouts, refused connections (URLError is an OSError)
                reason = getattr(e, "reason", e)
                errors.append("timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else f"{type(reason).__name__}: {reason}")
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON / not a chat completion
                errors.append(f"malformed response ({type(e).__name__}: {e})")
        raise VLMJudgeRequestError(f"VLMJudgeReward: {self.url} failed {self.max_retries + 1} times (timeout {self.timeout} s): {errors}")

    def score_one(self, frames: np.ndarray, caption: str) -> tuple[float, str]:
        reply = self.post(self.request_body(frames, caption))
        return self.parse(reply), reply

    @torch.no_grad()
    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        from concurrent.futures import ThreadPoolExecutor

        v = check_videos(videos, "VLMJudgeReward")
        caps = batch_captions(batch, v.shape[0], "VLMJudgeReward")
        frames = to_uint8(v[:, frame_indices(v.shape[1], self.num_frames)])
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(caps))) as pool:
            results = list(pool.map(self.score_one, list(frames), caps))
        self.last_replies = [r for _, r in results]
        scores = check_finite(torch.tensor([s for s, _ in results], dtype=torch.float32), "VLMJudgeReward")
        return scores.to(videos.device)
