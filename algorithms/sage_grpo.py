"""SAGE-GRPO: precise manifold-aware SDE, gradient-norm equalizer, dual moving KL, adaptive λ_KL."""
from __future__ import annotations

from lightning_vidalign.algorithms.grpo import GRPO
from lightning_vidalign.algorithms.kl import AdaptiveKLController


class SAGEGRPO(GRPO):
    """SAGE-GRPO (Stable Alignment via Exploration), papers/sage_grpo.txt.

    :class:`GRPO` with the paper's choices as defaults:

    - ``sde_type="sage"``: the integrated variance ``Σ`` of Eq. 5–7 (``std = sqrt(Σ)``);
    - ``equalizer=True``: each step's policy term scaled by ``S_t = median(N)/N_t`` with
      ``N_t = (Δ + 0.5·Σ·(1-s)/s)/sqrt(Σ)`` (Eq. 9, App. A.5);
    - ``kl_type="dual"``: ``1.0·KL(π_θ‖π_anchor) + 0.1·KL(π_θ‖π_old)`` with the anchor refreshed
      every 10 optimizer steps (Eq. 13–15);
    - ``kl_controller``: λ_KL warm-up 1e-7 → 1e-5 over 100 steps, then the ×0.9/×1.1 controller
      (App. A.6, the paper's direction by default). A fixed ``kl_coef`` instead (``kl_controller: null``,
      ``kl_coef: 0.1``) turns the controller off: giving both is refused.

    Any of these can be overridden (e.g. for ablations); all other arguments are :class:`GRPO`'s.

    Raises:
        ValueError: when both ``kl_controller`` and ``kl_coef`` are given.
    """

    def __init__(
        self,
        *args,
        sde_type: str = "sage",
        equalizer: bool = True,
        kl_type: str = "dual",
        kl_weights: tuple[float, float] = (1.0, 0.1),
        anchor_interval: int = 10,
        kl_controller: AdaptiveKLController | None = None,
        kl_coef: float | None = None,
        **kwargs,
    ):
        if kl_controller is not None and kl_coef is not None:
            raise ValueError(f"SAGEGRPO: kl_coef={kl_coef} and a kl_controller are both given; the controller sets λ_KL, so "
                             "kl_coef would be ignored: set kl_controller: null for a fixed λ_KL, or drop kl_coef")
        if kl_controller is None and kl_coef is None:  # the paper's adaptive λ_KL
            kl_controller = AdaptiveKLController()
        super().__init__(
            *args,
            sde_type=sde_type,
            equalizer=equalizer,
            kl_type=kl_type,
            kl_weights=kl_weights,
            anchor_interval=anchor_interval,
            kl_controller=kl_controller,
            kl_coef=0.0 if kl_coef is None else kl_coef,
            **kwargs,
        )
