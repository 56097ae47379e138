#!/usr/bin/env python
"""The GPU proof kit (issue 35): one command that measures what only a GPU can show, time-boxed, as JSON and markdown.

Run it first whenever a GPU machine is lent (README, "GPU check"), then commit ``docs/gpu/<date>-<device>.json`` and
its table::

    python scripts/gpu_check.py --out DIR [--budget-s 480]

Parts (each a top-level key of ``DIR/gpu_check.json``; a part not run holds ``{"skipped": "<reason>"}``, one that
failed ``{"error": "<message>"}``):

- ``ratio_drift``: on-policy importance ratios that should be 1. For each SDE of the shipped GRPO configs (flow, dance,
  cps, sage: ``configs/<sde>_grpo.yaml``'s ``sde_type``, ``eta``, ``clip_range``, ``log_prob_form``) on the tiny Wan
  (``demo:wan_tiny``, the configs' base) and on a real-size Wan 2.1 T2V 1.3B (random weights, real configuration):
  rollouts in chunks of the rollout batch size under ``no_grad``, then each trained step re-scored in train mode
  with gradients enabled (no backward, no update), the rollouts shuffled into chunks of the training batch size, as
  ``GRPO.update`` does. Per step the distribution of ``|ratio - 1|`` (median, p99, max) and the fraction that the
  shipped clip range alone clips; with our log-prob maths (fp32, the shipped path) and with the Gaussian
  log-density evaluated in bf16 (the same recorded and re-scored means; what the maths would give in the model's
  dtype).
- ``real_size``: Wan 2.1 T2V 1.3B (random weights, real configuration, bf16, 480×832, 33 frames, 10 steps, CFG 5,
  LoRA rank 32): one rollout with our loop against diffusers' ``WanPipeline`` from the same noise (time ratio,
  max difference), one GRPO step (re-scored transition, PPO-clip loss, backward, AdamW) and one SFT step (flow
  matching loss, backward, AdamW), each with activation checkpointing on and off (s/step, peak CUDA memory), the VAE
  decode (s, peak), and each step's peak against ``vidalign estimate``'s model (:func:`lightning_vidalign.memory.estimate_setting`).
- ``compile``: ``torch.compile`` of the denoiser's repeated blocks (diffusers' ``compile_repeated_blocks``): compile
  time, step time compiled/eager, max difference of the velocity.
- ``strategies``: the shipped fragments as a user runs them (``vidalign fit --config configs/sft.yaml --config
  configs/strategies/<fragment>.yaml``, 2 steps, world 1 on the GPU): FSDP2 over NCCL and DeepSpeed ZeRO-2; the exit
  code and the end of the log of each.

The same command runs on CPU (``--size tiny``: the tiny sizes, fp32; the default test suite runs it, so the kit keeps
working): there ``ratio_drift`` must give ratio 1 exactly. ``compile`` and ``strategies`` need CUDA unless named in
``--parts``. Every part checks the remaining budget before each measurement and records what it skipped and why;
the JSON is rewritten after each part, so a run stopped from outside keeps what it measured. Our design.
"""
from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here, before the heavy imports

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "tests") not in sys.path:  # the real-layout writer (random-weight folders laid out as the Hub's)
    sys.path.insert(0, os.path.join(ROOT, "tests"))

import lightning_vidalign  # noqa: E402,F401  (the torchvision shim before diffusers / transformers)
import torch  # noqa: E402

PARTS = ("ratio_drift", "real_size", "compile", "strategies")
#: the SDEs and the shipped config each one's settings are read from
SDE_CONFIGS = {"flow": "flow_grpo", "dance": "dance_grpo", "cps": "cps_grpo", "sage": "sage_grpo"}
#: prompts of the rollouts (captions of the shipped demo data's style)
PROMPTS = ["a big cartoon rabbit stretches in a sunny meadow", "a man talks on the phone in a moving car",
           "cyclists ride along a road between trees", "a butterfly lands on a flower"]

#: settings per size. ``tiny``: CPU, seconds. ``real``: one H100/H200 within the default budget.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "drift_tiny": dict(prompts=2, group=2, rollout_batch_size=4, train_batch_size=2, steps=4, frames=9, height=64, width=64),
        "drift_real": dict(prompts=2, group=2, rollout_batch_size=4, train_batch_size=2, steps=3, frames=9, height=64, width=64),
        "real": dict(layout="small", layers=1, frames=9, height=64, width=64, steps=3, guidance=5.0, lora_rank=4),
        "estimate_s": dict(ratio_drift=20, real_size=15, compile=60, strategies=120),
    },
    "real": {
        # the shipped configs' batch sizes on the tiny Wan (None: read from the config)
        "drift_tiny": dict(prompts=2, group=None, rollout_batch_size=None, train_batch_size=None, steps=None, frames=9, height=64, width=64),
        # real size: 9 frames at 480x832 (3 latent frames, 4,680 tokens) keeps 4 SDEs x (rollout + re-scoring) in ~1 min
        "drift_real": dict(prompts=2, group=2, rollout_batch_size=4, train_batch_size=2, steps=8, frames=9, height=480, width=832),
        "real": dict(layout="real", layers=30, frames=33, height=480, width=832, steps=10, guidance=5.0, lora_rank=32),
        "estimate_s": dict(ratio_drift=120, real_size=150, compile=90, strategies=120),
    },
}


# --------------------------------------------------------------------------------------------------- helpers
class Budget:
    """Wall-clock budget of the whole command (seconds from construction)."""

    def __init__(self, seconds: float, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.seconds = float(seconds)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def skip_reason(self, need_s: float, what: str) -> str | None:
        """None when ``need_s`` seconds are left, else the reason to skip ``what``."""
        left = self.left()
        return None if left >= need_s else f"budget: {max(left, 0.0):.0f} s left of {self.seconds:.0f} s, {what} needs ~{need_s:.0f} s"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict[str, Any], key: str):
    """Record the peak CUDA memory (GB = 1e9 bytes) allocated inside the block under ``record[key]`` (None on CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        sync(device)
        record[key] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        record[key] = None


def shipped_settings(name: str) -> dict[str, Any]:
    """``model.init_args`` of ``configs/<name>.yaml`` (the values this check reads: SDE, eta, clip range, log-prob
    form, steps, guidance, group and batch sizes), with the class defaults where the config is silent."""
    import inspect

    import yaml

    from lightning_vidalign.algorithms import GRPO

    with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f:
        args = (yaml.safe_load(f)["model"] or {}).get("init_args", {})
    defaults = {k: p.default for k, p in inspect.signature(GRPO.__init__).parameters.items() if p.default is not inspect.Parameter.empty}
    keys = ("sde_type", "eta", "clip_range", "log_prob_form", "num_inference_steps", "guidance", "rollouts_per_condition", "rollout_batch_size",
            "train_batch_size")
    return {k: args.get(k, defaults.get(k)) for k in keys}


def quantiles(values: torch.Tensor) -> dict[str, float]:
    v = values.double().flatten()
    return {"median": float(v.median()), "p99": float(torch.quantile(v, 0.99)), "max": float(v.max()), "n": int(v.numel())}


def bf16_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sde_type: str, log_prob_form: str) -> torch.Tensor:
    """The per-sample log-prob of :func:`~lightning_vidalign.sampling.step_log_density` (averaged over elements) with
    every operation in bf16: what the maths gives in the model's dtype (the comparison of ``ratio_drift``)."""
    x, m = x_next.bfloat16(), mean.bfloat16()
    s = torch.as_tensor(std, dtype=torch.float32).to(x.device).bfloat16()
    if sde_type == "cps" and log_prob_form == "reference":
        lp = -((x - m) ** 2)
    else:
        lp = -((x - m) ** 2) / (2 * s**2) - torch.log(s) - torch.tensor(0.5 * math.log(2 * math.pi), dtype=torch.bfloat16, device=x.device)
    return lp.flatten(1).mean(1).float()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def git_commit() -> str:
    """HEAD (``+dirty`` with uncommitted changes); without git (a device's copy of the work tree) ``$VIDALIGN_COMMIT``,
    which the device commands of ``scripts/device/pack.py`` set to the commit packed."""
    if os.environ.get("VIDALIGN_COMMIT"):
        return os.environ["VIDALIGN_COMMIT"] + " (VIDALIGN_COMMIT)"
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown (git failed)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


# --------------------------------------------------------------------------------------------------- models
class Models:
    """The backbones the parts share, built once: the tiny Wan (the shipped demo base) and the real-size Wan folder."""

    def __init__(self, device: torch.device, dtype: str, size: str, workdir: str):
        self.device, self.dtype, self.size, self.workdir = device, dtype, size, workdir
        self._real = None

    def tiny(self):
        from lightning_vidalign.backbones import WanBackbone

        bb = WanBackbone(pretrained_path="demo:wan_tiny", mode="ti2v", lora_rank=8, lora_alpha=8, max_sequence_length=32, fps=8,
                         dtype=self.dtype if self.dtype != "float32" else None)
        return bb.to(self.device)

    def real_folder(self) -> str:
        from real_layout import write_wan

        cfg = SIZES[self.size]["real"]
        path = os.path.join(self.workdir, f"wan2.1_t2v_1.3b_{cfg['layout']}_{cfg['layers']}")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            write_wan(path, "wan2.1_t2v_1.3b", scale=cfg["layout"], num_layers=cfg["layers"], dtype=torch.bfloat16 if self.dtype == "bfloat16" else None)
        return path

    def real(self):
        """The real-size backbone as the zoo config builds it (bf16 base, fp32 LoRA, bf16 VAE and text encoder)."""
        if self._real is None:
            from lightning_vidalign.backbones import WanBackbone

            cfg = SIZES[self.size]["real"]
            half = self.dtype if self.dtype != "float32" else None
            self._real = WanBackbone(pretrained_path=self.real_folder(), mode="t2v", lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_rank"],
                                     dtype=half, vae_dtype=half, encoder_dtype=half, fps=16, activation_checkpointing=True).to(self.device)
        return self._real


# --------------------------------------------------------------------------------------------------- part a
def drift_of(bb, settings: dict[str, Any], sde: dict[str, Any], device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Rollouts then on-policy re-scoring of one backbone and one SDE (module docstring, ``ratio_drift``)."""
    from lightning_vidalign.sampling import sde_step_parameters, sde_step_with_logprob

    p, g = settings["prompts"], settings["group"] or sde["rollouts_per_condition"]
    rbs = settings["rollout_batch_size"] or sde["rollout_batch_size"]
    tbs = settings["train_batch_size"] or sde["train_batch_size"]
    steps = settings["steps"] or sde["num_inference_steps"]
    guidance = float(sde["guidance"])
    gen = torch.Generator().manual_seed(seed)
    batch = {"caption": PROMPTS[:p]}
    if bb.mode == "ti2v":
        batch["first_frame"] = torch.rand(p, 3, settings["height"], settings["width"], generator=gen).to(device)
    bb.eval()
    with torch.no_grad():
        cond = bb.encode_condition(batch, gen)
        cond = {k: v.repeat_interleave(g, 0) for k, v in cond.items()}
        n = p * g
        parts = []
        for i in range(0, n, rbs):
            chunk = {k: v[i : i + rbs] for k, v in cond.items()}
            parts.append(bb.rollout(chunk, sde["sde_type"], steps, guidance, gen, keep_trajectory=True, num_frames=settings["frames"],
                                    height=settings["height"], width=settings["width"], eta=sde["eta"], decode=False, keep_means=True,
                                    log_prob_form=sde["log_prob_form"]))
    x_t = torch.cat([t.x_t for t in parts])
    x_next = torch.cat([t.x_next for t in parts])
    old_lp = torch.cat([t.log_prob for t in parts])
    old_mean = torch.cat([t.extras["mean"] for t in parts])
    sigmas = parts[0].sigmas
    # the trained steps: the stochastic ones (GRPO.train_steps; e.g. CPS's last step has std 0 and no density)
    stochastic = [t for t in range(steps) if float(sde_step_parameters(sigmas[t : t + 1], sigmas[t + 1 : t + 2], sde["sde_type"], sde["eta"])["std"][0]) > 0]
    bb.train()  # as in training (GRPO re-scores inside training_step): gradients on, no backward
    d32, d16 = torch.zeros(n, len(stochastic)), torch.zeros(n, len(stochastic))
    order = torch.randperm(n, generator=gen)
    for j, t in enumerate(stochastic):
        for idx in order.split(tbs):
            idx_d = idx.to(device)
            sub = {k: v[idx_d] for k, v in cond.items()}
            s = torch.full((len(idx),), float(sigmas[t]), device=device)
            s_next = torch.full((len(idx),), float(sigmas[t + 1]), device=device)
            with torch.enable_grad():
                v = bb.guided_velocity(x_t[idx_d, t], s, sub, guidance, sigma_next=s_next)
            v = v.detach()
            _, mean, std, lp = sde_step_with_logprob(v, x_t[idx_d, t], s, s_next, sde["sde_type"], sde["eta"], prev_sample=x_next[idx_d, t],
                                                     log_prob_form=sde["log_prob_form"])
            d32[idx, j] = (lp - old_lp[idx_d, t]).float().cpu()
            d16[idx, j] = (bf16_log_prob(x_next[idx_d, t], mean, std, sde["sde_type"], sde["log_prob_form"])
                           - bf16_log_prob(x_next[idx_d, t], old_mean[idx_d, t], std, sde["sde_type"], sde["log_prob_form"])).cpu()
    bb.eval()
    clip = float(sde["clip_range"])

    def summary(d: torch.Tensor) -> dict[str, Any]:
        dev = (d.double().exp() - 1).abs()
        per_step = [{"step": t, **quantiles(dev[:, j]), "clip_frac": float((dev[:, j] > clip).double().mean())} for j, t in enumerate(stochastic)]
        return {"per_step": per_step, "all": {**quantiles(dev), "clip_frac": float((dev > clip).double().mean())}}

    return {"setting": {"rollouts": n, "rollout_batch_size": rbs, "train_batch_size": tbs, "steps": steps, "guidance": guidance,
                        "frames": settings["frames"], "height": settings["height"], "width": settings["width"], "sde_type": sde["sde_type"],
                        "eta": sde["eta"], "clip_range": clip, "log_prob_form": sde["log_prob_form"]},
            "fp32_maths": summary(d32), "bf16_maths": summary(d16)}


def part_ratio_drift(ctx: dict[str, Any], budget: Budget) -> dict[str, Any]:
    models: Models = ctx["models"]
    size = ctx["size"]
    out: dict[str, Any] = {"dtype": models.dtype, "models": {}}
    builders = (("tiny_wan", models.tiny, SIZES[size]["drift_tiny"]), ("wan2.1_t2v_1.3b", models.real, SIZES[size]["drift_real"]))
    per_sde_s = {"tiny": {"tiny_wan": 2, "wan2.1_t2v_1.3b": 2}, "real": {"tiny_wan": 5, "wan2.1_t2v_1.3b": 20}}[size]
    for name, build, settings in builders:
        reason = budget.skip_reason(per_sde_s[name] * 2, f"{name} drift")
        if reason:
            out["models"][name] = {"skipped": reason}
            continue
        try:
            bb = build()
        except Exception as e:  # noqa: BLE001 - recorded; the other model's results stay
            out["models"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            continue
        res: dict[str, Any] = {}
        for label, config in SDE_CONFIGS.items():
            reason = budget.skip_reason(per_sde_s[name], f"{name}/{label}")
            if reason:
                res[label] = {"skipped": reason}
                continue
            sde = shipped_settings(config)

            def one(sde=sde, config=config):
                result, seconds = timed(lambda: drift_of(bb, settings, sde, models.device), models.device)
                return {**result, "seconds": seconds, "config": f"configs/{config}.yaml"}

            guarded(res, label, models.device, one)
        out["models"][name] = res
        if name == "tiny_wan":
            del bb
    return out


# --------------------------------------------------------------------------------------------------- part b
def guarded(out: dict[str, Any], key: str, device: torch.device, fn: Callable[[], dict[str, Any]]) -> None:
    """``out[key] = fn()``; an exception (a CUDA out-of-memory included) is recorded as ``{"error", "peak_GB_at_failure"}``
    instead, its memory released, and the part goes on with its other measurements."""
    try:
        out[key] = fn()
    except Exception as e:  # noqa: BLE001 - recorded; one measurement must not lose the others
        out[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                    "peak_GB_at_failure": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
        del e
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def part_real_size(ctx: dict[str, Any], budget: Budget) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from lightning_vidalign.algorithms.losses import ppo_clip_loss
    from lightning_vidalign.memory import REAL_MODELS, build_on_meta, estimate_setting, shapes_of
    from lightning_vidalign.sampling import sde_step_with_logprob

    models: Models = ctx["models"]
    device, cfg, real = models.device, SIZES[ctx["size"]]["real"], ctx["size"] == "real"
    built = models._real is not None
    (bb, build_s) = timed(models.real, device)
    frames, height, width, steps, guidance = cfg["frames"], cfg["height"], cfg["width"], cfg["steps"], cfg["guidance"]
    out: dict[str, Any] = {"setting": {"model": "Wan 2.1 T2V 1.3B, random weights" + ("" if cfg["layout"] == "real" else f" ({cfg['layout']} widths)"),
                                       "layers": cfg["layers"], "frames": frames, "height": height, "width": width, "steps": steps, "guidance": guidance,
                                       "lora_rank": cfg["lora_rank"], "dtype": models.dtype,
                                       "params_B": sum(p.numel() for p in bb.transformer.parameters()) / 1e9, "text_tokens": None},
                           "build_s": None if built else build_s}
    bb.eval()
    with torch.no_grad():
        cond = bb.encode_condition({"caption": PROMPTS[:1]})
    out["setting"]["text_tokens"] = int(cond["prompt_embeds"].shape[1])
    frozen_gb = sum(p.numel() * p.element_size() for m in (bb.vae, bb.text_encoder) for p in m.parameters()) / 1e9
    out["frozen_resident_GB"] = frozen_gb
    state: dict[str, Any] = {}

    # rollout: ours vs WanPipeline from the same noise (ODE, CFG). Ours batches the conditional and unconditional rows
    # (one call of 2), the pipeline calls twice: in bf16 the two differ by more than fp32 rounding (expected)
    def rollout() -> dict[str, Any]:
        pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=bb.transformer, vae=bb.vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=bb.flow_shift))
        pipe.set_progress_bar_config(disable=True)

        def ours():
            with torch.no_grad():
                return bb.rollout(cond, "ode", steps, guidance, torch.Generator().manual_seed(1), num_frames=frames, height=height, width=width,
                                  decode=False).latents.permute(0, 2, 1, 3, 4)

        def theirs():
            with torch.no_grad():
                return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"], guidance_scale=guidance,
                            num_inference_steps=steps, num_frames=frames, height=height, width=width, generator=torch.Generator().manual_seed(1),
                            output_type="latent").frames

        rec: dict[str, Any] = {}
        a, _ = timed(ours, device)  # warm-up
        b, _ = timed(theirs, device)
        with peak_memory(device, rec, "ours_peak_GB"):
            _, rec["ours_s"] = timed(ours, device)
        with peak_memory(device, rec, "pipeline_peak_GB"):
            _, rec["pipeline_s"] = timed(theirs, device)
        rec["ratio_ours_over_pipeline"] = rec["ours_s"] / rec["pipeline_s"]
        rec["max_abs_diff"] = float((a.float() - b.float()).abs().max())
        rec["latent_abs_mean"] = float(b.float().abs().mean())
        state["latents"] = a.permute(0, 2, 1, 3, 4).contiguous()
        return rec

    reason = budget.skip_reason(30 if real else 3, "rollout vs WanPipeline")
    out["rollout"] = {"skipped": reason} if reason else {}
    if not reason:
        guarded(out, "rollout", device, rollout)

    def vae_decode() -> dict[str, Any]:
        rec: dict[str, Any] = {}
        with torch.no_grad(), peak_memory(device, rec, "peak_GB"):
            video, rec["seconds"] = timed(lambda: bb.decode(state["latents"]), device)
        rec["video_shape"] = list(video.shape)
        return rec

    reason = budget.skip_reason(20 if real else 2, "VAE decode") or (None if "latents" in state else "no rollout latents (the rollout did not run)")
    out["vae_decode"] = {"skipped": reason} if reason else {}
    if not reason:
        guarded(out, "vae_decode", device, vae_decode)
    state.pop("latents", None)

    # one GRPO step and one SFT step, activation checkpointing on and off, against vidalign estimate's model. The
    # estimate counts one clip's transformer blocks, FSDP2's two gathered blocks (none on one GPU without FSDP: taken
    # off here) and LoRA's AdamW; GRPO re-scores with CFG, two rows per clip: its activations counted twice
    spec = REAL_MODELS["wan2.1-1.3b"]
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 80.0
    block_gb = 4 * shapes_of(build_on_meta(spec), spec).block_params / 1e9
    t_lat = bb.latent_frames(frames)
    shape = (1, t_lat, bb.latent_channels, height // bb.vae_scale_factor_spatial, width // bb.vae_scale_factor_spatial)
    sigmas = bb.schedule(steps)[0]
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-6)

    def train_step(kind: str, ac: bool) -> dict[str, Any]:
        bb.set_activation_checkpointing(ac)
        gen = torch.Generator().manual_seed(2)
        x_t = torch.randn(shape, generator=gen).to(device)
        noise = torch.randn(shape, generator=gen).to(device)
        rec: dict[str, Any] = {}

        def step():
            bb.train()
            opt.zero_grad(set_to_none=True)
            if kind == "grpo":  # one re-scored transition at step 2 with CFG, PPO-clip on a unit advantage
                s, s_next = sigmas[2].view(1).to(device), sigmas[3].view(1).to(device)
                with torch.no_grad():
                    x_next, _, _, old = sde_step_with_logprob(bb.guided_velocity(x_t, s, cond, guidance), x_t, s, s_next, "flow_grpo", 0.7,
                                                              generator=torch.Generator().manual_seed(3))
                v = bb.guided_velocity(x_t, s, cond, guidance)
                _, _, _, lp = sde_step_with_logprob(v, x_t, s, s_next, "flow_grpo", 0.7, prev_sample=x_next)
                loss = ppo_clip_loss(lp, old, torch.ones(1, device=device), 1e-4)[0].mean()
            else:  # flow matching on clean latents (no CFG: one clip, as the estimate)
                loss = bb.training_loss(x_t, cond, torch.full((1,), 0.5, device=device), noise).mean()
            loss.backward()
            opt.step()
            return float(loss.detach())

        try:
            timed(step, device)  # warm-up (allocator, kernels' selection)
            with peak_memory(device, rec, "peak_GB"):
                rec["loss"], rec["s_per_step"] = timed(step, device)
        finally:
            opt.zero_grad(set_to_none=True)
            bb.set_activation_checkpointing(True)  # (the zoo config's setting, as built)
        if rec["peak_GB"] is not None:
            rec["peak_minus_frozen_GB"] = rec["peak_GB"] - frozen_gb
        if cfg["layout"] == "real" and cfg["layers"] == 30:
            est = estimate_setting(spec, height, width, frames, gpus=1, gpu_gb=gpu_gb, lora_rank=cfg["lora_rank"], ac=ac)
            rows = 2 if kind == "grpo" else 1
            rec["estimate"] = {"params_GB": est["params_GB"] - block_gb, "optim_GB": est["optim_GB"], "act_GB": rows * est["act_GB"], "rows": rows}
            rec["estimate_GB"] = sum(v for k, v in rec["estimate"].items() if k.endswith("_GB"))
            if rec.get("peak_minus_frozen_GB"):
                rec["measured_over_estimate"] = rec["peak_minus_frozen_GB"] / rec["estimate_GB"]
        return rec

    # the AC-off GRPO step last: two rows of 14,040 tokens without checkpointing may not fit (then its error is the result)
    for kind, ac in (("grpo", True), ("sft", True), ("sft", False), ("grpo", False)):
        key = f"{kind}_step_{'ac_on' if ac else 'ac_off'}"
        reason = budget.skip_reason(20 if real else 2, key)
        out[key] = {"skipped": reason} if reason else {}
        if not reason:
            guarded(out, key, device, lambda: train_step(kind, ac))
    return out


# --------------------------------------------------------------------------------------------------- part c
def part_compile(ctx: dict[str, Any], budget: Budget) -> dict[str, Any]:
    models: Models = ctx["models"]
    device = models.device
    bb = models.real() if ctx["size"] == "real" else models.tiny()
    cfg = SIZES[ctx["size"]]["real"] if ctx["size"] == "real" else dict(frames=9, height=64, width=64)
    gen = torch.Generator().manual_seed(4)
    batch = {"caption": PROMPTS[:1]}
    if bb.mode == "ti2v":
        batch["first_frame"] = torch.rand(1, 3, cfg["height"], cfg["width"], generator=gen).to(device)
    bb.eval()
    with torch.no_grad():
        cond = bb.encode_condition(batch, gen)
    shape = (1, bb.latent_frames(cfg["frames"]), bb.latent_channels, cfg["height"] // bb.vae_scale_factor_spatial, cfg["width"] // bb.vae_scale_factor_spatial)
    x = bb.generated_part(torch.randn(shape, generator=gen).to(device))
    s = torch.full((1,), 0.6, device=device)

    def velocity():
        with torch.no_grad():
            return bb.guided_velocity(x, s, cond, 5.0)

    eager, _ = timed(velocity, device)
    eager_s = sorted(timed(velocity, device)[1] for _ in range(5))[2]
    reason = budget.skip_reason(SIZES[ctx["size"]]["estimate_s"]["compile"], "compiling the blocks")
    if reason:
        return {"skipped": reason, "eager_s_measured": eager_s}
    bb.transformer.compile_repeated_blocks(fullgraph=False)
    compiled, compile_s = timed(velocity, device)
    warm_s = timed(velocity, device)[1]  # a guard that fails on the second call (a recompile) shows here, not in the median
    compiled_s = sorted(timed(velocity, device)[1] for _ in range(5))[2]
    return {"setting": {"what": "transformer.compile_repeated_blocks() (diffusers), guided velocity (CFG 5) forward, no grad",
                        "latent_shape": list(shape)},
            "first_call_s (compile)": compile_s, "second_call_s": warm_s, "eager_s": eager_s, "compiled_s": compiled_s, "compiled_over_eager": compiled_s / eager_s,
            "max_abs_diff": float((compiled.float() - eager.float()).abs().max()), "velocity_abs_mean": float(eager.float().abs().mean())}


# --------------------------------------------------------------------------------------------------- part d
FRAGMENTS = {"fsdp2": "configs/strategies/fsdp2.yaml", "deepspeed_zero2": "configs/strategies/deepspeed_zero2.yaml"}


def part_strategies(ctx: dict[str, Any], budget: Budget) -> dict[str, Any]:
    device: torch.device = ctx["models"].device
    out: dict[str, Any] = {}
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    for name, fragment in FRAGMENTS.items():
        reason = budget.skip_reason(30, f"the {name} fragment")
        if reason:
            out[name] = {"skipped": reason}
            continue
        run_dir = os.path.join(ctx["workdir"], f"strategy_{name}")
        # -P: the working directory (this repository's sources, not an installed package) stays off the import path
        cmd = [sys.executable, "-P", "-m", "lightning_vidalign.cli", "fit", "--config", "configs/sft.yaml", "--config", fragment,
               "--trainer.devices", "1", "--trainer.accelerator", accelerator, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
               "--trainer.logger", "false", "--trainer.default_root_dir", run_dir, "--data.init_args.shot_detector", "histogram",
               "--model.init_args.val_num_videos", "0"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        try:
            # each fragment gets at most half of what is left (and 150 s), so the second one runs too
            limit = max(min(budget.left() / (2 if name == next(iter(FRAGMENTS)) else 1) - 5, 150), 10)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
            rc, log = "timeout", text(e.stdout) + text(e.stderr) + "\n[timed out]"
        out[name] = {"command": " ".join(cmd[1:]).replace(sys.executable, "python"), "returncode": rc, "seconds": time.perf_counter() - t0,
                     "log_tail": log[-2500:]}
    return out


PART_FUNCTIONS = {"ratio_drift": part_ratio_drift, "real_size": part_real_size, "compile": part_compile, "strategies": part_strategies}


# --------------------------------------------------------------------------------------------------- report
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _not_run(part: dict[str, Any]) -> str | None:
    """``_skipped: reason_`` / ``_error: message_`` for a part that holds no measurement, else None."""
    for key in ("skipped", "error"):
        if key in part and len(part) <= 2:
            return f"_{key}: {part[key]}_"
    return None


def _row_not_run(label: str, r: dict[str, Any]) -> str | None:
    for key in ("skipped", "error"):
        if key in r:
            return f"| {label} | {key}: {str(r[key])[:200]} | | | |"
    return None


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``gpu_check.md`` (the README's GPU section shows the latest). Skipped and failed measurements
    are rows saying so."""
    lines = [f"# GPU check — {report['device']}", "", f"commit `{report['commit']}`, {report['date']}, size `{report['size']}`, "
             f"budget {report['budget_s']:.0f} s, took {report['seconds']:.0f} s", ""]
    rd = report["ratio_drift"]
    lines += ["## Ratio drift (on-policy |ratio − 1|, re-scored in train mode at the training batch size)", ""]
    if "models" not in rd:
        lines.append(_not_run(rd) or f"_{rd}_")
    else:
        lines += ["| model | SDE | clip range | fp32 maths: median / p99 / max | clipped | bf16 maths: median / p99 / max | clipped |",
                  "|---|---|---|---|---|---|---|"]
        for model, per in rd["models"].items():
            if "skipped" in per or "error" in per:
                lines.append(f"| {model} | – | – | {'skipped' if 'skipped' in per else 'error'}: {per.get('skipped', per.get('error'))} | | | |")
                continue
            for sde, r in per.items():
                if "fp32_maths" not in r:
                    lines.append(f"| {model} | {sde} | – | {'skipped' if 'skipped' in r else 'error'}: {r.get('skipped', r.get('error'))} | | | |")
                    continue
                a, b = r["fp32_maths"]["all"], r["bf16_maths"]["all"]
                lines.append(f"| {model} | {sde} | {_fmt(r['setting']['clip_range'])} | {_fmt(a['median'])} / {_fmt(a['p99'])} / {_fmt(a['max'])} | "
                             f"{a['clip_frac']:.1%} | {_fmt(b['median'])} / {_fmt(b['p99'])} / {_fmt(b['max'])} | {b['clip_frac']:.1%} |")
    rs = report["real_size"]
    lines += ["", "## Real size (Wan 2.1 T2V 1.3B, random weights)", ""]
    if "setting" not in rs:
        lines.append(_not_run(rs) or f"_{rs}_")
    else:
        st = rs["setting"]
        lines += [f"{st['model']}, {st['params_B']:.2f} B parameters, {st['frames']}×{st['height']}×{st['width']}, {st['steps']} steps, CFG {st['guidance']}, "
                  f"text tokens {st['text_tokens']}, LoRA rank {st['lora_rank']}, {st['dtype']}", "",
                  "| measurement | seconds | peak GB | vs estimate | note |", "|---|---|---|---|---|"]
        ro = rs.get("rollout", {})
        if ro:
            lines.append(_row_not_run("rollout vs WanPipeline", ro) or
                         f"| rollout (ours / WanPipeline) | {ro['ours_s']:.2f} / {ro['pipeline_s']:.2f} (×{ro['ratio_ours_over_pipeline']:.3f}) | "
                         f"{_fmt(ro['ours_peak_GB'])} / {_fmt(ro['pipeline_peak_GB'])} | | max diff {ro['max_abs_diff']:.2e} (latents ~{ro['latent_abs_mean']:.2f}) |")
        vd = rs.get("vae_decode", {})
        if vd:
            lines.append(_row_not_run("VAE decode", vd) or f"| VAE decode | {vd['seconds']:.2f} | {_fmt(vd['peak_GB'])} | | video {vd['video_shape']} |")
        for key in ("grpo_step_ac_on", "sft_step_ac_on", "sft_step_ac_off", "grpo_step_ac_off"):
            r = rs.get(key, {})
            label = f"{key.split('_')[0].upper()} step, AC {key.rsplit('_', 1)[1]}"
            if not r:
                continue
            row = _row_not_run(label, r)
            if row:
                if r.get("peak_GB_at_failure"):
                    row = row[: -len("| | | |")] + f"| {r['peak_GB_at_failure']:.1f} at failure | | |"
                lines.append(row)
                continue
            vs = (f"{_fmt(r.get('estimate_GB'))} GB (×{r['measured_over_estimate']:.2f})" if r.get("measured_over_estimate") else
                  "– (CUDA, real layout only)")
            lines.append(f"| {label} | {r['s_per_step']:.2f} | {_fmt(r['peak_GB'])} | {vs} | peak − frozen VAE/text encoder {_fmt(r.get('peak_minus_frozen_GB'))} GB |")
    co = report["compile"]
    lines += ["", "## torch.compile", ""]
    lines.append((_not_run(co) or f"_{co}_") if "compiled_s" not in co else
                 f"compile {co['first_call_s (compile)']:.1f} s (second call {co['second_call_s']:.3f} s); eager {co['eager_s']:.3f} s, compiled {co['compiled_s']:.3f} s "
                 f"(×{co['compiled_over_eager']:.3f}); max velocity diff {co['max_abs_diff']:.2e} (|v| ~{co['velocity_abs_mean']:.2f})")
    sg = report["strategies"]
    lines += ["", "## Strategies (the shipped fragments, 2 SFT steps, world 1)", ""]
    if any(k in sg for k in ("skipped", "error")):
        lines.append(_not_run(sg) or f"_{sg}_")
    else:
        lines += ["| fragment | exit code | seconds | last log line |", "|---|---|---|---|"]
        for name, r in sg.items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} | | |")
                continue
            log = [ln for ln in r.get("log_tail", "").splitlines() if ln.strip()]
            errors = [ln for ln in log if "Error" in ln or "error:" in ln] if r.get("returncode") != 0 else []
            last = (errors or log)[-1:] or [""]
            lines.append(f"| {name} | {r.get('returncode')} | {r.get('seconds', 0):.0f} | `{last[0][:200].replace('|', '/')}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="GPU proof kit: bf16 ratio drift, real-size speed and memory against vidalign estimate, torch.compile, "
                                                 "the CUDA strategy fragments; writes OUT/gpu_check.json and OUT/gpu_check.md (docs/gpu.md).")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole command in seconds (default 480)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="real (default on CUDA) or tiny (default on CPU)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                        help="parts to run (default: all on CUDA; ratio_drift and real_size on CPU); the others are recorded as skipped")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--workdir", default=None, help="where the random-weight real-size folder is written (default: a temporary folder)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s, start=T0 if argv is None else None)  # (a command: from the process start)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("real" if cuda else "tiny")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    wanted = args.parts or (list(PARTS) if cuda else ["ratio_drift", "real_size"])
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    report: dict[str, Any] = {"device": device_name(device), "commit": git_commit(), "date": datetime.date.today().isoformat(), "size": size,
                              "dtype": dtype, "budget_s": args.budget_s, "seconds": 0.0,
                              **{p: {"skipped": "not run yet"} for p in PARTS}}
    ctx = {"models": Models(device, dtype, size, workdir), "size": size, "workdir": workdir}

    def write():
        """The JSON first, atomically (a kill while writing leaves the previous one); then the table, whose failure
        is recorded in it rather than ending the run."""
        report["seconds"] = time.monotonic() - budget.start
        tmp = os.path.join(args.out, "gpu_check.json.tmp")
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, os.path.join(args.out, "gpu_check.json"))
        try:
            table = markdown(report)
        except Exception as e:  # noqa: BLE001 - the measurements are in the JSON
            table = f"# GPU check\n\nthe table could not be written ({type(e).__name__}: {e}); the measurements are in gpu_check.json\n"
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(table)
        return table

    for part in PARTS:
        if part not in wanted:
            report[part] = {"skipped": "not asked for (--parts)" if args.parts else "needs CUDA (name it in --parts to run it on CPU)"}
            continue
        reason = budget.skip_reason(SIZES[size]["estimate_s"][part] * 0.25, part)
        if reason:
            report[part] = {"skipped": reason}
            write()
            continue
        print(f"gpu_check: {part} ({budget.left():.0f} s left)", flush=True)
        try:
            report[part] = PART_FUNCTIONS[part](ctx, budget)
        except Exception as e:  # noqa: BLE001 - recorded: one failing part must not lose the others' results
            report[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
    print(write())
    return report


if __name__ == "__main__":
    main()
