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


def repeat_batch(batch: dict | None, repeats: int, size: int | None = None, drop: tuple[str, ...] = ("video", "winner", "loser")) -> dict | None:
    """The batch of ``B`` conditions repeated for ``B·repeats`` rollouts (each row ``repeats`` times in a row,
    the order of ``repeat_interleave``), so that a reward sees the caption of each rollout.

    Entries with ``B`` rows (tensors by their first dimension, lists and tuples by length) are repeated;
    anything else (scalars, strings, dicts) is passed unchanged. The keys in ``drop`` (the real clips) are
    left out: the rollouts are the scored videos, and ``G`` copies of the real clips would cost ``G`` times
    their memory. ``B`` is ``size`` or ``len(batch["video"])``. Our choice.

    Args:
        batch: the training batch (None gives None).
        repeats: rollouts per condition ``G``.
        size: number of conditions ``B`` (default: the batch's ``video`` rows).
        drop: keys not passed on.
    """
    if batch is None:
        return None
    if size is None:
        if "video" not in batch:
            raise KeyError(f"repeat_batch: give size=B or a batch with 'video' (batch has keys {sorted(batch)})")
        size = len(batch["video"])
    out = {}
    for k, v in batch.items():
        if k in drop:
            continue
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size:
            out[k] = v.repeat_interleave(repeats, 0)
        elif isinstance(v, (list, tuple)) and len(v) == size:
            out[k] = type(v)(x for x in v for _ in range(repeats))
        else:
            out[k] = v
    return out


def slice_batch(batch: dict | None, start: int, stop: int, size: int) -> dict | None:
    """Rows ``start:stop`` of a batch of ``size`` rows (entries with ``size`` rows are sliced, others passed
    as they are): the conditions of one chunk of rollouts of a :func:`repeat_batch` batch."""
    if batch is None:
        return None
    out = {}
    for k, v in batch.items():
        if (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size) or (isinstance(v, (list, tuple)) and len(v) == size):
            out[k] = v[start:stop]
        else:
            out[k] = v
    return out


def batch_captions(batch: dict | None, n: int, who: str, keys: tuple[str, ...] = ("caption", "prompt", "text")) -> list[str]:
    """The ``n`` captions of the scored videos, from the batch's first key among ``keys``.

    Raises:
        KeyError: the batch (or None) has none of ``keys`` (a text-conditioned reward needs captions: pass
            ``batch=`` to ``score``).
        ValueError: the captions are not ``n`` strings.
    """
    key = next((k for k in keys if batch is not None and k in batch), None)
    if key is None:
        have = "no batch" if batch is None else f"batch keys {sorted(batch)}"
        raise KeyError(f"{who}: needs the videos' captions in batch[{keys[0]!r}] (or {list(keys[1:])}); got {have}")
    caps = batch[key]
    if isinstance(caps, str):
        caps = [caps]
    caps = list(caps)
    if len(caps) != n or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"{who}: batch[{key!r}] must hold {n} strings (one per video), got {len(caps)} of types {sorted({type(c).__name__ for c in caps})}")
    return caps


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
