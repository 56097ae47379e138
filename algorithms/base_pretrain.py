"""Pretraining of a tiny base model on real clips (the shipped demo bases, issue 8)."""
from __future__ import annotations

import logging

import torch

from lightning_vidalign.algorithms.losses import latent_moments, vae_loss
from lightning_vidalign.algorithms.sft import SFT

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BasePretrain(SFT):
    """Train a base model from scratch on real clips: the VAE first, then the denoiser by SFT.

    Steps ``1 … vae_steps`` train the VAE (:func:`vae_loss` on a posterior sample); over the last
    ``latent_stats_batches`` of them the per-channel moments of the posterior means are accumulated
    and, after step ``vae_steps``, written into the VAE as its latent normalisation
    (:meth:`VideoBackbone.set_latent_statistics`). The following steps are exactly :class:`SFT`'s
    ``training_step`` with every denoiser weight trainable (backbone ``finetune="full"``); the VAE
    is then fixed (its encoder runs without gradients). At the end of fit the model is written with
    :meth:`VideoBackbone.save_pretrained` to ``export_dir`` (diffusers layout). Source: our choice
    (latent diffusion's two-stage recipe, at tiny scale).

    The checkpoint holds the VAE and denoiser weights and the moment accumulators; a run resumed
    after the VAE phase re-applies the statistics, so a stopped run resumes to the same result.

    Args:
        vae_steps: number of VAE steps before the denoiser steps (0: keep the VAE as built).
        vae_kl_weight: KL weight of :func:`vae_loss`.
        latent_stats_batches: last VAE batches whose posterior means give the latent statistics.
        export_dir: output folder of :meth:`save_pretrained` at the end of fit (None: no export).
        export_dtype: ``"float32" | "float16" | "bfloat16"``: dtype of the written denoiser weights.
        caption_dropout: probability of replacing a clip's caption by the backbone's
            ``negative_prompt`` in the denoiser steps, so that classifier-free guidance has a trained
            unconditional branch (text-conditioned backbones only; Wan/Imagen practice: 0.1).
        *args, **kwargs: :class:`SFT` arguments (the optimizer covers the denoiser and the VAE).

    Raises:
        ValueError: if the backbone is not ``finetune="full"``, or ``vae_steps > 0`` without
            ``train_vae=True``, an unknown ``export_dtype``, or ``caption_dropout`` outside ``[0, 1)``
            or set for a backbone without a ``negative_prompt``.
    """

    def __init__(
        self,
        *args,
        vae_steps: int = 0,
        vae_kl_weight: float = 1e-4,
        latent_stats_batches: int = 16,
        export_dir: str | None = None,
        export_dtype: str = "float16",
        caption_dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.backbone.finetune != "full":
            raise ValueError("BasePretrain trains every denoiser weight: set the backbone's finetune: full")
        if vae_steps > 0 and not self.backbone.train_vae:
            raise ValueError("BasePretrain with vae_steps > 0 needs the backbone's train_vae: true")
        if export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {sorted(EXPORT_DTYPES)}, got {export_dtype!r}")
        if latent_stats_batches < 1:
            raise ValueError(f"latent_stats_batches must be >= 1, got {latent_stats_batches}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if caption_dropout > 0 and getattr(self.backbone, "negative_prompt", None) is None:
            raise ValueError(f"caption_dropout needs a text-conditioned backbone with a negative_prompt; {type(self.backbone).__name__} has none")
        self.caption_dropout = caption_dropout
        self.vae_steps, self.vae_kl_weight = vae_steps, vae_kl_weight
        self.latent_stats_batches = latent_stats_batches
        self.export_dir, self.export_dtype = export_dir, export_dtype
        self._sums = self._sq_sums = None
        self._count = 0

    def vae_training_step(self, batch: dict) -> dict:
        """One VAE step on ``batch["video"]``; accumulates the latent moments near the phase's end."""
        video = batch["video"]
        recon, mean, logvar = self.backbone.vae_reconstruct(video, self.generator(tag=7))
        loss, parts = vae_loss(recon, video.float() * 2 - 1, mean, logvar, self.vae_kl_weight)
        stats = self.optimize(loss)
        if self.batches_seen > self.vae_steps - self.latent_stats_batches:
            z = mean.detach().double().transpose(0, 2).flatten(1)  # (C, B·T'·h·w)
            sums, sq = z.sum(1), (z * z).sum(1)
            self._sums = sums if self._sums is None else self._sums + sums
            self._sq_sums = sq if self._sq_sums is None else self._sq_sums + sq
            self._count += z.shape[1]
        if self.batches_seen == self.vae_steps:
            self.apply_latent_statistics()
        self.log_dict({"train/vae_loss": loss.detach(), **{f"train/vae_{k}": v for k, v in parts.items()}, **{f"train/{k}": v for k, v in stats.items()}}, prog_bar=True, batch_size=video.shape[0])
        return {"loss": loss.detach()}

    def apply_latent_statistics(self) -> None:
        """Write the accumulated latent moments into the backbone's VAE (after the VAE phase)."""
        mean, std = latent_moments(self._sums, self._sq_sums, self._count)
        self.backbone.set_latent_statistics(mean, std)
        log.info("BasePretrain: latent statistics from %d values per channel: mean %s, std %s", self._count, mean.tolist(), std.tolist())

    def drop_captions(self, batch: dict) -> dict:
        """``batch`` with each caption replaced by the negative prompt with probability ``caption_dropout``
        (drawn from the step's generator: reproducible and resumable)."""
        if self.caption_dropout <= 0 or "caption" not in batch:
            return batch
        captions = list(batch["caption"])
        drop = torch.rand(len(captions), generator=self.generator(tag=8)) < self.caption_dropout
        return {**batch, "caption": [self.backbone.negative_prompt if d else c for c, d in zip(captions, drop.tolist())]}

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        if self.batches_seen <= self.vae_steps:
            return self.vae_training_step(batch)
        return super().training_step(self.drop_captions(batch), batch_idx)

    def on_train_end(self) -> None:
        if self.export_dir and self.global_rank == 0:
            self.backbone.save_pretrained(self.export_dir, EXPORT_DTYPES[self.export_dtype])
            log.info("BasePretrain: base model written to %s", self.export_dir)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vidalign_base_pretrain"] = {
            "sums": self._sums, "sq_sums": self._sq_sums, "count": self._count,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("vidalign_base_pretrain")
        if state is None:
            raise KeyError("BasePretrain: the checkpoint has no 'vidalign_base_pretrain' entry (not written by BasePretrain?)")
        self._sums, self._sq_sums, self._count = state["sums"], state["sq_sums"], int(state["count"])
        if 0 < self.vae_steps <= self.batches_seen:  # batches_seen restored by the base class
            self.apply_latent_statistics()
