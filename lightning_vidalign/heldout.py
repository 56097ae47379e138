"""Held-out evaluation of the training objective (issue 33: out of the base module; DESIGN §held-out): fixed
held-out conditions sampled from fixed noise at step 0 and at every validation, scored with the run's reward
callbacks, paired against step 0 (``heldout/improvement`` and its z), drift from the base model, the held-out
denoising loss and Fréchet distance."""
from __future__ import annotations

import hashlib
import math

import torch

from lightning_vidalign.metrics import motion_metrics, transnetv2_frechet_distance


class HeldoutMixin:
    """Held-out evaluation of a :class:`~lightning_vidalign.module.VideoAlignModule` (its settings are the module's
    ``heldout_*`` arguments, see there). A method adds its own held-out measurements with :meth:`heldout_extra_keys`
    and :meth:`heldout_extra` (DPO: implicit accuracy on fixed pairs)."""

    heldout_conditions: int = 0

    def init_heldout(self, conditions: int, samples: int, seed: int, drift: bool, loss_draws: int, frechet: bool) -> None:
        """Set the held-out settings and empty state (called by ``VideoAlignModule.__init__``).

        Raises:
            ValueError: on ``conditions < 0``, ``samples < 1`` or ``loss_draws < 1``.
        """
        if conditions < 0 or samples < 1:
            raise ValueError(f"heldout_conditions must be >= 0 and heldout_samples >= 1, got {conditions}, {samples}")
        if loss_draws < 1:
            raise ValueError(f"heldout_loss_draws must be >= 1, got {loss_draws}")
        self.heldout_conditions, self.heldout_samples = conditions, samples
        self.heldout_seed, self.heldout_drift = seed, drift
        self.heldout_loss_draws = loss_draws
        self.heldout_metrics = torch.nn.ModuleDict(motion_metrics()) if conditions else None
        self.heldout_frechet = transnetv2_frechet_distance() if conditions and frechet else None
        #: per-condition total reward before any update: ``{"indices" (M,), "rewards" (M,), "settings"}``; checkpointed
        self.heldout_baseline: dict | None = None
        self._heldout_rows: list[tuple[int, float, dict[str, float], float]] = []
        self._heldout_base_videos: dict[tuple[int, int], torch.Tensor] = {}  # base model's samples (uint8, CPU)

    def heldout_generator(self, index: int, draw: int, kind: str = "sample") -> torch.Generator:
        """CPU generator of held-out condition ``index``, noise draw ``draw`` (independent of rank,
        training seed and batch composition); ``kind``: ``"sample"`` (the sampler's noise) or ``"loss"`` (the
        noise level and noise of the held-out denoising loss)."""
        key = (f"heldout/{self.heldout_seed}/{index}/{draw}" if kind == "sample" else f"heldout-{kind}/{self.heldout_seed}/{index}/{draw}").encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))

    def _reward_names(self) -> list[str] | None:
        return getattr(self, "reward_names", None)

    def _has_rewards(self) -> bool:
        from lightning_vidalign.rewards.base import RewardCallback

        return self._trainer is not None and any(isinstance(cb, RewardCallback) for cb in self.trainer.callbacks)

    @torch.no_grad()
    def heldout_update(self, batch: dict) -> None:
        """Sample and score the held-out conditions of one validation batch (up to ``heldout_conditions``
        on this rank); rows are kept until :meth:`heldout_evaluation`."""
        if not self.heldout_conditions or (self._trainer is not None and self.trainer.sanity_checking):
            return
        have = len({row[0] for row in self._heldout_rows})
        if have >= self.heldout_per_rank():
            return
        indices = torch.as_tensor(batch["index"]).view(-1).tolist()
        real = batch["video"].float()
        for i, index in enumerate(indices[: self.heldout_per_rank() - have]):
            sub = {k: v[i : i + 1] for k, v in batch.items()}
            totals, parts, drift, losses = [], {}, [], []
            for draw in range(self.heldout_loss_draws if getattr(self.backbone, "single_level_loss", True) else 0):  # MeanFlow I2V: none (NaN)
                losses.append(self.heldout_denoising_loss(sub, self.heldout_generator(index, draw, kind="loss")))
            for draw in range(self.heldout_samples):
                video = self.rollout_videos(sub, self.heldout_generator(index, draw))
                if self._has_rewards():
                    total, components = self.score_rewards(video, self._reward_names(), batch=sub, log=False)
                    totals.append(float(total[0]))
                    for name, r in components.items():
                        parts.setdefault(name, []).append(float(r[0]))
                if self.heldout_drift:
                    key = (index, draw)
                    if key not in self._heldout_base_videos:
                        with self.backbone.adapters_disabled():
                            base = self.rollout_videos(sub, self.heldout_generator(index, draw))
                        self._heldout_base_videos[key] = (base.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
                    ours = (video.float().clamp(0, 1) * 255).round().cpu()  # both in uint8 steps: 0 at step 0
                    drift.append(float((ours - self._heldout_base_videos[key].float()).abs().mean() / 255))
                for metric in self.heldout_metrics.values():
                    metric.update(video.float())
                if self.heldout_frechet is not None:
                    self.heldout_frechet.update(video.float(), real=False)
            if self.heldout_frechet is not None and not self._frechet_heldout_real_done:
                self.heldout_frechet.update(real[i : i + 1], real=True)
            mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
            self._heldout_rows.append((int(index), mean(totals), {k: mean(v) for k, v in parts.items()}, mean(drift), mean(losses),
                                       self.heldout_extra(sub, int(index))))

    _frechet_heldout_real_done: bool = False

    def heldout_extra_keys(self) -> list[str]:
        """Names of an algorithm's own held-out measurements (logged as ``heldout/<name>``, the mean over held-out
        conditions); none here. A subclass that returns names implements :meth:`heldout_extra`."""
        return []

    def heldout_extra(self, clip: dict, index: int) -> dict[str, float]:
        """An algorithm's own held-out measurements of one held-out condition ``clip`` (batch of 1, dataset index
        ``index``): ``{name: value}`` for each of :meth:`heldout_extra_keys` (e.g. DPO's implicit accuracy)."""
        return {}

    def heldout_denoising_loss(self, clip: dict, generator: torch.Generator) -> float:
        """The training denoising loss of one held-out real clip (batch of 1) at the noise level and noise drawn
        from ``generator`` (fixed per condition and draw, so evaluations are paired): the objective SFT
        optimizes, measured where it never trained (``heldout/denoising_loss``, lower is better; our choice)."""
        x0 = self.backbone.encode(clip["video"])
        cond = self.backbone.encode_condition(clip, generator)
        sigma, noise = self.sample_noise(x0, generator)
        return float(self.backbone.training_loss(x0, cond, sigma, noise).mean())

    def heldout_per_rank(self) -> int:
        """Held-out conditions each rank evaluates: ``ceil(heldout_conditions / D)`` of its
        shard of the validation set (data-parallel rank ``r`` of ``D`` holds conditions ``r, r + D, ...``; the ranks
        of a sequence-parallel group evaluate the same ones together), so that about ``heldout_conditions`` are
        evaluated in all, the same ones at every evaluation."""
        return math.ceil(self.heldout_conditions / self.data_parallel_size)

    def heldout_settings(self) -> dict:
        """What fixes the held-out videos' noise and sampling (stored with the step-0 baseline; a resumed
        run with other settings drops the baseline, with a warning, instead of pairing other videos)."""
        return {"seed": self.heldout_seed, "samples": self.heldout_samples, "sampler": self.sampler,
                "num_inference_steps": self.num_inference_steps, "guidance": str(self.guidance), "loss_draws": self.heldout_loss_draws}

    def heldout_evaluation(self) -> dict[str, float]:
        """Gather this evaluation's held-out rows from every rank and return the metrics (then reset).

        Keys: ``heldout/batches_seen`` (training batches done: the x axis of learning curves),
        ``heldout/reward`` (mean over conditions of the total training reward, the weighted sum
        of the reward callbacks), ``heldout/reward_se`` (its standard error over conditions),
        ``heldout/reward/<name>`` (each callback, unweighted), ``heldout/reward_step0`` and
        ``heldout/improvement`` / ``heldout/improvement_se`` / ``heldout/improvement_z``: the paired
        difference to the step-0 reward of the same conditions and noise (mean, standard error over
        conditions, mean/SE; the learning criterion of the recipes is ``z >= 3``), ``heldout/<metric>``
        (motion score, dynamic degree, flickering, smoothness of the held-out samples),
        ``heldout/frechet_transnetv2`` (samples vs the held-out real clips),
        ``heldout/drift_from_base`` and ``heldout/denoising_loss`` (± ``_se``: the training denoising loss of the
        held-out real clips at fixed noise levels and noise, see :meth:`heldout_denoising_loss`) with
        ``heldout/denoising_loss_step0`` / ``_decrease`` / ``_decrease_se`` / ``_decrease_z`` (paired, step 0 minus
        now: positive when the loss went down; the SFT recipe's criterion). Reward keys only with reward callbacks; the improvement keys
        once a step-0 evaluation exists (:attr:`heldout_baseline`, set by the first evaluation of a
        fit before any update, saved with the checkpoints). Conditions are deduplicated by dataset
        index (a distributed sampler pads the last batch). Collective under DDP/FSDP2.
        """
        from lightning_vidalign.metrics import mean_and_standard_error

        rows = self._heldout_rows
        self._heldout_rows = []
        if self._has_rewards():  # the same columns on every rank (a rank may have no row)
            from lightning_vidalign.rewards.base import find_rewards

            names = sorted(cb.name for cb in find_rewards(self.trainer, self._reward_names()))
        else:
            names = []
        extra = self.heldout_extra_keys()
        local = torch.tensor([[row[0], row[1], row[3], row[4], *[row[5].get(k, float("nan")) for k in extra], *[row[2].get(n, float("nan")) for n in names]]
                              for row in rows], dtype=torch.float64).view(-1, 4 + len(extra) + len(names))
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            n = torch.tensor([local.shape[0]], device=self.device)
            most = int(self.all_gather(n).max())
            padded = torch.full((most, local.shape[1]), float("nan"), dtype=torch.float64)
            padded[: local.shape[0]] = local
            local = self.all_gather(padded.to(self.device)).reshape(-1, local.shape[1]).cpu()
            local = local[~torch.isnan(local[:, 0])]
        seen, keep = set(), []
        for r in range(local.shape[0]):
            if int(local[r, 0]) not in seen:
                seen.add(int(local[r, 0]))
                keep.append(r)
        table = local[keep]
        table = table[table[:, 0].argsort()]
        # training batches (rounds) completed: Lightning logs a validation after batch n at step n - 1
        out: dict[str, float] = {"heldout/batches_seen": float(0 if self._heldout_is_step0 else self.batches_seen)}
        for key, metric in self.heldout_metrics.items():
            if metric.update_called:
                out[f"heldout/{key}"] = float(metric.compute())
            metric.reset()
        if self.heldout_frechet is not None:
            self._frechet_heldout_real_done = True
            value = self.finish_frechet(self.heldout_frechet)
            if value is not None:
                out["heldout/frechet_transnetv2"] = float(value)
        if table.shape[0] == 0:
            return out
        columns = ["condition", "reward", "drift_from_base", "denoising_loss", *extra, *[f"reward/{n}" for n in names]]
        self.log_heldout_table(columns, table)
        if self.heldout_drift:
            out["heldout/drift_from_base"] = float(table[:, 2].mean())
        for j, key in enumerate(extra):
            out[f"heldout/{key}"] = float(table[:, 4 + j].nanmean())
        indices, losses = table[:, 0].long(), table[:, 3].float()
        out["heldout/denoising_loss"], out["heldout/denoising_loss_se"] = mean_and_standard_error(table[:, 3])
        if self._heldout_is_step0:
            self.heldout_baseline = {"indices": indices, "rewards": table[:, 1].float(), "denoising_loss": losses,
                                     "settings": self.heldout_settings()}
        if self.heldout_baseline is not None and "denoising_loss" in self.heldout_baseline:
            lookup = {int(i): float(v) for i, v in zip(self.heldout_baseline["indices"], self.heldout_baseline["denoising_loss"])}
            common = [k for k, i in enumerate(indices.tolist()) if i in lookup]
            if common:  # paired as the reward: step 0 minus now (positive = the loss went down)
                before = torch.tensor([lookup[int(indices[k])] for k in common], dtype=torch.float64)
                diff = before - losses[common].double()
                out["heldout/denoising_loss_step0"] = float(before.mean())
                out["heldout/denoising_loss_decrease"], se = mean_and_standard_error(diff)
                out["heldout/denoising_loss_decrease_se"] = se
                out["heldout/denoising_loss_decrease_z"] = out["heldout/denoising_loss_decrease"] / se if se > 0 else float("nan")
        if not torch.isnan(table[:, 1]).all():
            out["heldout/reward"], out["heldout/reward_se"] = mean_and_standard_error(table[:, 1])
            for j, name in enumerate(names):
                out[f"heldout/reward/{name}"] = float(table[:, 4 + len(extra) + j].mean())
            rewards = table[:, 1].float()
            if self.heldout_baseline is not None:
                base_idx, base_r = self.heldout_baseline["indices"], self.heldout_baseline["rewards"]
                lookup = {int(i): float(r) for i, r in zip(base_idx, base_r)}
                common = [k for k, i in enumerate(indices.tolist()) if i in lookup]
                if common:
                    before = torch.tensor([lookup[int(indices[k])] for k in common], dtype=torch.float64)
                    diff = rewards[common].double() - before
                    out["heldout/reward_step0"] = float(before.mean())
                    out["heldout/improvement"], out["heldout/improvement_se"] = mean_and_standard_error(diff)
                    se = out["heldout/improvement_se"]
                    out["heldout/improvement_z"] = out["heldout/improvement"] / se if se > 0 else float("nan")
        return out

    def log_heldout_table(self, columns: list[str], table: torch.Tensor) -> None:
        """Log this evaluation's per-condition rows to the W&B, MLflow and TensorBoard loggers (others have no table: skipped),
        on rank 0 (no collective: the rows are gathered before), at the global step: W&B as a table ``heldout/conditions``
        (``wandb.Table``), MLflow as the artifact ``heldout/conditions_step<N>.json`` (``log_table``), TensorBoard as a
        Markdown text ``heldout/conditions``. Columns that are all NaN (no reward callback, drift off) are left out. A
        logger that fails here is named in a warning, not raised (the other ranks would wait at their next collective).
        Our choice.

        Args:
            columns: the names of ``table``'s columns, the first ``"condition"`` (the dataset index).
            table: ``(conditions, len(columns))`` float64, one row per held-out condition, sorted by index.
        """
        if self._trainer is None or not self.trainer.is_global_zero or not self.loggers:
            return
        from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

        keep = [j for j in range(table.shape[1]) if not torch.isnan(table[:, j]).all()]
        cols = [columns[j] for j in keep]
        rows = [[int(r[0])] + [float(r[j]) for j in keep[1:]] for r in table]
        step = self.global_step
        for logger in self.loggers:
            try:
                if isinstance(logger, WandbLogger):
                    logger.log_table(key="heldout/conditions", columns=cols, data=rows, step=step)
                elif isinstance(logger, MLFlowLogger):
                    logger.experiment.log_table(logger.run_id, data={c: [row[i] for row in rows] for i, c in enumerate(cols)},
                                                artifact_file=f"heldout/conditions_step{step}.json")
                elif isinstance(logger, TensorBoardLogger):
                    text = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                    text += "\n".join("| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows)
                    logger.experiment.add_text("heldout/conditions", text, step)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop rank 0 alone
                import logging

                logging.getLogger(__name__).warning("held-out table not logged to %s at step %d: %s: %s", type(logger).__name__, step, type(e).__name__, e)

    _heldout_is_step0: bool = False

    def on_train_start(self) -> None:
        """Held-out evaluation before the first update (step 0) of a fit that starts from scratch:
        the reference point of ``heldout/improvement``; logged at step 0 to every logger."""
        if not self.heldout_conditions or self.global_step != 0 or self.heldout_baseline is not None:
            return
        # the loader Lightning prepared (with its distributed sampler: each rank its shard, as in validation)
        loader = self.trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None and self.trainer.datamodule is not None:
            loader = self.trainer.datamodule.val_dataloader()
        if loader is None:
            raise ValueError("heldout_conditions > 0 needs a datamodule with a val_dataloader (the held-out conditions)")
        modes = {m: m.training for m in self.modules()}  # restored after: the frozen base stays in eval mode
        self.eval()
        for batch in loader:
            self.heldout_update(self.trainer.strategy.batch_to_device(batch))
            if len(self._heldout_rows) >= self.heldout_per_rank():
                break
        self._heldout_is_step0 = True
        try:
            metrics = self.heldout_evaluation()
        finally:
            self._heldout_is_step0 = False
        for m, mode in modes.items():
            m.train(mode)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
        self.print_heldout(metrics)

    def print_heldout(self, metrics: dict[str, float]) -> None:
        """One console line (rank 0) per held-out evaluation: reward ± SE, the paired improvement and its z,
        the drift from the base."""
        from lightning.pytorch.utilities import rank_zero_info

        if not {"heldout/reward", "heldout/drift_from_base", "heldout/denoising_loss"} & set(metrics):
            return
        parts = [f"held-out after {int(metrics.get('heldout/batches_seen', 0))} batches:"]
        if "heldout/reward" in metrics:
            parts.append(f"reward {metrics['heldout/reward']:.4f} ± {metrics['heldout/reward_se']:.4f}")
        if "heldout/improvement" in metrics and metrics.get("heldout/batches_seen", 0) > 0:
            parts.append(f"improvement {metrics['heldout/improvement']:+.4f} (z {metrics['heldout/improvement_z']:.1f})")
        if "heldout/drift_from_base" in metrics:
            parts.append(f"drift from base {metrics['heldout/drift_from_base']:.4f}")
        for key in self.heldout_extra_keys():
            if f"heldout/{key}" in metrics:
                parts.append(f"{key} {metrics[f'heldout/{key}']:.3f}")
        if "heldout/denoising_loss" in metrics:
            loss = f"denoising loss {metrics['heldout/denoising_loss']:.4f}"
            if "heldout/denoising_loss_decrease" in metrics and metrics.get("heldout/batches_seen", 0) > 0:
                loss += f" (decrease {metrics['heldout/denoising_loss_decrease']:+.5f}, z {metrics['heldout/denoising_loss_decrease_z']:.1f})"
            parts.append(loss)
        rank_zero_info(parts[0] + " " + ", ".join(parts[1:]))
