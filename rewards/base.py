"""Reward callbacks: scorers that live in ``trainer.callbacks`` (DESIGN §2, "Rewards")."""
from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


class RewardCallback(L.Callback):
    """Base class of reward callbacks.

    A reward callback owns a scorer; algorithms find it among ``trainer.callbacks`` (by type or
    ``name``) and call :meth:`score`. Its state (models, optimizers) is saved with the checkpoint.

    Args:
        name: metric namespace (``reward/<name>/*``) and lookup key.
        weight: weight of this reward when an algorithm sums several.
    """

    def __init__(self, name: str, weight: float = 1.0):
        super().__init__()
        self.name = name
        self.weight = weight
        self.device = torch.device("cpu")

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.device = pl_module.device
        self.to(self.device)

    def to(self, device: torch.device) -> "RewardCallback":
        """Move the scorer's models to ``device`` (override when there are models)."""
        self.device = torch.device(device)
        return self

    def score(self, videos: Tensor, batch: dict | None = None) -> Tensor:
        """Reward per video.

        Args:
            videos: ``(B, T, 3, H, W)`` in ``[0, 1]``.
            batch: the conditions/metadata of the videos (may be None).

        Returns:
            ``(B,)`` float rewards.
        """
        raise NotImplementedError

    def score_components(self) -> dict[str, Tensor]:
        """Optional named parts of the last :meth:`score` call."""
        return {}


def find_rewards(trainer: L.Trainer, names: list[str] | None = None) -> list[RewardCallback]:
    """The reward callbacks of ``trainer`` (all, or those named in ``names``, in that order).

    Raises:
        ValueError: if none is present, or a named one is missing.
    """
    found = [cb for cb in trainer.callbacks if isinstance(cb, RewardCallback)]
    if names is not None:
        by_name = {cb.name: cb for cb in found}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"reward callback(s) {missing} not in trainer.callbacks (have {sorted(by_name)})")
        found = [by_name[n] for n in names]
    if not found:
        raise ValueError("no RewardCallback in trainer.callbacks: add one under trainer.callbacks in the config")
    return found
