"""Wan backbone (tiny, real MiniLM text encoder): pipeline reproduction, trajectories, LoRA, loading."""
import os

import pytest
import torch

from lightning_vidalign.backbones import WanBackbone
from lightning_vidalign.sampling import sde_step_with_logprob


def _perturb_lora(bb, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def wan():
    return WanBackbone(lora_rank=4, lora_alpha=4)


def test_captions_reach_the_batch(wan_batch):
    assert all(isinstance(c, str) and len(c) > 10 for c in wan_batch["caption"])
    assert wan_batch["video"].shape[1] == 9


@pytest.mark.parametrize("mode", ["t2v", "ti2v"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ode_rollout_reproduces_diffusers_wan_pipelines(mode, guidance, wan_batch):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    bb = WanBackbone(mode=mode, lora_rank=4, lora_alpha=4)
    _perturb_lora(bb)  # the adapters are part of the sampled policy
    batch = {"caption": wan_batch["caption"][:1], "first_frame": wan_batch["first_frame"][:1]}
    cond = bb.encode_condition(batch)
    ours = bb.rollout(cond, "ode", 4, guidance, torch.Generator().manual_seed(0), num_frames=9, decode=False).latents
    sched = FlowMatchEulerDiscreteScheduler(shift=bb.flow_shift)
    common = dict(
        prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"], guidance_scale=guidance,
        num_inference_steps=4, num_frames=9, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="latent",
    )
    if mode == "t2v":
        pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=bb.transformer, vae=bb.vae, scheduler=sched)
        theirs = pipe(**common).frames
    else:
        pipe = WanImageToVideoPipeline(
            tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None, transformer=bb.transformer, vae=bb.vae, scheduler=sched, expand_timesteps=True
        )
        theirs = pipe(image=batch["first_frame"], **common).frames
    torch.testing.assert_close(ours.permute(0, 2, 1, 3, 4), theirs, atol=1e-5, rtol=1e-5)
    if mode == "ti2v":  # the first latent frame is the image, untouched
        torch.testing.assert_close(ours[:, :1], cond["image_latents"])


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "cps", "sage"])
def test_trajectory_rescoring_gives_ratio_one(wan, wan_batch, sde_type):
    _perturb_lora(wan, 1)
    cond = wan.encode_condition(wan_batch)
    traj = wan.rollout(cond, sde_type, 4, 2.0, torch.Generator().manual_seed(0), keep_trajectory=True, num_frames=9, decode=False)
    assert traj.x_t.shape == (2, 4, 3, 8, 16, 16) and traj.log_prob.shape == (2, 4)
    for i in range(3):  # the last cps step is deterministic
        s, sn = traj.sigmas[i].item(), traj.sigmas[i + 1].item()
        with torch.no_grad():
            v = wan.guided_velocity(traj.x_t[:, i], torch.full((2,), s), cond, 2.0)
        _, _, _, lp = sde_step_with_logprob(v, traj.x_t[:, i], s, sn, sde_type, 0.7, prev_sample=traj.x_next[:, i])
        assert torch.equal(torch.exp(lp - traj.log_prob[:, i]), torch.ones(2))
        with wan.adapters_disabled(), torch.no_grad():
            v_ref = wan.guided_velocity(traj.x_t[:, i], torch.full((2,), s), cond, 2.0)
        _, _, _, lp_ref = sde_step_with_logprob(v_ref, traj.x_t[:, i], s, sn, sde_type, 0.7, prev_sample=traj.x_next[:, i])
        assert not torch.allclose(lp_ref, lp)  # the reference policy scores the sample differently


def test_training_loss_is_velocity_mse_and_ti2v_keeps_the_image_clean(wan_batch):
    bb = WanBackbone(mode="ti2v", lora_rank=4, lora_alpha=4)
    cond = bb.encode_condition(wan_batch)
    x0 = bb.encode(wan_batch["video"])
    assert x0.shape == (2, 3, 8, 8, 8)  # Wan 2.2-style VAE: 8x spatial
    g = torch.Generator().manual_seed(0)
    noise, sigma = torch.randn(x0.shape, generator=g), torch.tensor([0.3, 0.8])
    loss = bb.training_loss(x0, cond, sigma, noise)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0[:, 1:] + s * noise[:, 1:]
    expect = ((bb.predict(x_t, sigma, cond) - (noise[:, 1:] - x0[:, 1:])) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expect)
    noise2 = noise.clone()
    noise2[:, 0] += 1.0  # the image frame is never noised
    torch.testing.assert_close(bb.training_loss(x0, cond, sigma, noise2), loss)
    loss.sum().backward()
    grads = [p.grad for n, p in bb.transformer.named_parameters() if "lora_A" in n]
    assert grads and all(gr is None or torch.isfinite(gr).all() for gr in grads)
    sig = bb.sample_sigma(1000, torch.Generator().manual_seed(0))
    assert 0 < sig.min() and sig.max() < 1 and sig.mean() > 0.5  # shift 3 moves mass to high noise


def test_adapters_disabled_is_the_base_model(wan, wan_batch):
    cond = wan.encode_condition(wan_batch)
    x = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.5, 0.5])
    _perturb_lora(wan, 0, 0.0)
    base = wan.predict(x, sig, cond)
    _perturb_lora(wan, 2)
    tuned = wan.predict(x, sig, cond)
    with wan.adapters_disabled():
        ref = wan.predict(x, sig, cond)
    assert not torch.allclose(tuned, base)
    torch.testing.assert_close(ref, base)


def test_lora_export_loads_in_diffusers_wan_pipeline(wan, wan_batch, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    _perturb_lora(wan, 3)
    cond = wan.encode_condition({"caption": wan_batch["caption"][:1]})
    ours = wan.rollout(cond, "ode", 3, 1.0, torch.Generator().manual_seed(0), num_frames=9, decode=False).latents
    path = wan.export_lora(str(tmp_path))
    assert os.path.isfile(path)
    fresh = WanBackbone(lora_rank=4, lora_alpha=4)  # same base (init_seed 0), zero adapters
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=fresh.transformer, vae=fresh.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=fresh.flow_shift))
    fresh.transformer.delete_adapters(fresh.transformer.active_adapters())  # a plain diffusers model
    pipe.load_lora_weights(str(tmp_path), adapter_name="exported")
    theirs = pipe(prompt_embeds=cond["prompt_embeds"], guidance_scale=1.0, num_inference_steps=3, num_frames=9, height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    torch.testing.assert_close(ours.permute(0, 2, 1, 3, 4), theirs, atol=1e-5, rtol=1e-5)
    other = WanBackbone(lora_rank=4, lora_alpha=4)
    other.load_lora(str(tmp_path))
    torch.testing.assert_close(other.rollout(cond, "ode", 3, 1.0, torch.Generator().manual_seed(0), num_frames=9, decode=False).latents, ours)


def test_from_pretrained_local_dir_and_missing_files(tmp_path):
    import json

    from transformers import UMT5Config, UMT5EncoderModel

    from lightning_vidalign.backbones.wan import minilm_dir, tiny_wan_components

    parts = tiny_wan_components(0)
    root = tmp_path / "wan"
    parts["vae"].save_pretrained(root / "vae")
    enc = UMT5EncoderModel(UMT5Config(vocab_size=30522, d_model=384, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    enc.save_pretrained(root / "text_encoder")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(root / "tokenizer")
    parts["transformer"].save_pretrained(root / "transformer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    bb = WanBackbone(pretrained_path=str(root), lora_rank=2, lora_alpha=2)
    assert bb.flow_shift == 5.0 and isinstance(bb.text_encoder, UMT5EncoderModel)
    cond = bb.encode_condition({"caption": ["a red car"]})
    assert bb.rollout(cond, "sage", 2, 1.0, torch.Generator().manual_seed(0), num_frames=5, decode=True).video.shape == (1, 5, 3, 64, 64)
    with pytest.raises(ValueError, match="ti2v"):
        WanBackbone(pretrained_path=str(root), mode="ti2v")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline", "expand_timesteps": True}))
    ti2v = WanBackbone(pretrained_path=str(root), mode="ti2v", lora_rank=2, lora_alpha=2)
    cond = ti2v.encode_condition({"caption": ["a red car"], "first_frame": torch.rand(1, 3, 64, 64)})
    assert ti2v.rollout(cond, "sage", 2, 1.0, torch.Generator().manual_seed(0), num_frames=5, decode=False).latents.shape == (1, 2, 8, 16, 16)
    os.remove(root / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="vae"):
        WanBackbone(pretrained_path=str(root))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WanBackbone(pretrained_path=str(tmp_path / "nowhere"))


def test_bad_input_errors(wan):
    with pytest.raises(ValueError, match="4k \\+ 1"):
        wan.encode(torch.rand(1, 8, 3, 64, 64))
    with pytest.raises(KeyError, match="caption"):
        wan.encode_condition({"video": torch.rand(1, 9, 3, 64, 64)})
    with pytest.raises(KeyError, match="first_frame"):
        WanBackbone(mode="ti2v", lora_rank=2).encode_condition({"caption": ["x"]})
    with pytest.raises(ValueError, match="sampler"):
        wan.rollout(wan.encode_condition({"caption": ["x"]}), "euler_ancestral", 2, 1.0, None)
