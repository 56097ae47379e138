"""One SFT, GRPO and DPO (decoupled) backward on a tiny backbone, shared by tests/test_activation_checkpointing.py,
tests/benchmarks/test_activation_memory.py and the sequence-parallel jobs (tests/sequence_parallel*_job.py).

Each ``*_step(backbone, batch)`` clears the LoRA gradients, runs the algorithm's own loss code for one step
(``training_loss`` for SFT as :class:`SFT` does, :meth:`GRPO.step_loss` on a kept rollout transition,
:meth:`DPO.decoupled_step` on synthetic pairs), calls ``backward`` and returns the LoRA gradients. The inputs
that do not depend on the trainable weights (latents, conditions, rollouts, references) are made by
``prepare_*`` outside the timed / tracked part and returned as a closure ``run()``, so that a memory
tracker around ``run()`` sees the step's own activations only.
"""
from __future__ import annotations

import torch

from lightning_vidalign.algorithms import DPO, GRPO


def perturb_lora(backbone, seed: int = 0, scale: float = 0.05) -> None:
    """Random ``lora_B`` (peft's gaussian init sets it to 0, which would zero every ``lora_A`` gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _grads(backbone):
    return [None if p.grad is None else p.grad.detach().clone() for p in backbone.trainable_parameters()]


def _zero(backbone):
    for p in backbone.trainable_parameters():
        p.grad = None


def denoising_step(backbone, x0, cond, sigma, noise):
    """The flow-matching loss backward with the LoRA gradients cleared first; returns ``(loss (B,) detached, the
    trainable parameters)`` (their ``.grad`` holds this step's gradients). Shared by the sequence-parallel jobs."""
    _zero(backbone)
    loss = backbone.training_loss(x0, cond, sigma, noise)
    loss.mean().backward()
    return loss.detach(), backbone.trainable_parameters()


def sde_rollout(backbone, cond, size: int):
    """A flow-GRPO SDE rollout with CFG 2 (3 steps, 9 frames, ``size`` x ``size``, fixed generator): ``(latents,
    log_prob)``. Shared by the sequence-parallel jobs."""
    traj = backbone.rollout(cond, "flow_grpo", 3, 2.0, torch.Generator().manual_seed(5), keep_trajectory=True, num_frames=9,
                            height=size, width=size, decode=False)
    return traj.latents, traj.log_prob


def levels(backbone, b: int) -> torch.Tensor:
    """Training levels ``(B,)``: for two Wan experts one sample on each side of the boundary (both trained)."""
    if getattr(backbone, "transformer_2", None) is not None:
        return torch.tensor([0.95, 0.3][:b] + [0.5] * max(0, b - 2))
    return backbone.sample_sigma(b, torch.Generator().manual_seed(3))


def prepare_sft(backbone, batch):
    """The SFT loss ``mean_b ℓ(x0_b, s_b, ε_b)`` (DESIGN §3) on the batch's clips."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x0 = backbone.encode(batch["video"])
        cond = backbone.encode_condition(batch, gen)
    sigma = levels(backbone, x0.shape[0])
    noise = torch.randn(x0.shape, generator=gen)

    def run():
        denoising_step(backbone, x0, cond, sigma, noise)
        return _grads(backbone)

    return run, [x0, sigma, noise, *cond.values()]


def prepare_grpo(backbone, batch, num_steps: int = 4):
    """The GRPO per-step loss (PPO-clip + step-wise KL, :meth:`GRPO.step_loss`) on one kept SDE transition of a
    rollout of the batch's conditions; for two experts the first (high-noise) and last (low-noise) steps."""
    module = GRPO(backbone=backbone, num_inference_steps=num_steps, guidance=2.0, sampler="ode", rollouts_per_condition=2, val_num_videos=0,
                  sde_type="flow_grpo", kl_type="step", kl_coef=0.1, clip_range=0.2)
    gen = torch.Generator().manual_seed(2)
    video = batch["video"]
    with torch.no_grad():
        cond = backbone.encode_condition(batch, gen)
        traj = backbone.rollout(cond, "flow_grpo", num_steps, 2.0, gen, keep_trajectory=True, num_frames=video.shape[1],
                                height=video.shape[-2], width=video.shape[-1], eta=0.7, decode=False)
    adv = torch.linspace(-1.0, 1.0, video.shape[0])
    steps = [0, num_steps - 1]

    def run():
        _zero(backbone)
        for t in steps:
            s, sn = float(traj.sigmas[t]), float(traj.sigmas[t + 1])
            loss, _ = module.step_loss(traj.x_t[:, t], traj.x_next[:, t], traj.log_prob[:, t] - 0.01, adv, s, sn, cond, 1.0)
            loss.mean().backward()
        return _grads(backbone)

    return run, [traj.x_t, traj.x_next, traj.log_prob, adv, *cond.values()]


def prepare_dpo(backbone, batch, beta: float = 500.0):
    """One :meth:`DPO.decoupled_step` (winner forward/backward, then loser) on synthetic temporal-negative pairs."""
    module = DPO(backbone=backbone, beta=beta, val_num_videos=0)
    module.backward_pass = lambda loss, last=True: loss.backward()  # outside a Trainer
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x_w, x_l, cond, weights, _ = module.make_pairs(batch, gen)
        sigma, noise = module.sample_noise(x_w, gen)
        if getattr(backbone, "transformer_2", None) is not None:
            sigma = levels(backbone, x_w.shape[0])
        with backbone.adapters_disabled():
            ref_w = backbone.training_loss(x_w, cond, sigma, noise)
            ref_l = backbone.training_loss(x_l, cond, sigma, noise)

    def run():
        _zero(backbone)
        module.decoupled_step(x_w, x_l, cond, sigma, noise, ref_w, ref_l, weights, beta)
        return _grads(backbone)

    return run, [x_w, x_l, sigma, noise, ref_w, ref_l, weights, *cond.values()]


PREPARE = {"sft": prepare_sft, "grpo": prepare_grpo, "dpo": prepare_dpo}
