"""Instantaneous Motion Reward (SHIFT §4.1): a ViT discriminator on transport-residual maps."""
from __future__ import annotations

import copy
import logging
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vidalign.rewards.base import RewardCallback
from lightning_vidalign.utils import StageTimer
from lightning_vidalign.rewards.motion.flow import DISFlow, FlowEstimator, to_gray, transport_residual, video_flow

log = logging.getLogger(__name__)


def imr_features(video: Tensor, estimator: FlowEstimator, residual_scale: float = 1.0, normalize: bool = True) -> Tensor:
    """IMR input maps ``[R, confidence]`` per adjacent pair.

    Args:
        video: ``(B, T, 3, H, W)`` in ``[0, 1]``.
        estimator: flow estimator.
        residual_scale: multiplier of ``R`` (our choice: 1 with ``normalize``; use ~10 without it,
            since raw intensity residuals are small).
        normalize: divide ``R`` of each pair by ``RMS(I_t) + 0.01`` so that the map says how much
            of the temporal change the flow fails to explain, independent of how much the scene
            moves (our choice; without it, clips with large motion dominate and a small
            discriminator confuses "moves a lot" with "moves wrongly").

    Returns:
        ``(B, T-1, 2, H, W)``.
    """
    gray = to_gray(video.float())
    flow, conf = video_flow(gray, estimator)
    residual = transport_residual(gray, flow)
    if normalize:
        it = gray[:, 1:] - gray[:, :-1]
        residual = residual / (it.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt() + 0.01)
    return torch.cat([residual_scale * residual, conf], dim=2)


class IMRDiscriminator(nn.Module):
    """timm ViT on 2-channel ``[R, confidence]`` maps, CLS pooling, one logit per pair, mean over pairs.

    Args:
        img_size: side the maps are resized to (patch grid = img_size / patch_size).
        patch_size, embed_dim, depth, num_heads: ViT size (paper: ViT-Base/16; tiny default ours).
    """

    def __init__(self, img_size: int = 64, patch_size: int = 8, embed_dim: int = 64, depth: int = 2, num_heads: int = 4):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.img_size = img_size
        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=2,
            num_classes=1,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            global_pool="token",
            class_token=True,
        )

    def forward(self, maps: Tensor) -> Tensor:
        """``(B, P, 2, H, W)`` maps -> ``(B,)`` logits (mean of per-pair logits)."""
        b, p = maps.shape[:2]
        x = maps.flatten(0, 1).float()
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return self.vit(x).view(b, p).mean(1)


class AdversarialDiscriminatorReward(RewardCallback):
    """Shared logic of the adversarial motion rewards (IMR now, LMR later).

    Reward ``r = clip(logit D_ema(x), r_min, r_max)`` (SHIFT Eq. 7 ff.). When ``adversarial`` is on,
    after each training batch the discriminator takes one AdamW step on the BCE of Eq. 7 with the
    ``real`` clips as positives and the ``fake`` rollouts as negatives (both from the
    ``training_step`` output dict), gradients all-reduced across ranks, then the EMA copy is updated.
    The generator never receives discriminator gradients (everything here is under ``no_grad``
    w.r.t. the videos, which are detached).

    Args:
        name: metric namespace.
        weight: weight in a sum of rewards.
        r_min, r_max: logit clip range (lost in extraction: our choice ±10).
        adversarial: co-train with the generator (SHIFT A2); False = a frozen reward.
        lr, betas, weight_decay: AdamW of the discriminator (paper: AdamW).
        ema_decay: EMA of the scoring copy (paper: 0.99).
        pretrained: a state file written by :meth:`save_pretrained` (or a Lightning checkpoint
            holding this callback's state) to start from; a missing file raises ``FileNotFoundError``.
        save_to: write the discriminator here at the end of ``fit`` (for reward pretraining).
        seed: initialisation seed.
        real_data: a data module whose training clips are the discriminator's real side instead of the training batch's
            (``outputs["real"]``): e.g. the same sources at the base's frame rate while the method trains on other data
            (SHIFT Table 1: the real side is ordinary moving clips, the fine-tuning data motion-poor). Its loader is
            cycled in its own order (epoch 0's order each pass), the same clips on every rank; the number of batches
            drawn is checkpointed and a resumed run skips as many, so it draws the same clips as an uninterrupted one.
            Our choice: SHIFT's code is not public.
    """

    def __init__(
        self,
        name: str,
        weight: float = 1.0,
        r_min: float = -10.0,
        r_max: float = 10.0,
        adversarial: bool = True,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        ema_decay: float = 0.99,
        pretrained: str | None = None,
        save_to: str | None = None,
        seed: int = 0,
        real_data: L.LightningDataModule | None = None,
    ):
        super().__init__(name=name, weight=weight)
        self.real_data, self.real_drawn, self._real_iter = real_data, 0, None
        if r_min >= r_max:
            raise ValueError(f"r_min ({r_min}) must be < r_max ({r_max})")
        self.r_min, self.r_max = r_min, r_max
        self.adversarial = adversarial
        self.ema_decay = ema_decay
        self.save_to = save_to
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.disc = self.build_discriminator()
        self.ema = copy.deepcopy(self.disc).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        self.num_updates = 0
        self.timer = StageTimer()  # "estimation" (flow/tracking features) vs "discriminator" seconds
        self._last: dict[str, Tensor] = {}
        if pretrained:
            self.load_pretrained(pretrained)

    # -- to implement per reward
    def build_discriminator(self) -> nn.Module:
        raise NotImplementedError

    def features(self, videos: Tensor) -> Tensor:
        raise NotImplementedError

    # -- device / state
    def to(self, device) -> "AdversarialDiscriminatorReward":
        super().to(device)
        self.disc.to(self.device)
        self.ema.to(self.device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(self.device)
        return self

    def state_dict(self) -> dict:
        return {
            "disc": self.disc.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "num_updates": self.num_updates,
            "real_drawn": self.real_drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.ema.load_state_dict(state["ema"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state.get("num_updates", 0))
        self.real_drawn, self._real_iter = int(state.get("real_drawn", 0)), None  # (the next draw skips as many)
        self.to(self.device)

    def save_pretrained(self, path: str) -> None:
        """Write ``{"disc", "ema", "optimizer", "num_updates"}`` to ``path`` (torch.save)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(self.state_dict(), path)

    def load_pretrained(self, path: str) -> None:
        """Load a file from :meth:`save_pretrained` or a Lightning checkpoint with this callback.

        Raises:
            FileNotFoundError: naming ``path``. KeyError: if a checkpoint lacks this reward's state.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reward '{self.name}': pretrained discriminator file {path!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if "callbacks" in state:
            matches = [v for k, v in state["callbacks"].items() if k == self.state_key or k.endswith(f"[{self.name}]")]
            if not matches:
                raise KeyError(f"{path}: no state for reward '{self.name}' among callbacks {sorted(state['callbacks'])}")
            state = matches[0]
        self.load_state_dict(state)
        log.info("reward '%s': loaded discriminator from %s (%d updates)", self.name, path, self.num_updates)

    # -- scoring
    @torch.no_grad()
    def logits(self, videos: Tensor, use_ema: bool = True) -> Tensor:
        """Raw discriminator logits ``(B,)`` for videos ``(B, T, 3, H, W)`` in ``[0, 1]``."""
        model = self.ema if use_ema else self.disc
        with self.timer("estimation"):
            feats = self.features(videos.to(self.device))
        with self.timer("discriminator"):
            return model(feats)

    @torch.no_grad()
    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        """``clip(logit D_ema(x), r_min, r_max)``, shape ``(B,)``.

        Raises:
            FloatingPointError: if a logit is not finite (names this reward).
        """
        logit = self.logits(videos)
        if not torch.isfinite(logit).all():
            raise FloatingPointError(f"reward '{self.name}': non-finite discriminator logits {logit.tolist()}")
        reward = logit.clamp(self.r_min, self.r_max)
        self._last = {"logit": logit, "reward": reward}
        return reward

    def score_components(self) -> dict[str, Tensor]:
        return dict(self._last)

    # -- adversarial update (SHIFT Eq. 7)
    def discriminator_step(self, real: Tensor, fake: Tensor) -> dict[str, float]:
        """One BCE step: real clips are positives, rollouts negatives; then the EMA update.

        Args:
            real, fake: ``(B, T, 3, H, W)`` in ``[0, 1]`` (detached).

        Returns:
            metrics: ``loss``, ``acc`` (on this batch, before the step), ``logit_real``, ``logit_fake``.

        Raises:
            FloatingPointError: if the BCE loss is not finite.
        """
        self.disc.train()
        with self.timer("estimation"):
            feats_real = self.features(real.detach().to(self.device))
            feats_fake = self.features(fake.detach().to(self.device))
        with self.timer("discriminator"):
            logit_real, logit_fake = self.disc(feats_real), self.disc(feats_fake)
            loss = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
            loss = loss + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reward '{self.name}': non-finite discriminator loss {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.all_reduce_gradients()
            self.optimizer.step()
            self.update_ema()
        self.num_updates += 1
        acc = 0.5 * ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean())
        return {
            "loss": loss.item(),
            "acc": acc.item(),
            "logit_real": logit_real.mean().item(),
            "logit_fake": logit_fake.mean().item(),
        }

    def all_reduce_gradients(self) -> None:
        """Average the discriminator gradients over ranks (no-op in a single process)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for p in self.disc.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)

    @torch.no_grad()
    def update_ema(self) -> None:
        """``θ_ema ← d·θ_ema + (1 - d)·θ`` (buffers copied)."""
        for pe, p in zip(self.ema.parameters(), self.disc.parameters()):
            pe.lerp_(p.detach(), 1.0 - self.ema_decay)
        for be, b in zip(self.ema.buffers(), self.disc.buffers()):
            be.copy_(b)

    def real_clips(self, fallback: Tensor | None) -> Tensor | None:
        """The discriminator's real side for this step: the next batch of ``real_data`` (cycled; after a resume the
        first draw skips the batches drawn before it), else ``fallback`` (the training batch's clips)."""
        if self.real_data is None:
            return fallback

        def cycle():
            while True:
                yield from self.real_data.train_dataloader()

        if self._real_iter is None:
            self.real_data.setup("fit")
            self._real_iter = cycle()
            for _ in range(self.real_drawn):
                next(self._real_iter)
        self.real_drawn += 1
        return next(self._real_iter)["video"]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.adversarial or not isinstance(outputs, dict) or outputs.get("fake") is None:
            return
        real = self.real_clips(outputs.get("real"))
        if real is None:
            return
        metrics = self.discriminator_step(real, outputs["fake"])
        pl_module.log_dict({f"reward/{self.name}/disc_{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_to and trainer.is_global_zero:
            self.save_pretrained(self.save_to)
            log.info("reward '%s': discriminator written to %s", self.name, self.save_to)


class IMRReward(AdversarialDiscriminatorReward):
    """Instantaneous Motion Reward: ViT discriminator on ``[R, confidence]`` of adjacent pairs.

    Args:
        flow: a :class:`FlowEstimator` (default: OpenCV DIS ``medium`` with forward–backward
            confidence).
        img_size, patch_size, embed_dim, depth, num_heads: :class:`IMRDiscriminator` size.
        residual_scale, normalize: see :func:`imr_features`.
        **kwargs: :class:`AdversarialDiscriminatorReward` arguments (``name`` defaults to "imr").
    """

    def __init__(
        self,
        name: str = "imr",
        flow: FlowEstimator | None = None,
        img_size: int = 64,
        patch_size: int = 8,
        embed_dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        residual_scale: float = 1.0,
        normalize: bool = True,
        **kwargs,
    ):
        self.flow = flow or DISFlow()
        self.residual_scale = residual_scale
        self.normalize = normalize
        self._arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        super().__init__(name=name, **kwargs)

    def build_discriminator(self) -> nn.Module:
        return IMRDiscriminator(**self._arch)

    def features(self, videos: Tensor) -> Tensor:
        return imr_features(videos, self.flow, self.residual_scale, self.normalize)
