"""Diffusers folders laid out as the Hugging Face Hub lays out the real checkpoints (issue 32), with random weights.

Each writer makes what a user downloads: ``model_index.json`` naming the real classes (as the Hub file does, e.g.
``UniPCMultistepScheduler``, ``UMT5EncoderModel``, ``T5TokenizerFast``), every component folder with its config and
safetensors weights (the transformers written in shards with an index, as the Hub's are), the real tokenizer classes
built offline with the ``tokenizers`` library (no tokenizer files exist offline: a Unigram/Metaspace tokenizer as
UMT5's, a byte-level BPE with a Qwen chat template as Qwen2.5-VL's, the file-free ``ByT5Tokenizer``), and for
HunyuanVideo 1.5 the ``guider/`` folder with the checkpoint's guidance scale.

Two scales:

- ``"real"``: every component at the real configuration's widths (hidden sizes, heads, MLP sizes, text dimensions,
  VAE channels, latent channels, patch sizes, compression factors, flow shift, guidance, boundary), with fewer layers
  where 24 GB of memory and 2 CPU cores demand it: the transformers 1 block per expert (real: 30-54), the text
  encoders 1 layer (UMT5-XXL 24, ByT5-small 12; Qwen2.5-VL-7B 3 of 28: the pipeline reads its third-to-last hidden state), SigLIP / CLIP ViT-H 1 layer (27 / 32), the SVD UNet
  1 layer per block (2), HunyuanVideo's refiner 1 (2); the text vocabularies are the offline tokenizers' (UMT5 256384,
  Qwen 152064 in the real files). Sources of the values: the diffusers conversion scripts and the Hub configs
  (``memory.REAL_MODELS`` names them for the transformers).
- ``"small"``: the same layout, classes, tokenizers, latent channels and compression factors with every width
  reduced, for the default test suite (seconds per step on CPU).
"""
from __future__ import annotations

import json
import os
import string
from typing import Any

import lightning_vidalign  # noqa: F401  (the torchvision shim before diffusers / transformers import it)
import torch

#: the zoo's model names (``configs/models/<name>.yaml``)
MODELS = ("wan2.1_t2v_1.3b", "wan2.1_t2v_14b", "wan2.2_ti2v_5b", "wan2.2_t2v_a14b", "hunyuanvideo1.5_480p_t2v", "hunyuanvideo1.5_480p_i2v", "svd_xt")

#: a prompt of more than 100 tokens for every tokenizer here (the parity tests)
LONG_PROMPT = (
    "A red vintage car drives slowly along a wet coastal road at dusk while large waves break on the dark rocks below, "
    "the camera follows the car from a low angle, headlights reflect on the wet asphalt, seagulls fly over the water, "
    "a lighthouse blinks in the distance, and a sign by the road reads \"OPEN\" in bright letters as the light fades "
    "and the first stars appear above the calm sea on a quiet evening in late autumn, while a cyclist in a yellow "
    "jacket rides past the car, a dog runs along the beach after a ball, and two fishing boats return slowly to the "
    "harbour with their lights on as the wind grows stronger and the clouds gather over the hills behind the town"
)

_WORDS = sorted({w.strip(",.\"").lower() for w in LONG_PROMPT.split()} | {"a", "dog", "runs", "on", "the", "grass", "cyclist", "rides", "bike"})


def umt5_tokenizer():
    """A ``T5TokenizerFast`` (transformers' T5 tokenizer class) built offline: a Unigram model over whole words, single
    characters and ``▁``-prefixed characters, Metaspace pre-tokenizer, ``</s>`` appended; ids ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2 as UMT5's. Every ASCII text tokenizes (character fallback)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = ["▁" + w for w in _WORDS] + ["▁" + c for c in string.ascii_lowercase] + list(string.ascii_letters + string.digits + string.punctuation) + ["▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - len(p) ** -1) for p in dict.fromkeys(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


#: Qwen2.5-VL's chat template, the part the pipeline uses (system and user text messages, generation prompt)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """A ``Qwen2TokenizerFast`` built offline: byte-level BPE over the 256 byte symbols (no merges), Qwen's special
    tokens ``<|im_start|>`` / ``<|im_end|>`` / ``<|endoftext|>`` (padding) and its chat template, right padding."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    qwen = transformers.Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    qwen.padding_side = "right"
    return qwen


def _seeded(seed: int):
    fork = torch.random.fork_rng(devices=[])
    fork.__enter__()
    torch.manual_seed(seed)
    return fork


def _write_index(path: str, index: dict[str, Any]) -> None:
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _save_model(model, folder: str, shard: bool = True) -> None:
    """``save_pretrained`` in safetensors; ``shard``: several files with an index, as the Hub's large components."""
    if shard:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=max(int(total / 2.5), 1))
    else:
        model.save_pretrained(folder, safe_serialization=True)


# ------------------------------------------------------------------------------------------------ Wan
def _wan_transformer_config(model: str, scale: str, num_layers: int = 1) -> dict[str, Any]:
    common = dict(patch_size=(1, 2, 2), attention_head_dim=128, freq_dim=256, text_dim=4096, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                  eps=1e-6, rope_max_seq_len=1024, num_layers=num_layers)
    real = {"wan2.1_t2v_1.3b": dict(num_attention_heads=12, ffn_dim=8960, in_channels=16, out_channels=16),
            "wan2.1_t2v_14b": dict(num_attention_heads=40, ffn_dim=13824, in_channels=16, out_channels=16),
            "wan2.2_ti2v_5b": dict(num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48),
            "wan2.2_t2v_a14b": dict(num_attention_heads=40, ffn_dim=13824, in_channels=16, out_channels=16)}[model]
    cfg = {**common, **real}
    if scale == "small":
        cfg.update(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=32, freq_dim=64)
    return cfg


def _wan_vae(model: str, scale: str):
    from diffusers import AutoencoderKLWan

    if model == "wan2.2_ti2v_5b":  # Wan 2.2 VAE: 16x in space, 4x in time, 48 channels, residual, 2x2 pixel patchify
        base, dec = (160, 256) if scale == "real" else (16, 16)
        return AutoencoderKLWan(base_dim=base, decoder_base_dim=dec, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                                scale_factor_spatial=16, scale_factor_temporal=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2 if scale == "real" else 1,
                                temperal_downsample=[False, True, True], latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    return AutoencoderKLWan(base_dim=96 if scale == "real" else 16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2 if scale == "real" else 1,
                            temperal_downsample=[False, True, True], latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                                                                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                            latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253,
                                         2.8251, 1.9160])


def write_wan(path: str, model: str, scale: str = "small", seed: int = 0, num_layers: int = 1, dtype: torch.dtype | None = None) -> str:
    """A Wan 2.1 / 2.2 folder as the Hub's ``Wan-AI/<model>-Diffusers`` (module docstring).

    ``num_layers``: transformer blocks per expert (1 here; the real count, e.g. 30 for Wan 2.1 1.3B, for the GPU kit
    ``scripts/gpu_check.py``); ``dtype``: the dtype the transformers are stored in (None: float32)."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    os.makedirs(path, exist_ok=True)
    fork = _seeded(seed)
    try:
        cfg = _wan_transformer_config(model, scale, num_layers)
        _save_model(WanTransformer3DModel(**cfg).to(dtype or torch.float32), os.path.join(path, "transformer"))
        if model == "wan2.2_t2v_a14b":
            _save_model(WanTransformer3DModel(**cfg).to(dtype or torch.float32), os.path.join(path, "transformer_2"))
        _save_model(_wan_vae(model, scale), os.path.join(path, "vae"), shard=False)
        tok = umt5_tokenizer()
        tok.save_pretrained(os.path.join(path, "tokenizer"))
        text = UMT5Config(vocab_size=len(tok), d_model=cfg["text_dim"], d_ff=10240 if scale == "real" else 64, d_kv=64 if scale == "real" else 8,
                          num_heads=64 if scale == "real" else 4, num_layers=1, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                          relative_attention_max_distance=128, scalable_attention=True, is_encoder_decoder=False, tokenizer_class="T5Tokenizer")
        _save_model(UMT5EncoderModel(text), os.path.join(path, "text_encoder"))
    finally:
        fork.__exit__(None, None, None)
    shift = 5.0 if model == "wan2.2_ti2v_5b" else 3.0  # diffusers' convert_wan_to_diffusers.py: TI2V 5.0, else 3.0
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift).save_pretrained(os.path.join(path, "scheduler"))
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0.dev0", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    if model == "wan2.2_ti2v_5b":
        index.update(boundary_ratio=None, expand_timesteps=True, transformer_2=[None, None])
    if model == "wan2.2_t2v_a14b":
        index.update(boundary_ratio=0.875, transformer_2=["diffusers", "WanTransformer3DModel"])
    _write_index(path, index)
    return path


# ---------------------------------------------------------------------------------------- HunyuanVideo 1.5
def write_hunyuan15(path: str, model: str, scale: str = "small", seed: int = 0) -> str:
    """A HunyuanVideo 1.5 folder as ``hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_{t2v,i2v}`` (module docstring)."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel

    i2v = model.endswith("i2v")
    real = scale == "real"
    os.makedirs(path, exist_ok=True)
    fork = _seeded(seed)
    try:
        latent = 32 if real else 8
        tcfg = dict(in_channels=2 * latent + 1, out_channels=latent, num_attention_heads=16 if real else 4, attention_head_dim=128 if real else 16,
                    num_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                    text_embed_dim=3584 if real else 32, text_embed_2_dim=1472 if real else 32, image_embed_dim=1152 if real else 32,
                    rope_theta=256.0, rope_axes_dim=(16, 56, 56) if real else (4, 6, 6), target_size=640, task_type="i2v" if i2v else "t2v", use_meanflow=False)
        _save_model(HunyuanVideo15Transformer3DModel(**tcfg), os.path.join(path, "transformer"))
        vae = AutoencoderKLHunyuanVideo15(latent_channels=latent, block_out_channels=(128, 256, 512, 1024, 1024) if real else (16, 16, 32, 32, 32),
                                          layers_per_block=2 if real else 1, spatial_compression_ratio=16, temporal_compression_ratio=4,
                                          scaling_factor=1.03682)
        _save_model(vae, os.path.join(path, "vae"), shard=real)
        qwen = qwen_tokenizer()
        qwen.save_pretrained(os.path.join(path, "tokenizer"))
        qcfg = Qwen2_5_VLTextConfig(vocab_size=len(qwen), hidden_size=tcfg["text_embed_dim"], intermediate_size=18944 if real else 64, num_hidden_layers=3,
                                    num_attention_heads=28 if real else 4, num_key_value_heads=4 if real else 2, rope_theta=1e6,
                                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24] if real else [2, 1, 1]}, max_position_embeddings=4096,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
        # 3 layers: the pipeline reads hidden_states[-3] (num_hidden_layers_to_skip=2): the embedding output with 2 layers
        # would skip every layer; the real model has 28
        _save_model(Qwen2_5_VLTextModel(qcfg), os.path.join(path, "text_encoder"))
        ByT5Tokenizer().save_pretrained(os.path.join(path, "tokenizer_2"))
        t5 = T5Config(vocab_size=384, d_model=tcfg["text_embed_2_dim"], d_ff=3584 if real else 64, d_kv=64 if real else 8, num_heads=6 if real else 4,
                      num_layers=1, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
        _save_model(T5EncoderModel(t5), os.path.join(path, "text_encoder_2"), shard=False)
        if i2v:
            sig = SiglipVisionConfig(hidden_size=tcfg["image_embed_dim"], intermediate_size=4304 if real else 64, num_hidden_layers=1,
                                     num_attention_heads=16 if real else 2, image_size=384 if real else 32, patch_size=14 if real else 8)
            _save_model(SiglipVisionModel(sig), os.path.join(path, "image_encoder"), shard=False)
            size = 384 if real else 32
            SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(os.path.join(path, "feature_extractor"))
    finally:
        fork.__exit__(None, None, None)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0).save_pretrained(os.path.join(path, "scheduler"))
    ClassifierFreeGuidance(guidance_scale=6.0).save_pretrained(os.path.join(path, "guider"))
    index = {"_class_name": "HunyuanVideo15ImageToVideoPipeline" if i2v else "HunyuanVideo15Pipeline", "_diffusers_version": "0.36.0.dev0",
             "guider": ["diffusers", "ClassifierFreeGuidance"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen2_5_VLTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "Qwen2TokenizerFast"], "tokenizer_2": ["transformers", "ByT5Tokenizer"],
             "transformer": ["diffusers", "HunyuanVideo15Transformer3DModel"], "vae": ["diffusers", "AutoencoderKLHunyuanVideo15"]}
    if i2v:
        index.update(image_encoder=["transformers", "SiglipVisionModel"], feature_extractor=["transformers", "SiglipImageProcessor"])
    _write_index(path, index)
    return path


# ------------------------------------------------------------------------------------------------ SVD
def write_svd_xt(path: str, scale: str = "small", seed: int = 0) -> str:
    """An SVD-XT folder as ``stabilityai/stable-video-diffusion-img2vid-xt`` (module docstring)."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    real = scale == "real"
    os.makedirs(path, exist_ok=True)
    fork = _seeded(seed)
    try:
        unet = UNetSpatioTemporalConditionModel(
            sample_size=96, in_channels=8, out_channels=4, block_out_channels=(320, 640, 1280, 1280) if real else (32, 32, 64, 64),
            layers_per_block=1, cross_attention_dim=1024 if real else 32, num_attention_heads=(5, 10, 20, 20) if real else (2, 2, 4, 4),
            transformer_layers_per_block=1, addition_time_embed_dim=256 if real else 8, projection_class_embeddings_input_dim=768 if real else 24, num_frames=25)
        _save_model(unet, os.path.join(path, "unet"), shard=False)
        vae = AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512) if real else (32, 32, 64, 64), layers_per_block=2 if real else 1,
                                           down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4, scaling_factor=0.18215, sample_size=768)
        _save_model(vae, os.path.join(path, "vae"), shard=False)
        clip = CLIPVisionConfig(hidden_size=1280 if real else 32, intermediate_size=5120 if real else 64, num_hidden_layers=1,
                                num_attention_heads=16 if real else 2, image_size=224, patch_size=14, projection_dim=1024 if real else 32)
        _save_model(CLIPVisionModelWithProjection(clip), os.path.join(path, "image_encoder"), shard=False)
    finally:
        fork.__exit__(None, None, None)
    CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}, do_center_crop=True,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(
        os.path.join(path, "feature_extractor"))
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
                           interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading",
                           steps_offset=1).save_pretrained(os.path.join(path, "scheduler"))
    _write_index(path, {"_class_name": "StableVideoDiffusionPipeline", "_diffusers_version": "0.24.0.dev0",
                        "feature_extractor": ["transformers", "CLIPImageProcessor"], "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
                        "vae": ["diffusers", "AutoencoderKLTemporalDecoder"]})
    return path


def write_model(path: str, model: str, scale: str = "small", seed: int = 0) -> str:
    """The real-layout folder of a zoo model (:data:`MODELS`) at ``scale`` under ``path``; returns ``path``."""
    if model.startswith("wan"):
        return write_wan(path, model, scale, seed)
    if model.startswith("hunyuan"):
        return write_hunyuan15(path, model, scale, seed)
    if model == "svd_xt":
        return write_svd_xt(path, scale, seed)
    raise ValueError(f"unknown model {model!r}; one of {MODELS}")
