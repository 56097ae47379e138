"""Stable Video Diffusion (image-to-video, EDM v-prediction) as a :class:`VideoBackbone`.

Follows diffusers' ``StableVideoDiffusionPipeline`` for conditioning and sampling and the SVD
fine-tuning practice for training (DESIGN §2, "Family details").
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import Tensor

from lightning_vidalign.backbones.base import (
    FOLDER_DEFAULTS_KEY,
    VideoBackbone,
    export_copy,
    folder_or_default,
    load_dtype,
    loading_checkpoint,
    pipeline_default,
    read_folder_defaults,
    require_files,
    require_weight_files,
    resolve_pretrained_path,
)
from lightning_vidalign.sampling import EDM_SAMPLERS, Trajectory, edm_preconditioning, euler_ancestral_step, euler_step

log = logging.getLogger(__name__)

#: LoRA on the temporal attention projections only (SHIFT App. C).
SVD_TEMPORAL_ATTN_LORA = r".*temporal_transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"

#: diffusers scheduler config of stabilityai/stable-video-diffusion-img2vid(-xt).
SVD_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_svd_components(seed: int = 0, num_frames: int = 8, width: int = 1) -> dict[str, Any]:
    """Build a tiny, randomly initialised SVD (UNet, temporal VAE, CLIP image encoder).

    The UNet has 2 levels (32/64 channels), the VAE downsamples by 4 (3 levels), the image
    encoder is a 1-layer CLIP vision tower (width 32). Total ~2.5 M parameters; a 64x64x8 clip
    runs forward+backward in well under a second on CPU. Source: our choice.

    Args:
        seed: initialisation seed (the build is deterministic).
        num_frames: the UNet's default number of frames.
        width: channel multiplier of the UNet (``32·width, 64·width``; 1 = the default tiny model;
            larger values give the same architecture at a bigger size, e.g. for benchmarks).

    Returns:
        dict with ``unet``, ``vae``, ``image_encoder`` and ``scheduler_config``.
    """
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(
            sample_size=16,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32 * width, 64 * width),
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,
            layers_per_block=1,
            cross_attention_dim=32,
            num_attention_heads=(2, 4),
            num_frames=num_frames,
        )
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            sample_size=64,
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=224,
                patch_size=32,
                projection_dim=32,
            )
        )
    return {"unet": unet, "vae": vae, "image_encoder": image_encoder, "scheduler_config": dict(SVD_SCHEDULER_CONFIG)}


def load_svd_components(path: str, variant: str | None = None, unet_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Load SVD from a local diffusers directory (``unet/ vae/ image_encoder/ scheduler/``).

    Args:
        path: local directory in the diffusers layout of ``stable-video-diffusion-img2vid``.
        variant: weight variant (e.g. ``"fp16"``) or None.

    Raises:
        FileNotFoundError: naming the missing directory, config or weight file.
    """
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection

    require_files(path, ["unet/config.json", "vae/config.json", "image_encoder/config.json", "scheduler/scheduler_config.json"], "SVD checkpoint")
    require_weight_files(path, ["unet", "vae", "image_encoder"], "SVD checkpoint")
    kw = {"local_files_only": True, "variant": variant}
    with loading_checkpoint(path, "SVD checkpoint"):
        return {
            "unet": UNetSpatioTemporalConditionModel.from_pretrained(path, subfolder="unet", **kw, torch_dtype=unet_dtype),
            "vae": AutoencoderKLTemporalDecoder.from_pretrained(path, subfolder="vae", **kw),
            "image_encoder": CLIPVisionModelWithProjection.from_pretrained(os.path.join(path, "image_encoder"), local_files_only=True),
            "scheduler_config": dict(EulerDiscreteScheduler.load_config(path, subfolder="scheduler", local_files_only=True)),
        }


class SVDBackbone(VideoBackbone):
    """Stable Video Diffusion policy with LoRA (image-to-video; EDM, v-prediction).

    Conditioning (as ``StableVideoDiffusionPipeline``): the first frame, noise-augmented with
    ``noise_aug_strength``, VAE-encoded (``mode()``, unscaled) and concatenated on channels to every
    noisy frame latent; its CLIP image embedding as ``encoder_hidden_states``;
    ``added_time_ids = [fps - 1, motion_bucket_id, noise_aug_strength]``.

    Training (EDM, DESIGN §2): ``x = x0 + sigma·eps``, ``ln sigma ~ N(p_mean, p_std²)``, loss
    ``λ(sigma)·||D(x) - x0||²`` with ``λ = (sigma²+1)/sigma²``, mean over all non-batch elements.

    Args:
        pretrained_path: ``"tiny"`` builds the tiny configuration of :func:`tiny_svd_components`
            (random init, seed ``init_seed``); ``"demo:svd_tiny"`` the shipped demo base (the tiny
            configuration pretrained on the bundled clips, issue 8); otherwise a local diffusers
            directory of an SVD checkpoint (never downloaded; a missing file raises
            ``FileNotFoundError`` naming it).
        variant: weight variant for ``from_pretrained`` (e.g. ``"fp16"``).
        finetune: ``"lora"`` (adapters only; the frozen base is the reference policy) or ``"full"``
            (no adapters, every UNet weight trained: base pretraining; the reference policy is then
            the policy itself).
        train_vae: also make the VAE trainable (base pretraining of a tiny model, :class:`BasePretrain`).
        lora_rank: LoRA rank ``r`` (paper: 32).
        lora_alpha: LoRA alpha (paper: 32; scale ``alpha/r``).
        lora_target_modules: regex over module names (default: temporal attention q/k/v/out).
        lora_init: peft ``init_lora_weights`` (``"gaussian"`` per SHIFT App. C, or ``True``).
        fps: frame rate the clips are sampled at (enters ``added_time_ids`` as ``fps - 1``).
        motion_bucket_id: SVD motion conditioning (paper: 127).
        noise_aug_strength: std of the Gaussian noise added to the conditioning frame (paper: 0.02).
        p_mean, p_std: log-normal training sigma distribution (SVD: 0.7, 1.6).
        init_seed: seed of the tiny random initialisation.
        activation_checkpointing: per-block activation checkpointing of the UNet (diffusers' gradient checkpointing,
            :meth:`~lightning_vidalign.backbones.base.VideoBackbone.set_activation_checkpointing`; the temporal
            transformer blocks stay un-checkpointed); same gradients, less
            activation memory, one extra block forward per block in backward.
        vae_dtype: run the frozen VAE in this dtype (``"bfloat16"``, ``"float16"``, ``"float32"``; None: as loaded);
            see :meth:`~lightning_vidalign.backbones.base.VideoBackbone.configure_frozen_parts`.
        encoder_dtype: the same for the CLIP image encoder.
        offload_frozen: keep the VAE and the image encoder on CPU between uses (moved to the UNet's device for each).
        dtype: store and run the frozen UNet weights in this dtype (``"bfloat16"``, ``"float16"``), LoRA masters float32
            (:meth:`~lightning_vidalign.backbones.base.VideoBackbone.set_compute_dtype`).

    Defaults from the checkpoint (issue 32; :attr:`settings`): the algorithm's ``guidance`` and
    ``num_inference_steps`` when its config leaves them null: the folder's ``_vidalign_defaults`` (the demo base: 1.0,
    10), else ``StableVideoDiffusionPipeline``'s ``(min_guidance_scale, max_guidance_scale)`` = (1.0, 3.0) and 25
    steps (read from diffusers); tiny: 1.0 and 10. ``fps``, ``motion_bucket_id`` and ``noise_aug_strength`` default to
    the pipeline's values (7, 127, 0.02).
    """

    condition_keys = ("image_latents", "image_embeds", "added_time_ids")

    def __init__(
        self,
        pretrained_path: str = "tiny",
        variant: str | None = None,
        finetune: str = "lora",
        train_vae: bool = False,
        lora_rank: int = 32,
        lora_alpha: float = 32.0,
        lora_target_modules: str = SVD_TEMPORAL_ATTN_LORA,
        lora_init: str | bool = "gaussian",
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        p_mean: float = 0.7,
        p_std: float = 1.6,
        init_seed: int = 0,
        activation_checkpointing: bool = False,
        vae_dtype: str | None = None,
        encoder_dtype: str | None = None,
        offload_frozen: bool = False,
        dtype: str | None = None,
    ):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        parts = tiny_svd_components(init_seed) if pretrained_path == "tiny" else load_svd_components(resolve_pretrained_path(pretrained_path), variant, unet_dtype=load_dtype(dtype, finetune))
        self.unet = parts["unet"]
        self.vae = parts["vae"]
        self.image_encoder = parts["image_encoder"]
        self.scheduler_config = parts["scheduler_config"]
        for module in (self.unet, self.vae, self.image_encoder):
            module.requires_grad_(False)
            module.eval()
        lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=lora_target_modules, init_lora_weights=lora_init)
        n_lora = self.setup_finetuning(self.unet, finetune, train_vae, lora_config, lambda cfg: inject_adapter_in_model(cfg, self.unet), init_seed + 1)
        self.set_activation_checkpointing(activation_checkpointing)
        self.fps = fps
        self.motion_bucket_id = motion_bucket_id
        self.noise_aug_strength = noise_aug_strength
        self.p_mean = p_mean
        self.p_std = p_std
        self.pretrained_path = pretrained_path
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.configure_frozen_parts(vae_dtype, encoder_dtype, offload_frozen)
        self.set_compute_dtype(dtype)
        self.record_pipeline_settings(pretrained_path)
        log.info("SVDBackbone(%s, finetune=%s): %d LoRA parameters; settings %s", pretrained_path, finetune, n_lora,
                 {k: v["value"] for k, v in self.settings.items()})

    @staticmethod
    def checkpoint_settings(folder: str) -> dict[str, dict[str, Any]]:
        """The default ``guidance`` and ``num_inference_steps`` an SVD folder implies (class docstring) and the UNet's
        ``num_frames``, each ``{"value", "source"}``; JSON files only (``vidalign check-model``)."""
        import json

        own, source = read_folder_defaults(folder), f"model_index.json {FOLDER_DEFAULTS_KEY}"
        low, low_source = pipeline_default("StableVideoDiffusionPipeline", "min_guidance_scale")
        high, _ = pipeline_default("StableVideoDiffusionPipeline", "max_guidance_scale")
        guidance = ([float(low), float(high)], low_source.replace("__call__ default", "__call__ (min, max)_guidance_scale defaults"))
        out = {"guidance": folder_or_default("guidance", own, source, guidance),
               "num_inference_steps": folder_or_default("num_inference_steps", own, source, pipeline_default("StableVideoDiffusionPipeline", "num_inference_steps"))}
        with open(os.path.join(folder, "unet", "config.json")) as f:
            out["num_frames"] = {"value": int(json.load(f).get("num_frames", 25)), "source": "unet/config.json num_frames"}
        return out

    def record_pipeline_settings(self, pretrained_path: str) -> None:
        """Record the default ``guidance`` and ``num_inference_steps`` the checkpoint implies (:meth:`checkpoint_settings`)."""
        if pretrained_path == "tiny":
            self.record_setting("guidance", 1.0, "tiny family default (our choice)")
            self.record_setting("num_inference_steps", 10, "tiny family default (our choice)")
            return
        for name, entry in self.checkpoint_settings(resolve_pretrained_path(pretrained_path)).items():
            self.record_setting(name, entry["value"], entry["source"])

    def train(self, mode: bool = True):
        # frozen parts stay in eval mode (dropout etc.); LoRA dropout is 0
        super().train(mode)
        for module in (self.vae, self.image_encoder):
            module.eval()
        return self

    @property
    def denoiser(self):
        return self.unet

    def encoder_modules(self):
        return [self.image_encoder]

    def fsdp_modules(self):
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    # ------------------------------------------------------------------ VAE
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Pixel video ``(B, T, 3, H, W)`` in ``[0, 1]`` -> scaled latents ``(B, T, 4, H/f, W/f)``.

        Uses the posterior mode (our choice: deterministic targets) times ``scaling_factor``.
        """
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"encode expects video (B, T, 3, H, W), got {tuple(video.shape)}")
        b, t = video.shape[:2]
        frames = video.flatten(0, 1).to(self.vae.dtype) * 2 - 1
        with self.frozen_on_device(self.vae):
            z = self.vae.encode(frames).latent_dist.mode() * self.vae.config.scaling_factor
        return z.unflatten(0, (b, t)).float()

    @torch.no_grad()
    def decode(self, latents: Tensor, chunk_size: int | None = None) -> Tensor:
        """Scaled latents ``(B, T, 4, h, w)`` -> video ``(B, T, 3, h·f, w·f)`` in ``[0, 1]``.

        Args:
            latents: scaled latents.
            chunk_size: frames per VAE call (default: all frames of one video at once, as the
                pipeline's default); must divide into whole videos for the temporal decoder.
        """
        b, t = latents.shape[:2]
        out = []
        z = latents.flatten(0, 1).to(self.vae.dtype) / self.vae.config.scaling_factor
        step = chunk_size or t
        with self.frozen_on_device(self.vae):
            for i in range(0, z.shape[0], step):
                chunk = z[i : i + step]
                out.append(self.vae.decode(chunk, num_frames=chunk.shape[0]).sample)
        video = torch.cat(out).float().unflatten(0, (b, t))
        return ((video + 1) / 2).clamp(0, 1)

    def vae_reconstruct(self, video: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable VAE pass (for VAE training): frames encoded one by one, a posterior sample
        decoded by the temporal decoder with ``num_frames = T``.

        Args:
            video: ``(B, T, 3, H, W)`` in ``[0, 1]``.
            generator: RNG of the posterior sample.

        Returns:
            ``reconstruction (B, T, 3, H, W)`` in ``[-1, 1]`` units (the target is ``2·video - 1``),
            posterior ``mean`` and ``logvar`` ``(B, T, 4, h, w)`` (unscaled).
        """
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"vae_reconstruct expects video (B, T, 3, H, W), got {tuple(video.shape)}")
        b, t = video.shape[:2]
        posterior = self.vae.encode(video.flatten(0, 1).to(self.vae.dtype) * 2 - 1).latent_dist
        z = posterior.sample(generator=generator)
        recon = self.vae.decode(z, num_frames=t).sample.float().unflatten(0, (b, t))
        return recon, posterior.mean.float().unflatten(0, (b, t)), posterior.logvar.float().unflatten(0, (b, t))

    def set_latent_statistics(self, mean: Tensor, std: Tensor) -> None:
        """SVD scales latents by one number and does not centre them (as the SVD/SD VAEs): the
        ``scaling_factor`` becomes ``1 / RMS`` of the unscaled latents, ``RMS = sqrt(mean_c(std_c² + mean_c²))``
        (the Stable Diffusion recipe, there with the std: our choice, so that the scaled latents have
        unit second moment). Written into the VAE config, hence saved by :meth:`save_pretrained`."""
        rms = torch.sqrt((std.double() ** 2 + mean.double() ** 2).mean()).item()
        if not math.isfinite(rms) or rms <= 0:
            raise ValueError(f"set_latent_statistics: latent RMS must be finite and > 0, got {rms}")
        self.vae.register_to_config(scaling_factor=1.0 / rms)

    def _record_folder_defaults(self, directory: str) -> None:
        """Add this backbone's default guidance and steps (the tiny family's) to the written ``model_index.json``
        under :data:`~lightning_vidalign.backbones.base.FOLDER_DEFAULTS_KEY` (diffusers ignores ``_`` keys)."""
        import json

        path = os.path.join(directory, "model_index.json")
        with open(path) as f:
            index = json.load(f)
        index[FOLDER_DEFAULTS_KEY] = {"guidance": self.default_setting("guidance", 1.0), "num_inference_steps": self.default_setting("num_inference_steps", 10)}
        with open(path, "w") as f:
            json.dump(index, f, indent=2)

    def save_pretrained(self, directory: str, dtype: torch.dtype = torch.float32) -> str:
        """Write the base model as a diffusers ``StableVideoDiffusionPipeline`` folder (``unet/ vae/
        image_encoder/ scheduler/ feature_extractor/ model_index.json``, safetensors) that both
        :func:`load_svd_components` and ``StableVideoDiffusionPipeline.from_pretrained`` read.

        Args:
            directory: output folder (created).
            dtype: dtype of the written UNet and VAE weights (e.g. ``torch.float16``); the image
                encoder is written in fp32. The in-memory model is not changed.

        Raises:
            ValueError: for a LoRA backbone (adapters are exported with :meth:`export_lora`).
        """
        if self.finetune != "full":
            raise ValueError("SVDBackbone.save_pretrained writes a base model (finetune='full'); a LoRA run exports with export_lora "
                             "(or export_merged: the LoRA fused into a full folder)")
        return self._write_pipeline(directory, export_copy(self.unet, dtype), dtype)

    def export_merged(self, directory: str, dtype: torch.dtype = torch.float32) -> str:
        """Write the policy with its LoRA fused into the UNet as a complete diffusers folder that
        ``StableVideoDiffusionPipeline.from_pretrained(directory)`` loads as is (``model_index.json``,
        ``unet/ vae/ image_encoder/ feature_extractor/ scheduler/``, safetensors): the SVD pipeline has
        no LoRA loader (see :meth:`export_lora`), so this is how a trained SVD policy reaches diffusers.

        The UNet is a copy with every LoRA layer merged by peft (``W + (alpha/r)·B·A``, computed in fp32;
        :func:`~lightning_vidalign.backbones.base.merged_copy`); the training model and its adapters are
        untouched. ``vidalign export --merged`` calls this for a checkpoint.

        Args:
            directory: output folder (created; existing files of the same names are overwritten).
            dtype: dtype of the written UNet and VAE weights (fp32 by default: the fused weights exactly;
                ``torch.float16`` halves the size); the image encoder is written in fp32.

        Returns:
            ``directory``.

        Raises:
            ValueError: for ``finetune="full"`` (no LoRA: use :meth:`save_pretrained`), or a non-finite
                merged weight (peft's ``safe_merge``).
        """
        from lightning_vidalign.backbones.base import merged_copy

        if self.lora_config is None:
            raise ValueError("SVDBackbone(finetune='full') has no LoRA to merge: write the model with save_pretrained")
        return self._write_pipeline(directory, merged_copy(self.unet, dtype), dtype)

    def _write_pipeline(self, directory: str, unet: torch.nn.Module, dtype: torch.dtype) -> str:
        """``StableVideoDiffusionPipeline(...).save_pretrained(directory)`` with ``unet`` (already cast), copies of the
        VAE (``dtype``) and image encoder (fp32), the backbone's scheduler and the CLIP feature extractor."""
        from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
        from transformers import CLIPImageProcessor

        pipe = StableVideoDiffusionPipeline(
            vae=export_copy(self.vae, dtype),
            image_encoder=export_copy(self.image_encoder, torch.float32),
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(self.scheduler_config),
            feature_extractor=CLIPImageProcessor(
                do_resize=True, size={"shortest_edge": 224}, do_center_crop=True, crop_size={"height": 224, "width": 224},
                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
            ),
        )
        pipe.save_pretrained(directory, safe_serialization=True)
        self._record_folder_defaults(directory)
        return directory

    # ------------------------------------------------------------ conditions
    @staticmethod
    def _first_frame(batch: dict[str, Any]) -> Tensor:
        if "first_frame" not in batch:
            raise KeyError(f"SVDBackbone needs batch['first_frame'] (B, 3, H, W); batch has keys {sorted(batch)}")
        image = batch["first_frame"]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"batch['first_frame'] must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        return image

    @torch.no_grad()
    def encode_image_embeds(self, image: Tensor) -> Tensor:
        """CLIP image embedding ``(B, 1, D)`` of first frames ``(B, 3, H, W)`` in ``[0, 1]`` (the pipeline's ``_encode_image``)."""
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

        image = image.float() * 2 - 1
        clip_in = (_resize_with_antialiasing(image, (224, 224)) + 1) / 2
        clip_in = (clip_in - self.clip_mean) / self.clip_std
        with self.frozen_on_device(self.image_encoder):
            return self.image_encoder(clip_in.to(self.image_encoder.dtype)).image_embeds.unsqueeze(1).float()

    @torch.no_grad()
    def augmented_image_condition(self, image: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The per-step part of the condition: ``image_latents (B, 4, h, w)``, the unscaled VAE mode of the first frame
        plus ``noise_aug_strength`` Gaussian noise drawn from ``generator`` (the pipeline's ``_encode_vae_image``), and
        ``added_time_ids (B, 3)``. Drawn anew at every step, so never cached."""
        image = image.float() * 2 - 1
        b = image.shape[0]
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        aug = image + self.noise_aug_strength * noise
        with self.frozen_on_device(self.vae):
            image_latents = self.vae.encode(aug.to(self.vae.dtype)).latent_dist.mode().float()
        time_ids = torch.tensor(
            [[self.fps - 1, self.motion_bucket_id, self.noise_aug_strength]], device=image.device, dtype=torch.float32
        ).repeat(b, 1)
        return {"image_latents": image_latents, "added_time_ids": time_ids}

    @torch.no_grad()
    def encode_condition(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Conditions from ``batch["first_frame"]`` ``(B, 3, H, W)`` in ``[0, 1]``.

        Returns:
            ``image_latents (B, 4, h, w)`` (unscaled VAE mode of the noise-augmented frame),
            ``image_embeds (B, 1, D)`` (CLIP image embedding), ``added_time_ids (B, 3)``.

        Raises:
            KeyError: if the batch has no ``first_frame``.
            ValueError: if its shape is not ``(B, 3, H, W)``.
        """
        image = self._first_frame(batch)
        embeds = self.encode_image_embeds(image)
        return {"image_embeds": embeds, **self.augmented_image_condition(image, generator)}

    def cacheable_condition_keys(self) -> tuple[str, ...]:
        """``("image_embeds",)``: the augmented image latent is drawn per step (:meth:`augmented_image_condition`)."""
        return ("image_embeds",)

    def cacheable_condition(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"image_embeds": self.encode_image_embeds(self._first_frame(batch))}

    def complete_condition(self, batch: dict[str, Any], parts: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The cached/clip-wise ``image_embeds`` with :meth:`augmented_image_condition` of ``batch["first_frame"]``
        (the same noise from ``generator`` whether ``parts`` come from the cache or not)."""
        return {"image_embeds": parts["image_embeds"], **self.augmented_image_condition(self._first_frame(batch), generator)}

    # ---------------------------------------------------------------- model
    def predict(self, x_t: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Raw UNet output ``F`` (v-prediction) for noisy latents ``x_t (B, T, 4, h, w)``.

        Args:
            x_t: noisy latents at levels ``sigma``.
            sigma: ``(B,)`` noise levels (> 0).
            cond: from :meth:`encode_condition`.
        """
        b, t = x_t.shape[:2]
        _, _, c_in, c_noise = edm_preconditioning(sigma.float().view(b, 1, 1, 1, 1))
        image_latents = cond["image_latents"].unsqueeze(1).expand(-1, t, -1, -1, -1)
        inp = torch.cat([c_in * x_t.float(), image_latents.float()], dim=2).to(self.unet.dtype)
        out = self.unet(
            inp,
            c_noise.view(b).float(),  # float32 as the SVD pipeline's timesteps (bf16 would round c_noise to ~0.008)
            encoder_hidden_states=cond["image_embeds"].to(self.unet.dtype),
            added_time_ids=cond["added_time_ids"].to(self.unet.dtype),
        ).sample
        return out.float()

    def denoise(self, x_t: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """EDM denoiser ``D = c_skip·x + c_out·F`` (same shape as ``x_t``)."""
        b = x_t.shape[0]
        c_skip, c_out, _, _ = edm_preconditioning(sigma.float().view(b, 1, 1, 1, 1))
        return c_skip * x_t.float() + c_out * self.predict(x_t, sigma, cond)

    def sample_sigma(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``sigma = exp(p_mean + p_std·n)``, ``n ~ N(0, 1)``; shape ``(B,)``, fp32."""
        n = torch.randn(batch_size, generator=generator, device=device or "cpu")
        return torch.exp(self.p_mean + self.p_std * n).to(device or n.device)

    def training_loss(self, x0: Tensor, cond: dict[str, Tensor], sigma: Tensor, noise: Tensor) -> Tensor:
        """EDM-weighted denoising loss per sample.

        Args:
            x0: clean latents ``(B, T, 4, h, w)``.
            cond: conditions for the batch.
            sigma: ``(B,)`` noise levels.
            noise: ``eps`` with the shape of ``x0``.

        Returns:
            ``(B,)`` losses ``λ(σ)·mean((D(x0 + σ·eps) - x0)²)``, ``λ = (σ²+1)/σ²``.

        Raises:
            ValueError: on mismatched shapes.
        """
        if noise.shape != x0.shape or sigma.shape != (x0.shape[0],):
            raise ValueError(f"training_loss: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)}, sigma {tuple(sigma.shape)}")
        s = sigma.float().view(-1, 1, 1, 1, 1)
        x_t = x0.float() + s * noise.float()
        denoised = self.denoise(x_t, sigma, cond)
        weight = (s * s + 1) / (s * s)
        return (weight * (denoised - x0.float()) ** 2).flatten(1).mean(1)

    # --------------------------------------------------------------- rollout
    def _guided_denoise(self, x: Tensor, sigma: float, cond: dict[str, Tensor], guidance: Tensor | None) -> Tensor:
        b = x.shape[0]
        sig = torch.full((b,), float(sigma), device=x.device)
        if guidance is None:
            return self.denoise(x, sig, cond)
        uncond = {
            "image_latents": torch.zeros_like(cond["image_latents"]),
            "image_embeds": torch.zeros_like(cond["image_embeds"]),
            "added_time_ids": cond["added_time_ids"],
        }
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond if k in uncond}
        # CFG on the network output F (pipeline); D is affine in F so this equals CFG on D
        c_skip, c_out, _, _ = edm_preconditioning(torch.tensor(float(sigma)))
        f = self.predict(torch.cat([x, x]), torch.cat([sig, sig]), both)
        f_u, f_c = f.chunk(2)
        f = f_u + guidance * (f_c - f_u)
        return c_skip * x.float() + c_out * f

    @torch.no_grad()
    def rollout(
        self,
        cond: dict[str, Tensor],
        sampler: str = "euler",
        num_steps: int = 25,
        guidance: float | tuple[float, float] = 1.0,
        generator: torch.Generator | None = None,
        keep_trajectory: bool = False,
        num_frames: int = 8,
        height: int = 64,
        width: int = 64,
        eta: float = 1.0,
        decode: bool = True,
        latents: Tensor | None = None,
    ) -> Trajectory:
        """Sample videos with the Karras sigmas of diffusers' ``EulerDiscreteScheduler``.

        Args:
            cond: conditions ``(B, ...)`` from :meth:`encode_condition`.
            sampler: ``"euler"`` (deterministic, = the SVD pipeline) or ``"euler_ancestral"``.
            num_steps: denoising steps.
            guidance: a scale, or ``(min, max)`` linearly interpolated over frames as the SVD
                pipeline does; no CFG pass when the maximum is ``<= 1``.
            generator: RNG for the initial noise and ancestral noise.
            keep_trajectory: store per-step ``x_t`` and ``x_next``.
            num_frames, height, width: output size in pixels/frames.
            eta: ancestral noise scale (``euler_ancestral`` only).
            decode: decode the final latents to pixels.
            latents: optional initial noise ``(B, T, 4, h, w)`` (unit variance).

        Raises:
            ValueError: for an unknown sampler.
        """
        from diffusers import EulerDiscreteScheduler

        if sampler not in EDM_SAMPLERS:
            raise ValueError(f"SVDBackbone.rollout: sampler must be one of {EDM_SAMPLERS}, got {sampler!r}")
        device = cond["image_latents"].device
        b = cond["image_latents"].shape[0]
        scheduler = EulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps, device="cpu")
        sigmas = scheduler.sigmas.float()
        shape = (b, num_frames, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        x = latents.float().to(device) * float(scheduler.init_noise_sigma)
        g_min, g_max = (guidance, guidance) if isinstance(guidance, (int, float)) else tuple(guidance)
        scale = None
        if g_max > 1.0:
            scale = torch.linspace(g_min, g_max, num_frames, device=device).view(1, num_frames, 1, 1, 1)
        xs, xn = [], []
        for i in range(num_steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            denoised = self._guided_denoise(x, s, cond, scale)
            if sampler == "euler":
                x_next = euler_step(x, denoised, s, s_next)
            else:
                x_next = euler_ancestral_step(x, denoised, s, s_next, eta=eta, generator=generator)
            if keep_trajectory:
                xs.append(x)
                xn.append(x_next)
            x = x_next
        video = self.decode(x) if decode else None
        return Trajectory(
            latents=x,
            video=video,
            x_t=torch.stack(xs, 1) if keep_trajectory else None,
            x_next=torch.stack(xn, 1) if keep_trajectory else None,
            sigmas=sigmas,
        )

    # ---------------------------------------------------------------- export
    def lora_state_dict_diffusers(self) -> dict[str, Tensor]:
        """LoRA weights in the diffusers/peft key format (``unet.<module>.lora_A.weight``).

        The LoRA scale ``alpha/r`` is folded into ``lora_B`` so that a loader that assumes
        ``alpha = r`` (diffusers' default without ``.alpha`` keys) reproduces the adapter exactly.
        """
        from peft import get_peft_model_state_dict

        if self.lora_config is None:
            raise ValueError("SVDBackbone(finetune='full') has no LoRA: write the base model with save_pretrained")
        sd = get_peft_model_state_dict(self.unet)
        scale = self.lora_config.lora_alpha / self.lora_config.r
        out = {}
        for k, v in sd.items():
            v = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu().contiguous()  # FSDP2: gathered (collective)
            if "lora_B" in k:
                v = v * scale
            out[f"unet.{k}"] = v
        return out

    def export_lora(self, directory: str, weight_name: str = "pytorch_lora_weights.safetensors", write: bool = True) -> str:
        """Write the LoRA as ``<directory>/pytorch_lora_weights.safetensors`` (diffusers format).

        Under FSDP2 every rank must call it (the adapters are gathered collectively); pass
        ``write=False`` on all ranks but one.

        The file is read by diffusers' pipeline LoRA reader
        (``StableDiffusionLoraLoaderMixin.lora_state_dict``) and applied by :meth:`load_lora`.
        Note: in diffusers 0.42 ``UNetSpatioTemporalConditionModel`` has no ``load_lora_adapter``
        and its ``load_attn_procs`` only accepts Custom Diffusion weights, so the SVD pipeline
        itself has no LoRA loader; :meth:`load_lora` is the peft equivalent, and :meth:`export_merged` writes a
        folder that the pipeline loads as is.

        Returns:
            The path of the written file.
        """
        from safetensors.torch import save_file

        path = os.path.join(directory, weight_name)
        state = self.lora_state_dict_diffusers()
        if write:
            os.makedirs(directory, exist_ok=True)
            save_file(state, path)
        return path

    def load_lora(self, directory: str, weight_name: str = "pytorch_lora_weights.safetensors") -> None:
        """Load a LoRA written by :meth:`export_lora` (or any diffusers-format UNet LoRA).

        Reads with diffusers' ``StableDiffusionLoraLoaderMixin.lora_state_dict`` and writes into the
        injected adapters with peft's ``set_peft_model_state_dict``.

        Raises:
            FileNotFoundError: naming the missing file. ValueError: if keys do not match the adapters.
        """
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from peft import set_peft_model_state_dict

        path = os.path.join(directory, weight_name)
        if self.lora_config is None:
            raise ValueError("SVDBackbone(finetune='full') has no LoRA to load into")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LoRA file {path!r} does not exist")
        state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(directory, weight_name=weight_name, local_files_only=True)
        scale = self.lora_config.lora_alpha / self.lora_config.r
        unet_sd = {k[len("unet.") :]: (v / scale if "lora_B" in k else v) for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(self.unet, unet_sd)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected or not unet_sd:
            raise ValueError(f"{path}: {len(unexpected)} key(s) match no adapter of this backbone, e.g. {unexpected[:3]}")
