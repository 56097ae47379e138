"""DiffusionNFT: online RL on the forward process with implicit positive and negative policies (Zheng et al. 2025,
"DiffusionNFT: Online Diffusion Reinforcement with Forward Process")."""
from __future__ import annotations

from torch import Tensor

from lightning_vidalign.algorithms.forward_process import ForwardProcessGRPO
from lightning_vidalign.algorithms.losses import nft_loss


class DiffusionNFT(ForwardProcessGRPO):
    """Negative-aware fine-tuning: CFG-free, likelihood-free, any sampler for the rollouts.

    Each round draws ``G`` rollouts per condition with the **old** policy (``sample_with_old_policy``, as NVlabs'
    ``"old"`` adapter and UniRL's ``requires_ema_rollout``), scores them, and trains the current policy ``v_θ`` on noised
    copies of their clean latents with :func:`~lightning_vidalign.algorithms.losses.nft_loss`:
    ``v⁺ = β·v_θ + (1-β)·v_old``, ``v⁻ = (1+β)·v_old - β·v_θ``, ``r = 0.5 + 0.5·clip(A/Z, ±1)``,
    ``L = Z·(r·ℓ⁺ + (1-r)·ℓ⁻)/β`` (``Z = advantage_clip``). Rollouts with positive advantage pull ``v⁺`` to them,
    negative ones push ``v⁻`` to them, i.e. ``v_θ`` away. Then ``θ_old ← d·θ_old + (1-d)·θ`` with
    ``d = min(0.001·step, 0.5)`` (NVlabs ``decay_type=1``).

    Reference (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``, matched by default; UniRL ``unirl/algorithms/diffusionnft.py``):
    the loss in ``x0`` space with adaptive weights (``space="x0"``; ``"velocity"`` is the paper's plain form), each
    rollout trained at its own random ``int(S·0.99)`` of the ``S`` sampling levels (UniRL: the ``S-1`` largest, shared),
    fresh noise per level, advantages over the global std (``advantage_std="global"``, flow_grpo's stat tracker with
    ``global_std``; UniRL: unbiased std), ``kl_coef = 1e-4`` on ``mean((v_θ - v_ref)²)`` (NVlabs ``train.beta``;
    UniRL: none), rollouts with the deterministic sampler (NVlabs: 2nd-order DPM ODE; UniRL: Euler ODE, ours).

    One optimizer step per round (``minibatches_per_round: 1``, GRPO's default) as the reference's one per epoch: with
    more, every later minibatch's loss holds ``v_θ`` to the round's ``v_old`` (at ``r = 0.5`` its gradient in ``v_θ`` is
    ``2·Z·β·s·(v_θ - v_old)/w`` per element: the implicit policies' trust region) and under Adam
    undoes much of the step before it — measured on the recipe: 2 steps per round +0.022 to +0.033 held-out
    luminance in 20 rounds, 1 step +0.19 to +0.24 (seeds 0–2).

    Args:
        beta: ``β > 0``, the strength of the implicit policies (NVlabs: 1.0; 0.1 for OCR).
        space: ``"x0"`` (reference) | ``"velocity"``.
        timestep_fraction: share of the sampling levels each rollout trains (NVlabs: 0.99).
        kl_coef: velocity KL to the base model (NVlabs: 1e-4).
        **kwargs: :class:`~lightning_vidalign.algorithms.forward_process.ForwardProcessGRPO` and :class:`GRPO`
            arguments (``sde_type`` default ``"ode"``, ``advantage_clip`` = ``Z`` default 5, ``old_policy_decay``).

    Raises:
        ValueError: on ``beta <= 0`` or an unknown ``space``.
    """

    def __init__(self, *args, beta: float = 1.0, space: str = "x0", timestep_fraction: float = 0.99, kl_coef: float = 1e-4,
                 sample_with_old_policy: bool = True, **kwargs):
        super().__init__(*args, timestep_fraction=timestep_fraction, kl_coef=kl_coef, sample_with_old_policy=sample_with_old_policy, **kwargs)
        if beta <= 0 or space not in ("x0", "velocity"):
            raise ValueError(f"DiffusionNFT: need beta > 0 and space 'x0' or 'velocity', got {beta}, {space!r}")
        self.nft_beta, self.space = beta, space

    def forward_loss(self, velocity: Tensor, old_velocity: Tensor | None, x0: Tensor, x_t: Tensor, noise: Tensor, sigma: Tensor,
                     advantages: Tensor) -> tuple[Tensor, dict]:
        return nft_loss(velocity, old_velocity, x_t, x0, sigma, advantages, self.nft_beta, self.advantage_clip, self.space)
