"""MixGRPO: mixed ODE-SDE sampling with a sliding window (Li et al. 2025, arXiv 2507.21802)."""
from __future__ import annotations

import torch

from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.rollouts import Rollouts
from lightning_vidalign.sampling import WINDOW_STRATEGIES, mix_grpo_window


class MixGRPO(GRPO):
    """GRPO whose rollouts are stochastic, and trained, only inside a window of denoising steps; ODE elsewhere.

    At round ``i`` the window is :func:`~lightning_vidalign.sampling.mix_grpo_window`: ``w = window_size`` steps from
    ``c = (⌊i/τ⌋ mod P)·stride`` (``τ = shift_interval``), the last two steps never in it. Every window step is trained
    (``timestep_fraction = 1``), so a round trains ``w`` steps instead of DanceGRPO's/Flow-GRPO's share of all ``S``;
    the steps outside the window are deterministic (no log-prob, nothing to train). ``sde_type`` default
    ``flow_grpo`` with ``η = 0.7`` (the reference's ``--flow_grpo_sampling``).

    Reference: Tencent-Hunyuan/MixGRPO ``fastvideo/train_grpo_flux.py`` and ``fastvideo/utils/grpo_states.py``
    (``progressive`` with ``--roll_back``, ``random``), matched but for the roll-back point (see
    :func:`~lightning_vidalign.sampling.mix_grpo_window`). **MixGRPO-Flash** (``flash_ratio``, the reference's
    ``compress_ratio``: 0.4, or 0.2 with a frozen window): the steps after the window on a compressed schedule with the
    deterministic 2nd-order DPM-Solver++ (``dpmsolver++``, midpoint), fewer network calls per rollout; the steps up to the
    window's end are unchanged (Euler ODE before it). Not implemented: the ``decay``/``exp_decay`` shift intervals,
    ``--init_same_noise``, DPM orders 3 and ``heun``.

    Args:
        window_size: ``w`` (reference: 4).
        shift_interval: rounds per window position ``τ`` (reference: 25).
        window_stride: steps per shift (reference: 1).
        window_strategy: ``"progressive"`` | ``"random"`` (a position drawn per round from the run's seed and the round).
        flash_ratio: MixGRPO-Flash's compression of the steps after the window (None: off).
        **kwargs: :class:`GRPO` arguments; ``sde_window`` is set by the schedule and must not be given.

    Raises:
        ValueError: on an unknown strategy, ``sde_window`` given, or a schedule too short for a window.
    """

    def __init__(self, *args, sde_type: str = "flow_grpo", timestep_fraction: float = 1.0, window_size: int = 4, shift_interval: int = 25,
                 window_stride: int = 1, window_strategy: str = "progressive", flash_ratio: float | None = None, **kwargs):
        if kwargs.get("sde_window") is not None:
            raise ValueError("MixGRPO: sde_window is set by the sliding window each round; give window_size/shift_interval/window_stride instead")
        super().__init__(*args, sde_type=sde_type, timestep_fraction=timestep_fraction, **kwargs)
        if window_strategy not in WINDOW_STRATEGIES:
            raise ValueError(f"MixGRPO: window_strategy must be one of {WINDOW_STRATEGIES}, got {window_strategy!r}")
        self.window_size, self.shift_interval, self.window_stride, self.window_strategy = window_size, shift_interval, window_stride, window_strategy
        if flash_ratio is not None and not 0 < flash_ratio <= 1:
            raise ValueError(f"MixGRPO: flash_ratio must be in (0, 1] or null, got {flash_ratio}")
        self.flash_ratio = flash_ratio
        self.window(0)  # validates the settings against the schedule

    def window(self, iteration: int) -> list[int]:
        """The SDE (and trained) steps of round ``iteration`` (0-based)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        return mix_grpo_window(iteration, self.num_inference_steps, self.window_size, self.shift_interval, self.window_stride,
                               self.window_strategy, generator)

    def rollout_options(self) -> dict:
        return {**super().rollout_options(), "flash_ratio": self.flash_ratio}

    def generate(self, batch: dict) -> Rollouts:
        """The round's window (from the rounds done: resumes to the same window), then GRPO's rollouts with it."""
        self.sde_window = self.window(self.batches_seen - 1)  # batches_seen counts this round already
        rollouts = super().generate(batch)
        self.log_dict({"mix/window_start": float(self.sde_window[0]), "mix/window_size": float(len(self.sde_window)),
                       "mix/steps": float(len(rollouts.sigmas) - 1)}, batch_size=1)  # (Flash: fewer)
        return rollouts
