import os

import pytest
import torch

from lightning_vidalign.backbones import SVDBackbone
from lightning_vidalign.sampling import edm_preconditioning, euler_ancestral_step, euler_step


def _pipeline(bb):
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    return StableVideoDiffusionPipeline(
        vae=bb.vae,
        image_encoder=bb.image_encoder,
        unet=bb.unet,
        scheduler=EulerDiscreteScheduler.from_config(bb.scheduler_config),
        feature_extractor=CLIPImageProcessor(),
    )


@pytest.mark.parametrize("guidance", [1.0, (1.0, 3.0)])
def test_rollout_reproduces_diffusers_svd_pipeline(backbone, real_batch, guidance):
    from PIL import Image

    frame = (real_batch["first_frame"][0].permute(1, 2, 0) * 255).round().byte().numpy()
    image = Image.fromarray(frame)
    gmin, gmax = (guidance, guidance) if isinstance(guidance, float) else guidance
    pipe = _pipeline(backbone)
    ref = pipe(
        image, height=64, width=64, num_frames=8, num_inference_steps=5, min_guidance_scale=gmin, max_guidance_scale=gmax,
        fps=backbone.fps, motion_bucket_id=127, noise_aug_strength=0.02, generator=torch.Generator().manual_seed(3), output_type="latent",
    ).frames
    g = torch.Generator().manual_seed(3)
    first = torch.from_numpy(frame).permute(2, 0, 1).float()[None] / 255
    cond = backbone.encode_condition({"first_frame": first}, g)
    traj = backbone.rollout(cond, "euler", 5, guidance, g, num_frames=8, height=64, width=64, decode=False)
    assert traj.latents.shape == ref.shape
    torch.testing.assert_close(traj.latents, ref.float(), rtol=1e-4, atol=1e-4)


def test_euler_steps_match_diffusers_scheduler():
    from diffusers import EulerDiscreteScheduler

    from lightning_vidalign.backbones.svd import SVD_SCHEDULER_CONFIG

    sched = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    sched.set_timesteps(6)
    x, f = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for i, t in enumerate(sched.timesteps[:3]):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        c_skip, c_out, _, _ = edm_preconditioning(torch.tensor(s))
        ours = euler_step(x, c_skip * x + c_out * f, s, s_next)
        theirs = sched.step(f, t, x).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x = theirs


def test_euler_ancestral_properties():
    x, d = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(euler_ancestral_step(x, d, 2.0, 1.0, eta=0.0), euler_step(x, d, 2.0, 1.0))
    z = torch.randn(4, 8)
    s, sn = 2.0, 1.0
    up = (sn**2 * (s**2 - sn**2) / s**2) ** 0.5
    down = (sn**2 - up**2) ** 0.5
    expected = x + (down - s) * (x - d) / s + up * z
    torch.testing.assert_close(euler_ancestral_step(x, d, s, sn, noise=z), expected)
    assert torch.equal(euler_ancestral_step(x, d, s, 0.0, noise=z), euler_step(x, d, s, 0.0))


def test_training_loss_edm_closed_form(backbone):
    # with F = 0 (zeroed UNet output layer) D = c_skip * x, loss = (s²+1)/s² * mean((c_skip x - x0)²)
    torch.nn.init.zeros_(backbone.unet.conv_out.weight)
    torch.nn.init.zeros_(backbone.unet.conv_out.bias)
    x0, eps = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    cond = {"image_latents": torch.zeros(2, 4, 8, 8), "image_embeds": torch.zeros(2, 1, 32), "added_time_ids": torch.zeros(2, 3)}
    s = sigma.view(2, 1, 1, 1, 1)
    expected = ((s**2 + 1) / s**2 * ((x0 + s * eps) / (s**2 + 1) - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(backbone.training_loss(x0, cond, sigma, eps), expected)
    with pytest.raises(ValueError):
        backbone.training_loss(x0, cond, sigma[:1], eps)


def test_lora_targets_adapters_disabled_and_diffusers_export(backbone, tmp_path):
    names = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert names and all("temporal_transformer_blocks" in n and "lora_" in n for n in names)
    x = torch.randn(1, 8, 4, 16, 16)
    sigma = torch.tensor([1.3])
    cond = {"image_latents": torch.randn(1, 4, 16, 16), "image_embeds": torch.randn(1, 1, 32), "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]])}
    with torch.no_grad():
        base = backbone.predict(x, sigma, cond)
        for p in backbone.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        tuned = backbone.predict(x, sigma, cond)
        with backbone.adapters_disabled():
            ref = backbone.predict(x, sigma, cond)
    assert not torch.allclose(base, tuned, atol=1e-5)
    torch.testing.assert_close(ref, base)
    # diffusers export -> the UNet loader of a fresh model gives the tuned output
    path = backbone.export_lora(str(tmp_path / "lora"))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    fresh = SVDBackbone(lora_rank=4, lora_alpha=8)
    fresh.load_lora(str(tmp_path / "lora"))
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "lora"), local_files_only=True)
    assert state and all(k.startswith("unet.") and ".lora_" in k for k in state)
    with torch.no_grad():
        fresh_out = fresh.predict(x, sigma, cond)
    torch.testing.assert_close(fresh_out, tuned, rtol=1e-4, atol=1e-5)


def test_from_pretrained_roundtrip_and_missing_files(backbone, tmp_path):
    from diffusers import EulerDiscreteScheduler

    from lightning_vidalign.backbones import tiny_svd_components

    root = tmp_path / "svd"
    parts = tiny_svd_components(seed=0)  # the same weights as the fixture's base (init_seed=0)
    for name in ("unet", "vae", "image_encoder"):
        parts[name].save_pretrained(root / name)
    EulerDiscreteScheduler.from_config(parts["scheduler_config"]).save_pretrained(root / "scheduler")
    loaded = SVDBackbone(pretrained_path=str(root), lora_rank=4, lora_alpha=8)
    x = torch.randn(1, 8, 4, 16, 16)
    cond = {"image_latents": torch.randn(1, 4, 16, 16), "image_embeds": torch.randn(1, 1, 32), "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]])}
    with torch.no_grad(), backbone.adapters_disabled(), loaded.adapters_disabled():
        torch.testing.assert_close(loaded.predict(x, torch.tensor([2.0]), cond), backbone.predict(x, torch.tensor([2.0]), cond))
    os.remove(root / "vae" / "config.json")
    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        SVDBackbone(pretrained_path=str(root))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SVDBackbone(pretrained_path=str(tmp_path / "absent"))
