"""What every rectified-flow video policy shares (Wan, HunyuanVideo 1.5): read this file to add another one.

A family subclasses :class:`FlowMatchingBackbone` and holds only what differs: its components (``__init__``:
``self.transformer``, ``self.vae``, encoders, ``flow_shift``, ``num_train_timesteps``, ``logit_mean``/``logit_std``,
then ``setup_finetuning``), ``encode``/``decode``, ``encode_condition``, ``predict`` (the pipeline's exact model
call: latent packing, timestep layout, condition channels) and ``guided_velocity(x_t, sigma, cond, guidance, sigma_next=None)``
(its CFG; ``sigma_next``, the next step's levels, is passed by rollouts and GRPO re-scoring for models that take it, e.g.
HunyuanVideo 1.5 MeanFlow; others ignore it), ``latent_channels`` /
``vae_scale_factor_spatial`` / ``vae_scale_factor_temporal``, ``fsdp_modules`` and the LoRA file format of its
pipeline (``export_lora`` / ``load_lora``, with :meth:`FlowMatchingBackbone.lora_state_dict_of` and
:meth:`FlowMatchingBackbone.load_lora_state_into`). Overridable hooks: :meth:`~FlowMatchingBackbone.schedule`
(the pipeline's sigmas), :meth:`~FlowMatchingBackbone.generated_part` and
:meth:`~FlowMatchingBackbone.complete_latents` (frames the model does not generate, e.g. Wan 2.2 TI2V's image frame),
:meth:`~FlowMatchingBackbone.frozen_modules`.

Flow matching (DESIGN §2): ``x_s = (1 - s)·x0 + s·ε``, velocity target ``v = ε - x0``, timestep ``1000·s``; training
``s`` logit-normal ``sigmoid(N(m, std²))`` then the flow shift ``s ← shift·s/(1 + (shift - 1)·s)`` (SD3-style; our
choice). Latents at our API are ``(B, T', C, h, w)``; diffusers' video models use ``(B, C, T', h, w)``.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from lightning_vidalign.backbones.base import VideoBackbone
from lightning_vidalign.sampling import SDE_TYPES, Trajectory, compressed_schedule, dpm_solver_pp_step, flow_schedule, sde_step_with_logprob


class FlowMatchingBackbone(VideoBackbone):
    """Rectified-flow policy: velocity loss, training levels, SDE rollouts with trajectories, LoRA state in diffusers
    names (see the module docstring for what a subclass provides)."""

    #: a human name of the family, for messages
    family: str = "flow-matching model"

    # ------------------------------------------------------------- modules
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Encoders kept in eval mode whatever ``train()`` is asked (default: ``vae``, ``text_encoder``)."""
        return [m for m in (getattr(self, "vae", None), getattr(self, "text_encoder", None)) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    @property
    def denoiser(self):
        return self.transformer

    def latent_frames(self, num_frames: int) -> int:
        """``T' = (T - 1)/f_t + 1``.

        Raises:
            ValueError: unless ``T - 1`` is a multiple of the temporal factor ``f_t`` (causal VAE; e.g. Wan 4k + 1).
        """
        f = self.vae_scale_factor_temporal
        if (num_frames - 1) % f:
            raise ValueError(f"{self.family} needs num_frames = {f}k + 1 (causal VAE), got {num_frames}; set the datamodule's frames to e.g. {f * ((num_frames - 1) // f) + 1}")
        return (num_frames - 1) // f + 1

    # --------------------------------------------------------------- hooks
    def schedule(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """``(sigmas (S+1,), timesteps (S,))`` of the family's pipeline; default diffusers'
        ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(S)`` (:func:`~lightning_vidalign.sampling.flow_schedule`)."""
        return flow_schedule(num_steps, self.flow_shift, self.num_train_timesteps)

    def generated_part(self, x0: Tensor) -> Tensor:
        """The latent frames the model generates (default: all)."""
        return x0

    def complete_latents(self, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The full clip's latents from the generated frames at the end of a rollout (default: ``x``)."""
        return x

    # ------------------------------------------------------------ training
    def sample_sigma(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training levels: ``s = sigmoid(m + std·n)``, then shifted; shape ``(B,)`` in ``(0, 1)``."""
        n = torch.randn(batch_size, generator=generator)
        s = torch.sigmoid(self.logit_mean + self.logit_std * n)
        s = self.flow_shift * s / (1 + (self.flow_shift - 1) * s)
        return s.to(device or "cpu")

    def training_loss(self, x0: Tensor, cond: dict[str, Tensor], sigma: Tensor, noise: Tensor) -> Tensor:
        """Velocity MSE ``mean((v_θ(x_s) - (ε - x0))²)`` per sample (flow matching).

        Args:
            x0: clean latents ``(B, T', C, h, w)`` (the full clip; frames outside :meth:`generated_part` are not
                noised nor scored).
            cond: conditions for the batch.
            sigma: ``(B,)`` levels in ``(0, 1)``.
            noise: ``ε`` with the shape of ``x0``.

        Returns:
            ``(B,)`` losses, mean over the generated elements.

        Raises:
            ValueError: on mismatched shapes.
        """
        if noise.shape != x0.shape or sigma.shape != (x0.shape[0],):
            raise ValueError(f"training_loss: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)}, sigma {tuple(sigma.shape)}")
        x0g, eps = self.generated_part(x0.float()), self.generated_part(noise.float())
        s = sigma.float().view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0g + s * eps
        v = self.predict(x_t, sigma, cond)
        return ((v - (eps - x0g)) ** 2).flatten(1).mean(1)

    # --------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(
        self,
        cond: dict[str, Tensor],
        sampler: str = "ode",
        num_steps: int = 10,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        keep_trajectory: bool = False,
        num_frames: int = 9,
        height: int = 64,
        width: int = 64,
        eta: float = 0.7,
        decode: bool = True,
        latents: Tensor | None = None,
        sde_steps: list[int] | None = None,
        keep_means: bool = False,
        log_prob_form: str = "reference",
        flash_ratio: float | None = None,
    ) -> Trajectory:
        """Sample on the family's schedule (:meth:`schedule`) with an SDE type per step.

        The initial noise is drawn on CPU in the pipelines' layout ``(B, C, T', h, w)`` from ``generator``, so with
        ``sampler="ode"`` and the same generator this reproduces the family's diffusers pipeline (each family tests it).

        Args:
            cond: from :meth:`encode_condition`.
            sampler: an SDE type of :func:`~lightning_vidalign.sampling.sde_step_with_logprob`.
            num_steps: denoising steps ``S``.
            guidance: CFG scale (``<= 1``: no unconditional pass).
            generator: CPU RNG for initial and step noise.
            keep_trajectory: record per-step ``x_t``, ``x_next`` (generated frames only), ``log_prob (B, S)``.
            num_frames, height, width: pixel size (``num_frames = f_t k + 1``).
            eta: SDE noise scale.
            decode: decode the final latents.
            latents: optional initial noise ``(B, T', C, h, w)``.
            sde_steps: indices of the steps taken with ``sampler``; the others are ODE steps (e.g. a stochastic
                window as in MixGRPO); None = all steps.
            keep_means: record the per-step transition means and stds in ``extras``.
            log_prob_form: form of the recorded log-probs (``reference`` | ``gaussian``, see
                :func:`~lightning_vidalign.sampling.step_log_density`).
            flash_ratio: MixGRPO-Flash (needs ``sde_steps``): the steps after the last of ``sde_steps`` on a compressed
                schedule (:func:`~lightning_vidalign.sampling.compressed_schedule`) with the deterministic 2nd-order
                DPM-Solver++ (:func:`~lightning_vidalign.sampling.dpm_solver_pp_step`, the data predictions of every
                earlier step as its history); the trajectory's ``sigmas`` are the compressed schedule.

        Returns:
            :class:`Trajectory` with full-clip ``latents (B, T', C, h, w)``.
        """
        if sampler not in SDE_TYPES:
            raise ValueError(f"{type(self).__name__}.rollout: sampler must be one of {SDE_TYPES}, got {sampler!r}")
        text = cond["prompt_embeds"]
        device, b = text.device, text.shape[0]
        sigmas, _ = self.schedule(num_steps)
        last_window = None
        if flash_ratio is not None:
            if not sde_steps:
                raise ValueError(f"{type(self).__name__}.rollout: flash_ratio needs the stochastic window sde_steps")
            last_window = max(sde_steps)
            sigmas = compressed_schedule(sigmas, last_window, flash_ratio, float(getattr(self, "flow_shift", 1.0)))
        t_lat = self.latent_frames(num_frames)
        shape = (b, self.latent_channels, t_lat, height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if latents is None:
            x = torch.randn(shape, generator=generator, dtype=torch.float32).permute(0, 2, 1, 3, 4).to(device)
        else:
            x = latents.float().to(device)
        x = self.generated_part(x)
        xs, xn, lps, means, stds = [], [], [], [], []
        prev = (None, None)  # the previous step's data prediction and level (DPM-Solver++ history)
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            v = self.guided_velocity(x, torch.full((b,), s, device=device), cond, guidance, sigma_next=torch.full((b,), s_next, device=device))
            if last_window is not None and i > last_window:  # MixGRPO-Flash: deterministic 2nd order after the window
                x0 = x.float() - s * v.float()
                x_next = dpm_solver_pp_step(x, x0, s, s_next, *prev)
                mean, std, lp, prev = x_next, 0.0, None, (x0, s)
            else:
                kind = sampler if sde_steps is None or i in sde_steps else "ode"
                x_next, mean, std, lp = sde_step_with_logprob(v, x, s, s_next, kind, eta, generator=generator, log_prob_form=log_prob_form)
                if last_window is not None:
                    prev = (x.float() - s * v.float(), s)
            if keep_means:
                means.append(mean)
                stds.append(float(torch.as_tensor(std).max()))
            if keep_trajectory:
                xs.append(x)
                xn.append(x_next)
                lps.append(lp if lp is not None else torch.zeros(b, device=device))
            x = x_next
        x = self.complete_latents(x, cond)
        return Trajectory(
            latents=x,
            video=self.decode(x) if decode else None,
            x_t=torch.stack(xs, 1) if keep_trajectory else None,
            x_next=torch.stack(xn, 1) if keep_trajectory else None,
            sigmas=sigmas,
            log_prob=torch.stack(lps, 1) if keep_trajectory else None,
            extras={"mean": torch.stack(means, 1), "std": torch.tensor(stds)} if keep_means else {},
        )

    # ------------------------------------------------------------ LoRA state
    def lora_state_dict_of(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """``model``'s peft LoRA in diffusers' names (``transformer.<module>.lora_A.weight``), the scale ``alpha/r``
        folded into ``lora_B`` (so a loader that assumes ``alpha = r`` reads it right). Under FSDP2 the shards are
        gathered (a collective: every rank calls it).

        Raises:
            ValueError: for ``finetune="full"`` (no LoRA).
        """
        from peft import get_peft_model_state_dict

        if self.lora_config is None:
            raise ValueError(f"{type(self).__name__}(finetune='full') has no LoRA: write the base model instead")
        scale = self.lora_config.lora_alpha / self.lora_config.r
        out = {}
        for k, v in get_peft_model_state_dict(model).items():
            v = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu().contiguous()  # FSDP2: gathered (collective)
            out[f"transformer.{k}"] = v * scale if "lora_B" in k else v
        return out

    def load_lora_state_into(self, model: torch.nn.Module, state: dict[str, Tensor], path: str) -> None:
        """Set ``model``'s adapters from a diffusers-named state (the inverse of :meth:`lora_state_dict_of`).

        Raises:
            ValueError: for ``finetune="full"``, or keys (of the file ``path``) that match no adapter.
        """
        from peft import set_peft_model_state_dict

        if self.lora_config is None:
            raise ValueError(f"{type(self).__name__}(finetune='full') has no LoRA to load into")
        scale = self.lora_config.lora_alpha / self.lora_config.r
        sd = {k[len("transformer.") :]: (v / scale if "lora_B" in k else v) for k, v in state.items() if k.startswith("transformer.")}
        unexpected = getattr(set_peft_model_state_dict(model, sd), "unexpected_keys", [])
        if unexpected or not sd:
            raise ValueError(f"{path}: {len(unexpected)} key(s) match no adapter of this backbone, e.g. {unexpected[:3]}")

    @staticmethod
    def require_lora_file(path: str, what: str = "") -> None:
        """Raise ``FileNotFoundError`` naming ``path`` (and ``what``) if it is not a file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LoRA file {path!r} does not exist" + (f" ({what})" if what else ""))
