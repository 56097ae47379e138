"""Exports load in diffusers as a user loads them (issue 18): the Wan demo folder with ``WanPipeline.from_pretrained``
as is, the LoRA that ``vidalign fit`` writes with ``load_lora_weights``, and the merged SVD folder of
``vidalign export --merged`` with ``StableVideoDiffusionPipeline.from_pretrained``; each pipeline generates."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lightning_vidalign  # noqa: F401  (torchvision shim first)
from lightning_vidalign.backbones.base import demo_base_dir
from test_launch import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: no validation; the shot cuts come from this session's cache, which the data fixtures (wan_batch, real_batch) filled
FAST = ["--model.init_args.val_num_videos", "0"]


def _vidalign(*args: str) -> subprocess.CompletedProcess:
    """``vidalign ARGS`` (``python -m lightning_vidalign.cli``) from the repository root, as the README runs it."""
    out = subprocess.run([sys.executable, "-m", "lightning_vidalign.cli", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_wan_demo_folder_loads_in_diffusers_as_is(wan_batch):
    """``WanPipeline.from_pretrained(demo folder)`` with no arguments: the packaged MiniLM is its text encoder (the
    same prompt states as our backbone), it generates; ``WanImageToVideoPipeline.from_pretrained`` of the same folder
    (the TI2V mode the demo base was trained for), given the pipeline's prompt states and the image, reproduces our
    rollout (guidance 2: the negative prompt's states too)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    from lightning_vidalign.backbones import WanBackbone

    folder = demo_base_dir("wan_tiny")
    pipe = WanPipeline.from_pretrained(folder)
    assert type(pipe.text_encoder).__name__ == "PackagedMiniLMTextEncoder" and pipe.transformer_2 is None
    bb = WanBackbone("demo:wan_tiny", mode="ti2v", max_sequence_length=32)
    caption = wan_batch["caption"][0]
    embeds, negative = pipe.encode_prompt(caption, negative_prompt="", max_sequence_length=32)
    torch.testing.assert_close(embeds, bb.encode_prompt([caption]), atol=1e-5, rtol=1e-5)
    messy = f"  {caption} &amp;\n  more "  # the pipeline's prompt cleaning is ours too
    torch.testing.assert_close(pipe.encode_prompt(messy, do_classifier_free_guidance=False, max_sequence_length=32)[0], bb.encode_prompt([messy]), atol=1e-5, rtol=1e-5)
    frames = pipe(caption, num_frames=5, height=32, width=32, num_inference_steps=2, max_sequence_length=32, generator=_g(), output_type="np").frames
    assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all() and frames.std() > 0

    i2v = WanImageToVideoPipeline.from_pretrained(folder)
    image = wan_batch["first_frame"][:1]
    cond = bb.encode_condition({"caption": [caption], "first_frame": image})
    ours = bb.rollout(cond, "ode", 3, 2.0, _g(), num_frames=9, height=64, width=64, decode=False).latents
    # the prompt states of the T2V pipeline above: diffusers 0.42's WanImageToVideoPipeline calls ftfy on a prompt string
    # without checking that it is installed (NameError; diffusers PR #12314)
    theirs = i2v(image=image, prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=2.0, num_inference_steps=3, num_frames=9,
                 height=64, width=64, generator=_g(), output_type="latent").frames
    torch.testing.assert_close(ours.permute(0, 2, 1, 3, 4), theirs, atol=1e-4, rtol=1e-4)


def test_wan_fit_lora_loads_into_the_demo_folder_pipeline(tmp_path, wan_batch):
    """``vidalign fit --config configs/flow_grpo.yaml`` (shortened): its ``lora/pytorch_lora_weights.safetensors``
    loads with ``WanPipeline.load_lora_weights`` into the demo folder's pipeline, which then generates another clip."""
    from diffusers import WanPipeline

    _vidalign("fit", "--config", "configs/flow_grpo.yaml", "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *FAST, "--model.init_args.rollouts_per_condition", "2",
              "--model.init_args.num_inference_steps", "2", "--model.init_args.rollout_batch_size", "4", "--model.init_args.train_batch_size", "4")
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    pipe = WanPipeline.from_pretrained(demo_base_dir("wan_tiny"))
    kw = dict(prompt=wan_batch["caption"][0], num_frames=5, height=32, width=32, num_inference_steps=2, max_sequence_length=32, output_type="np")
    base = pipe(**kw, generator=_g()).frames
    pipe.load_lora_weights(str(lora.parent))
    assert pipe.transformer.active_adapters()  # the adapters are in
    tuned = pipe(**kw, generator=_g()).frames
    assert tuned.shape == base.shape and np.isfinite(tuned).all()
    assert np.abs(tuned - base).max() > 1e-4


def test_wan_export_merged_loads_in_wan_pipeline_as_the_lora_policy(tmp_path):
    """``WanBackbone.export_merged`` (tiny T2V, trained-like adapters): ``WanPipeline.from_pretrained`` of the folder,
    from a prompt string, reproduces our rollout with the adapters; the policy keeps its adapters."""
    from diffusers import WanPipeline
    from test_wan import _perturb_lora

    from lightning_vidalign.backbones import WanBackbone

    bb = WanBackbone(lora_rank=4, lora_alpha=8)
    _perturb_lora(bb, 3)
    adapters = {k: v.clone() for k, v in bb.trainable_state_dict().items()}
    pipe = WanPipeline.from_pretrained(bb.export_merged(str(tmp_path / "merged")))
    assert not any("lora" in name for name, _ in pipe.transformer.named_modules())
    assert bb.trainable_state_dict().keys() == adapters.keys() and all(torch.equal(v, adapters[k]) for k, v in bb.trainable_state_dict().items())
    prompt = "a red car drives down a hill"
    ours = bb.rollout(bb.encode_condition({"caption": [prompt]}), "ode", 3, 1.0, _g(), num_frames=5, height=32, width=32, decode=False).latents
    theirs = pipe(prompt, guidance_scale=1.0, num_inference_steps=3, num_frames=5, height=32, width=32, max_sequence_length=32, generator=_g(),
                  output_type="latent").frames
    torch.testing.assert_close(ours.permute(0, 2, 1, 3, 4), theirs, atol=1e-4, rtol=1e-4)
    with bb.adapters_disabled():  # and not the base model's
        base = bb.rollout(bb.encode_condition({"caption": [prompt]}), "ode", 3, 1.0, _g(), num_frames=5, height=32, width=32, decode=False).latents
    assert (base - ours).abs().max() > 1e-3


def test_svd_fit_then_export_merged_loads_in_stable_video_diffusion_pipeline(tmp_path, real_batch, monkeypatch, capsys):
    """``vidalign fit --config configs/sft.yaml`` (2 steps), then ``vidalign export --merged`` (in this process: the
    console script's ``main``): the folder loads with ``StableVideoDiffusionPipeline.from_pretrained`` as is and generates
    from an image — our rollout of the base with the run's LoRA, not the base's output; a fused UNet weight is
    ``W + B·A`` of the exported LoRA (scale folded into ``B``)."""
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from lightning_vidalign.backbones import SVDBackbone
    from lightning_vidalign.cli import main

    _vidalign("fit", "--config", "configs/sft.yaml", "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *FAST)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["vidalign"])
    main(["export", "--config", "configs/sft.yaml", "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last", "--merged"])
    merged = tmp_path / "merged-last"
    assert f"(step 2) written to {merged}" in capsys.readouterr().out
    assert sorted(os.listdir(merged)) == ["feature_extractor", "image_encoder", "model_index.json", "scheduler", "unet", "vae"]

    pipe = StableVideoDiffusionPipeline.from_pretrained(str(merged))
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())  # a plain UNet
    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")  # what fit wrote at its end (step 2, as last.ckpt)
    base_pipe = StableVideoDiffusionPipeline.from_pretrained(demo_base_dir("svd_tiny"))
    base_unet = base_pipe.unet
    name = "temporal_transformer_blocks.0.attn1.to_q"
    key = next(k for k in lora if name in k and "lora_A" in k)
    module = key[len("unet."): -len(".lora_A.weight")]
    a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
    assert b.abs().max() > 0  # trained
    fused, w0 = pipe.unet.get_submodule(module).weight, base_unet.get_submodule(module).weight.float()
    torch.testing.assert_close(fused, w0 + b @ a, atol=1e-6, rtol=0)

    frame = (real_batch["first_frame"][0].permute(1, 2, 0) * 255).round().byte().numpy()
    kw = dict(height=64, width=64, num_frames=8, num_inference_steps=3, min_guidance_scale=1.0, max_guidance_scale=1.0, fps=7,
              noise_aug_strength=0.02, output_type="latent")
    theirs = pipe(Image.fromarray(frame), generator=_g(3), **kw).frames
    base = base_pipe(Image.fromarray(frame), generator=_g(3), **kw).frames
    assert theirs.shape == base.shape == (1, 8, 4, 16, 16) and (theirs - base).abs().max() > 1e-4
    bb = SVDBackbone("demo:svd_tiny", lora_rank=8, lora_alpha=8, fps=7)
    bb.load_lora(str(tmp_path / "lora"))
    g = _g(3)
    cond = bb.encode_condition({"first_frame": torch.from_numpy(frame).permute(2, 0, 1).float()[None] / 255}, g)
    ours = bb.rollout(cond, "euler", 3, 1.0, g, num_frames=8, height=64, width=64, decode=False).latents
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_export_dtype_applies_to_merged_only():
    from lightning_vidalign.cli import export

    with pytest.raises(SystemExit, match="--dtype applies to --merged only"):
        export(["--config", "configs/sft.yaml", "--ckpt_path", "last", "--dtype", "float16"])
