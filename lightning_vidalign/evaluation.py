"""Validation, test and predict steps of :class:`~lightning_vidalign.module.VideoAlignModule` (issue 33: out of the
base module): the denoising loss at fixed noise, motion metrics and the TransNetV2 Fréchet distance of real and
generated clips, and the ``[real | generated]`` GIFs logged to TensorBoard."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from lightning_vidalign.metrics import motion_metrics, transnetv2_frechet_distance
from lightning_vidalign.utils import add_gif_summary


class EvaluationMixin:
    """``validation_step`` / ``test_step`` / ``predict_step`` of a :class:`~lightning_vidalign.module.VideoAlignModule`
    (settings: ``val_num_videos``, ``val_frechet``)."""

    def init_evaluation(self, val_num_videos: int, frechet: bool) -> None:
        """Metrics and state of validation/test (called by ``VideoAlignModule.__init__``)."""
        self.val_num_videos = val_num_videos
        self.val_metrics = torch.nn.ModuleDict({f"{src}_{k}": m for src in ("gen", "real") for k, m in motion_metrics().items()})
        self.val_frechet = transnetv2_frechet_distance() if frechet else None
        self._frechet_real_done = False
        self._val_videos: list[tuple[Tensor, Tensor, list[str]]] = []

    def evaluation_step(self, batch: dict, batch_idx: int, prefix: str) -> None:
        """Validation/test: denoising loss with fixed noise (not for a backbone whose ``single_level_loss`` is False: a
        MeanFlow I2V checkpoint), motion metrics of real clips and of ``val_num_videos`` generated videos (same seeds at
        every evaluation), videos kept for logging."""
        gen = self.generator(tag=1000 + batch_idx, batch=0)  # same noise at every evaluation
        x0 = self.backbone.encode(batch["video"])
        cond = self.backbone.encode_condition(batch, gen)
        sigma, noise = self.sample_noise(x0, gen)
        if getattr(self.backbone, "single_level_loss", True):  # a MeanFlow I2V checkpoint has no loss at one level: no val/loss
            loss = self.backbone.training_loss(x0, cond, sigma, noise).mean()
            self.log(f"{prefix}/loss", loss, batch_size=x0.shape[0], sync_dist=True)
        real = batch["video"].float()
        for name, metric in self.val_metrics.items():
            if name.startswith("real_"):
                metric.update(real)
        if self.val_frechet is not None and not self._frechet_real_done:
            self.val_frechet.update(real, real=True)
        have = sum(v.shape[0] for _, v, _ in self._val_videos)
        if have < self.val_num_videos:
            n = min(self.val_num_videos - have, real.shape[0])
            fake = self.rollout_videos(batch, gen, n)
            for name, metric in self.val_metrics.items():
                if name.startswith("gen_"):
                    metric.update(fake)
            if self.val_frechet is not None:
                self.val_frechet.update(fake.float(), real=False)
            self._val_videos.append((real[:n].cpu(), fake.cpu(), self.sample_labels(batch, n)))
        self.heldout_update(batch)

    def evaluation_epoch_end(self, prefix: str) -> None:
        """Log ``<prefix>/{gen,real}/<metric>`` and the sampled videos; reset the metrics."""
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                src, key = name.split("_", 1)
                self.log(f"{prefix}/{src}/{key}", metric.compute(), sync_dist=False)
            metric.reset()
        if self.val_frechet is not None:
            self._frechet_real_done = True  # the real clips' statistics are kept (reset_real_features=False)
            value = self.finish_frechet(self.val_frechet)
            if value is not None:
                self.log(f"{prefix}/frechet_transnetv2", value, sync_dist=False)
        if self.heldout_conditions and not self.trainer.sanity_checking:
            metrics = self.heldout_evaluation()
            for key, value in metrics.items():
                self.log(key, value, sync_dist=False)  # gathered over ranks already
            self.print_heldout(metrics)
        if self._val_videos and self.global_rank == 0:
            self.log_videos(f"{prefix}/samples", self._val_videos)
        self._val_videos = []

    @staticmethod
    def finish_frechet(fd) -> Tensor | None:
        """The Fréchet distance of an evaluation (fp32 0-dim), or None with fewer than 2 clips of either side;
        the generated clips' statistics are reset (the real ones are kept, ``reset_real_features=False``)."""
        value = fd.compute().float() if int(fd.real_features_num_samples) >= 2 and int(fd.fake_features_num_samples) >= 2 else None
        fd.reset()
        return value

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self.evaluation_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self.evaluation_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One generated video per condition: ``{"video": (B, T, 3, H, W) in [0, 1], "path", "start"}``."""
        gen = self.generator(tag=3000 + batch_idx, batch=0)
        return {"video": self.rollout_videos(batch, gen), "path": batch.get("path"), "start": batch.get("start")}

    @staticmethod
    def sample_labels(batch: dict, n: int) -> list[str]:
        """Labels of the first ``n`` clips of ``batch``: ``"<file name> from <start> s"`` and, when the batch has
        captions, ``': "<caption>"'`` (what a logged sample was conditioned on)."""
        paths, starts, captions = batch.get("path"), batch.get("start"), batch.get("caption")
        labels = []
        for i in range(n):
            label = os.path.basename(str(paths[i])) if paths is not None else f"clip {i}"
            if starts is not None:
                label += f" from {float(starts[i]):.2f} s"
            if captions is not None and captions[i]:
                label += f': "{captions[i]}"'
            labels.append(label)
        return labels

    def log_videos(self, tag: str, samples: list[tuple[Tensor, Tensor, list[str]]]) -> None:
        """Log ``[real | generated]`` side by side as GIFs to every TensorBoard, Weights & Biases and MLflow logger: tag
        ``<tag>/<k>_<clip name>``, with a description (TensorBoard's card info, W&B's caption, a text artifact beside
        MLflow's GIF artifact) saying left = the real clip, right = the model's sample from its condition, the clip,
        start and caption, and the fixed seed."""
        import re

        from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

        from lightning_vidalign.utils import log_gif_to_mlflow, log_gif_to_wandb

        fps = float(getattr(self.backbone, "fps", 7))
        for logger in self.loggers:
            if not isinstance(logger, (TensorBoardLogger, WandbLogger, MLFlowLogger)):
                continue
            k = 0
            for real, fake, labels in samples:
                for r, f, label in zip(real, fake, labels):
                    name = re.sub(r"[^-\w.]", "_", label.split(":")[0])[:48]
                    description = (f"left: the real clip ({label}); right: the model's sample at step {self.global_step} from the "
                                   f"same condition (first frame / caption), same noise at every evaluation (seed {self.seed})")
                    if isinstance(logger, TensorBoardLogger):
                        add_gif_summary(logger.experiment, f"{tag}/{k}_{name}", torch.cat([r, f], dim=-1), self.global_step, fps,
                                        description=description)
                    else:
                        log = log_gif_to_wandb if isinstance(logger, WandbLogger) else log_gif_to_mlflow
                        log(logger, f"{tag}/{k}_{name}", torch.cat([r, f], dim=-1), self.global_step, fps, description=description)
                    k += 1
