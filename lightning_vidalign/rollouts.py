"""One round's rollouts as one record (issue 33): what the generate → score → update phases of an on-policy method
pass to each other.

A :class:`Rollouts` holds, for the ``N = B·G`` rollouts of a round (``G`` per condition of a batch of ``B``), every
per-rollout tensor with its first dimension ``N``, in rollout order (the ``G`` rollouts of a condition contiguous, the
order of ``repeat_interleave``). The phases fill it in turn: generation the conditions, latents, videos and (for
policy-gradient methods) the trajectory with its log-probabilities; scoring the rewards and advantages. Our design,
after verl's ``DataProto`` and TRL's generate/score/train split.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

#: the fields holding one row per rollout (first dimension ``N``); ``conditions``/``components`` are dicts of such tensors
PER_ROLLOUT = ("latents", "videos", "x_t", "x_next", "log_prob", "means", "group_ids", "rewards", "advantages")


def _rows(value: Any, index: Tensor | slice) -> Any:
    """Rows ``index`` of a per-rollout tensor, or of each tensor of a dict of them."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _rows(v, index) for k, v in value.items()}
    return value[index.to(value.device) if torch.is_tensor(index) else index]


def _batch_rows(batch: dict | None, index: Tensor | slice, n: int) -> dict | None:
    """Rows ``index`` of the entries of a raw batch that have ``n`` rows (tensors by their first dimension, lists and
    tuples by length); anything else passed as it is — the rule of :func:`~lightning_vidalign.rewards.base.slice_batch`
    (e.g. a latent cache's ``cached`` dict or a scalar ``fps``)."""
    if batch is None:
        return None
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[index.to(v.device) if torch.is_tensor(index) else index]
        elif isinstance(v, (list, tuple)) and len(v) == n:
            picked = v[index] if isinstance(index, slice) else [v[int(i)] for i in index]
            out[k] = type(v)(picked) if isinstance(v, tuple) else list(picked)
        else:
            out[k] = v
    return out


@dataclass
class Rollouts:
    """The rollouts of one round and everything computed about them.

    Shapes (``N`` rollouts, ``S`` denoising steps, latents ``(T', C, h, w)``, videos ``T`` frames of ``H×W``):

    Attributes:
        conditions: the backbone's encoded condition of each rollout, ``{key: (N, ...)}`` (each condition repeated
            ``G`` times).
        batch: the raw condition entries of the rollouts (:func:`~lightning_vidalign.rewards.base.repeat_batch` of the
            training batch: captions, paths, ... repeated per rollout; entries without ``N`` rows, such as a latent
            cache's ``cached`` dict, as they are), what the reward callbacks see; None when not kept.
        latents: final clean latents ``(N, T', C, h, w)``; None when not kept.
        videos: decoded videos ``(N, T, 3, H, W)`` in ``[0, 1]``.
        sigmas: the ``S + 1`` noise levels of the schedule (1-D, shared by all rollouts; last 0); None for a sampler
            without one.
        x_t, x_next: per-step transition ``(N, S, T', C, h, w)`` (policy-gradient methods: ``keep_trajectory``).
        log_prob: per-step log-probabilities of the transitions under the policy that drew them, ``(N, S)`` fp32.
        means: per-step transition means ``(N, S, T', C, h, w)`` (methods that need per-element old log-probs, ViPO).
        group_ids: ``(N,)`` long: rollouts of one condition share an id (GRPO: the dataset index or a caption hash).
        rewards: ``(N,)`` fp32: the weighted sum of the reward callbacks' scores.
        components: ``{reward name: (N,)}``: each reward callback's unweighted score.
        advantages: ``(N,)`` fp32.
        generator: the round's CPU generator: the phases after generation continue its stream (a round's draws are one
            sequence, so that splitting a method into phases changed no number).
        pending: reward jobs submitted and not yet collected (``VideoAlignModule.submit_rewards`` handles; with
            ``overlap_rewards`` they run while later chunks are generated). Not part of :meth:`state_dict`.
    """

    conditions: dict[str, Tensor] = field(default_factory=dict)
    batch: dict | None = None
    latents: Tensor | None = None
    videos: Tensor | None = None
    sigmas: Tensor | None = None
    x_t: Tensor | None = None
    x_next: Tensor | None = None
    log_prob: Tensor | None = None
    means: Tensor | None = None
    group_ids: Tensor | None = None
    rewards: Tensor | None = None
    components: dict[str, Tensor] = field(default_factory=dict)
    advantages: Tensor | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    pending: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        """``N``, from the first per-rollout field that is set.

        Raises:
            ValueError: when no per-rollout field is set.
        """
        for name in PER_ROLLOUT:
            value = getattr(self, name)
            if value is not None:
                return int(value.shape[0])
        for values in (self.conditions, self.components):
            for value in values.values():
                return int(value.shape[0])
        raise ValueError("Rollouts: empty record (no per-rollout field set)")

    def select(self, index: Tensor | slice) -> "Rollouts":
        """The rollouts ``index`` (a long tensor of positions, or a slice) as a new record: every per-rollout field
        indexed, ``sigmas`` and ``generator`` shared, ``pending`` left out."""
        rows = {name: _rows(getattr(self, name), index) for name in (*PER_ROLLOUT, "conditions", "components")}
        return Rollouts(**rows, batch=_batch_rows(self.batch, index, len(self)), sigmas=self.sigmas, generator=self.generator)

    def chunks(self, size: int) -> list["Rollouts"]:
        """Consecutive records of ``size`` rollouts (the last may be smaller), in rollout order.

        Raises:
            ValueError: on ``size < 1``.
        """
        if size < 1:
            raise ValueError(f"Rollouts.chunks: size must be >= 1, got {size}")
        n = len(self)
        return [self.select(slice(i, min(i + size, n))) for i in range(0, n, size)]

    @classmethod
    def cat(cls, parts: list["Rollouts"]) -> "Rollouts":
        """The records ``parts`` one after the other (rollout order kept): per-rollout fields concatenated (a field
        must be set in every part or in none; an entry every part shares, such as a batch's non-row entries, kept once),
        ``sigmas`` and ``generator`` of the first part, ``pending`` joined.

        Raises:
            ValueError: on no parts, or a field set in some parts only.
        """
        if not parts:
            raise ValueError("Rollouts.cat: no parts")
        if len(parts) == 1:  # (no copy)
            return parts[0]

        def join(values: list) -> Any:
            if all(v is values[0] for v in values):  # None everywhere, or one shared entry (a batch's non-row entries)
                return values[0]
            if any(v is None for v in values):
                raise ValueError("Rollouts.cat: a field is set in some parts only")
            if isinstance(values[0], dict):
                return {k: join([v[k] for v in values]) for k in values[0]}
            if torch.is_tensor(values[0]):
                return torch.cat(values)
            if isinstance(values[0], (list, tuple)):
                return [x for v in values for x in v]
            return values[0]

        out = {name: join([getattr(p, name) for p in parts]) for name in (*PER_ROLLOUT, "conditions", "components", "batch")}
        out["conditions"] = out["conditions"] or {}
        out["components"] = out["components"] or {}
        return cls(**out, sigmas=parts[0].sigmas, generator=parts[0].generator, pending=[h for p in parts for h in p.pending])

    def gather(self, all_gather: Callable[[Tensor], Tensor], fields: tuple[str, ...] = ("group_ids", "rewards", "components")) -> "Rollouts":
        """The rollouts of every data-parallel rank (concatenated in rank order) for the named ``fields`` only — the
        small per-rollout values that a group advantage needs — as a new record (other fields None).

        Args:
            all_gather: gathers one per-rollout tensor over the ranks (``VideoAlignModule.gather_data_parallel``).
            fields: names of per-rollout fields (``components`` / ``conditions``: every entry).
        """
        out = Rollouts(sigmas=self.sigmas, generator=self.generator)
        for name in fields:
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(out, name, {k: all_gather(v) for k, v in value.items()})
            elif value is not None:
                setattr(out, name, all_gather(value))
        return out

    def drop(self, *fields: str) -> "Rollouts":
        """A copy without the named fields (e.g. the trajectory ``x_t``, ``x_next``, ``means`` once the update is done:
        they are the round's largest tensors)."""
        return dataclasses.replace(self, **{name: ({} if name in ("conditions", "components") else None) for name in fields}, pending=[])

    def state_dict(self) -> dict[str, Any]:
        """The record's tensors (detached, on CPU), e.g. to save a round for inspection or a buffer in a checkpoint:
        every field but ``generator`` and ``pending``."""
        def cpu(value: Any) -> Any:
            if torch.is_tensor(value):
                return value.detach().cpu()
            if isinstance(value, dict):
                return {k: cpu(v) for k, v in value.items()}
            return value

        return {name: cpu(getattr(self, name)) for name in (*PER_ROLLOUT, "conditions", "components", "batch", "sigmas")}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Rollouts":
        """The record :meth:`state_dict` wrote.

        Raises:
            KeyError: naming a field the state lacks.
        """
        names = (*PER_ROLLOUT, "conditions", "components", "batch", "sigmas")
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"Rollouts.from_state_dict: state lacks {missing}")
        return cls(**{n: state[n] for n in names})
