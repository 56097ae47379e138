"""KL-coefficient schedule of SAGE-GRPO (App. A.6): linear warm-up, then a proportional controller."""
from __future__ import annotations

from collections import deque


class AdaptiveKLController:
    """``λ_KL`` over optimizer steps ``k`` (SAGE-GRPO App. A.6, Eq. 41–42).

    Warm-up: ``λ(k) = λ_min + (λ_max - λ_min)·k/K`` for ``k <= K``. Afterwards, with ``D̄`` the mean
    of the last ``H`` observed KL values and ``D*`` the target:

    - ``rule="paper"`` (default, Eq. 42 as printed): ``λ ← 0.9·λ`` if ``D̄ > 1.5·D*``,
      ``λ ← 1.1·λ`` if ``D̄ < 0.5·D*`` (a large KL *relaxes* the constraint, as the paper says);
    - ``rule="conventional"``: the opposite direction (a large KL tightens it, as in PPO's adaptive KL);

    clamped to ``[λ_min, λ_max]``. ``D*`` is not given in the paper: our default 1e-3 is a setting,
    not a result; calibrate it to the KL your run logs (``kl/total``).

    Args:
        kl_min, kl_max: bounds ``λ_min = 1e-7``, ``λ_max = 1e-5`` (paper).
        warmup_steps: ``K = 100`` (paper).
        target: ``D*``.
        history: ``H = 10`` (paper).
        rule: ``"paper"`` or ``"conventional"``.
        factor_down, factor_up: 0.9 and 1.1 (paper).
        band: 0.5 (paper: the ``(1 ± 0.5)·D*`` band).

    State (``state_dict``) is part of the algorithm's checkpoint.
    """

    def __init__(
        self,
        kl_min: float = 1e-7,
        kl_max: float = 1e-5,
        warmup_steps: int = 100,
        target: float = 1e-3,
        history: int = 10,
        rule: str = "paper",
        factor_down: float = 0.9,
        factor_up: float = 1.1,
        band: float = 0.5,
    ):
        if not 0 <= kl_min <= kl_max:
            raise ValueError(f"AdaptiveKLController: need 0 <= kl_min <= kl_max, got {kl_min}, {kl_max}")
        if rule not in ("paper", "conventional"):
            raise ValueError(f"AdaptiveKLController: rule must be 'paper' or 'conventional', got {rule!r}")
        if warmup_steps < 0 or history < 1 or target <= 0:
            raise ValueError(f"AdaptiveKLController: bad warmup_steps={warmup_steps}, history={history}, target={target}")
        self.kl_min, self.kl_max, self.warmup_steps = kl_min, kl_max, warmup_steps
        self.target, self.rule, self.band = target, rule, band
        self.factor_down, self.factor_up = factor_down, factor_up
        self.history: deque[float] = deque(maxlen=history)
        self.step_count = 0
        self.value = kl_min if warmup_steps > 0 else kl_max

    def update(self, observed_kl: float) -> float:
        """Record the KL of the step just taken, advance one step, return the new ``λ_KL``."""
        self.history.append(float(observed_kl))
        self.step_count += 1
        k = self.step_count
        if k <= self.warmup_steps:
            self.value = self.kl_min + (self.kl_max - self.kl_min) * k / self.warmup_steps
            return self.value
        mean = sum(self.history) / len(self.history)
        high, low = mean > (1 + self.band) * self.target, mean < (1 - self.band) * self.target
        if self.rule == "conventional":
            high, low = low, high
        if high:
            self.value *= self.factor_down
        elif low:
            self.value *= self.factor_up
        self.value = min(self.kl_max, max(self.kl_min, self.value))
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "step_count": self.step_count, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.step_count = float(state["value"]), int(state["step_count"])
        self.history.clear()
        self.history.extend(state["history"])
