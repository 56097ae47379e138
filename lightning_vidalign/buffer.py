"""On-policy rollout buffer that is part of the checkpoint."""
from __future__ import annotations

import torch
from torch import Tensor


class RolloutBuffer:
    """A filled round of rollouts, served as shuffled minibatches for ``passes`` passes.

    Holds named batch-first tensors (latents, conditions, videos, rewards, advantages, ...). The
    order of every pass is drawn from a generator seeded with ``(seed, round)``, so a resumed run
    (from :meth:`state_dict`) serves the same minibatches as an uninterrupted one.

    Args:
        passes: number of passes ``K`` over each round (SHIFT App. C: 10).
        minibatch_size: rollouts per minibatch (the last minibatch of a pass may be smaller).
        seed: base seed of the shuffling.
    """

    def __init__(self, passes: int, minibatch_size: int, seed: int = 0):
        if passes < 1 or minibatch_size < 1:
            raise ValueError(f"RolloutBuffer: passes and minibatch_size must be >= 1, got {passes}, {minibatch_size}")
        self.passes, self.minibatch_size, self.seed = passes, minibatch_size, seed
        self.data: dict[str, Tensor] = {}
        self.round = 0
        self.cursor = 0  # minibatches served in this round
        self.order: Tensor | None = None

    def __len__(self) -> int:
        return 0 if not self.data else next(iter(self.data.values())).shape[0]

    @property
    def minibatches_per_pass(self) -> int:
        return -(-len(self) // self.minibatch_size)

    @property
    def exhausted(self) -> bool:
        return not self.data or self.cursor >= self.passes * self.minibatches_per_pass

    def fill(self, **tensors: Tensor) -> None:
        """Start a new round with ``tensors`` (all with the same first dimension, stored on CPU).

        Raises:
            ValueError: if the first dimensions differ or nothing is given.
        """
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"RolloutBuffer.fill: tensors need one common batch size, got {sizes}")
        self.data = {k: v.detach().cpu() for k, v in tensors.items()}
        self.round += 1
        self.cursor = 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.round)
        n = len(self)
        self.order = torch.cat([torch.randperm(n, generator=g) for _ in range(self.passes)])

    def next_minibatch(self) -> dict[str, Tensor]:
        """The next minibatch (dict of tensors).

        Raises:
            RuntimeError: if the round is exhausted (call :meth:`fill` first).
        """
        if self.exhausted:
            raise RuntimeError("RolloutBuffer: round exhausted or empty; fill() a new round first")
        n, per = len(self), self.minibatches_per_pass
        p, j = divmod(self.cursor, per)
        idx = self.order[p * n + j * self.minibatch_size : p * n + min((j + 1) * self.minibatch_size, n)]
        self.cursor += 1
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {
            "data": self.data,
            "round": self.round,
            "cursor": self.cursor,
            "order": self.order,
            "seed": self.seed,
            "minibatch_size": self.minibatch_size,
            "passes": self.passes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.data, self.round, self.cursor = state["data"], state["round"], state["cursor"]
        self.order, self.seed = state["order"], state["seed"]
        self.minibatch_size, self.passes = state["minibatch_size"], state["passes"]
