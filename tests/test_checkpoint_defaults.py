"""Issue 32: a checkpoint gets its pipeline's conditioning and defaults, not the tiny model's.

- text lengths, guidance, sampling steps come from the folder's own record or the diffusers pipeline's defaults
  (``backbone.settings`` names each source), the tiny family and the demo bases keep theirs;
- HunyuanVideo 1.5 MeanFlow checkpoints get ``timestep_r`` as ``HunyuanVideo15ImageToVideoPipeline`` passes it;
- ``dtype: bfloat16`` stores the frozen base in bf16 and keeps the LoRA masters (and diffusers' fp32 modules) fp32.
"""
import json
import os

import pytest
import torch

from lightning_vidalign.backbones import HunyuanVideo15Backbone, SVDBackbone, WanBackbone
from lightning_vidalign.sampling import sde_step_with_logprob
from test_wan import _perturb_lora

CAPTION = "a red car drives along a wet coastal road at dusk while waves break on the rocks"


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A Wan 2.1 folder laid out as the Hub's (:mod:`real_layout`, small widths): no settings record of ours."""
    from real_layout import write_model

    return write_model(str(tmp_path_factory.mktemp("wan_real_layout") / "wan"), "wan2.1_t2v_1.3b", "small")


def test_tiny_and_demo_bases_keep_their_settings():
    tiny = WanBackbone()
    assert tiny.max_sequence_length == 32 and tiny.default_setting("guidance") == 1.0 and tiny.default_setting("num_inference_steps") == 10
    assert tiny.settings["max_sequence_length"]["source"].startswith("tiny family")
    demo = WanBackbone(pretrained_path="demo:wan_tiny", mode="ti2v")
    assert demo.max_sequence_length == 32 and demo.settings["max_sequence_length"]["source"].endswith("model_index.json _vidalign_defaults")
    svd = SVDBackbone(pretrained_path="demo:svd_tiny")
    assert svd.default_setting("guidance") == 1.0 and svd.default_setting("num_inference_steps") == 10


def test_a_tiny_family_folder_without_a_record_keeps_the_tiny_defaults(tmp_path):
    """A folder of the tiny family written before ``_vidalign_defaults`` existed (its model_index names the packaged
    MiniLM) keeps 32 tokens, guidance 1, 10 steps rather than the real Wan's."""
    path = str(tmp_path / "old")
    WanBackbone(finetune="full").save_pretrained(path)
    index = json.load(open(os.path.join(path, "model_index.json")))
    index.pop("_vidalign_defaults")
    json.dump(index, open(os.path.join(path, "model_index.json"), "w"))
    bb = WanBackbone(pretrained_path=path)
    assert (bb.max_sequence_length, bb.default_setting("guidance"), bb.default_setting("num_inference_steps")) == (32, 1.0, 10)
    assert bb.settings["max_sequence_length"]["source"].startswith("tiny-family folder")


def test_a_real_wan_folder_gets_the_wan_pipelines_defaults(wan_folder):
    """Before (issue 32): ``max_sequence_length`` 32, guidance 1, 10 steps for any checkpoint; now WanPipeline's own."""
    bb = WanBackbone(pretrained_path=wan_folder)
    assert bb.max_sequence_length == 512 and "WanPipeline.__call__ default" in bb.settings["max_sequence_length"]["source"]
    assert bb.default_setting("guidance") == 5.0 and bb.default_setting("num_inference_steps") == 50
    assert bb.default_setting("flow_shift") == 3.0 and bb.settings["flow_shift"]["source"] == "scheduler/scheduler_config.json flow_shift"
    assert WanBackbone(pretrained_path=wan_folder, max_sequence_length=64).settings["max_sequence_length"] == {"value": 64, "source": "config"}
    from lightning_vidalign.algorithms import SFT

    module = SFT(backbone=bb)
    assert module.guidance == 5.0 and module.num_inference_steps == 50
    assert SFT(backbone=bb, guidance=2.0, num_inference_steps=8).guidance == 2.0


def test_wan_text_length_changes_the_velocity():
    """Wan's cross-attention has no text mask: the zero padding rows change the output even for a short prompt, which
    is why the text length must be the pipeline's (measured on the tiny random Wan, issue 32)."""
    bb = WanBackbone()
    _perturb_lora(bb, 0)
    x = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])
    v = {}
    for length in (32, 512):
        bb.max_sequence_length = length
        v[length] = bb.predict(x, sigma, bb.encode_condition({"caption": ["a dog runs on the grass"]}))
    diff = (v[32] - v[512]).abs().max().item()
    print(f"tiny random Wan: max |v(L=32) - v(L=512)| = {diff:.4f} for max |v| = {v[512].abs().max().item():.2f}")
    assert diff > 1e-3


# ------------------------------------------------------------------ MeanFlow
@pytest.fixture(scope="module")
def meanflow():
    bb = HunyuanVideo15Backbone(mode="i2v", lora_rank=4, lora_alpha=4, tiny_transformer={"use_meanflow": True})
    _perturb_lora(bb, 3)
    frame = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return bb, frame, bb.encode_condition({"caption": [CAPTION], "first_frame": frame})


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_meanflow_i2v_rollout_reproduces_the_image_to_video_pipeline(meanflow, guidance):
    from test_hunyuan_video15 import i2v_pipeline_latents

    bb, frame, cond = meanflow
    assert bb.use_meanflow and bb.settings["use_meanflow"]["value"] is True
    ours = bb.rollout(cond, "ode", 4, guidance, torch.Generator().manual_seed(0), num_frames=9, decode=False).latents
    theirs = i2v_pipeline_latents(bb, frame, cond, guidance, 4)  # the pipeline passes timestep_r itself
    err = (ours.permute(0, 2, 1, 3, 4) - theirs).abs().max().item()
    print(f"MeanFlow I2V ODE rollout vs HunyuanVideo15ImageToVideoPipeline (guidance {guidance}): max |diff| = {err:.2e}")
    assert err <= 1e-5


def test_meanflow_velocity_depends_on_timestep_r_and_a_single_level_loss_is_refused(meanflow):
    bb, _, cond = meanflow
    x = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    s, s_next = torch.tensor([0.8]), torch.tensor([0.6])
    with_r = bb.predict(x, s, cond, sigma_next=s_next)
    # the transformer itself without timestep_r, same inputs otherwise: the velocity we computed before issue 32
    kwargs = {}

    def capture(module, args, kw):
        kwargs.update(kw)

    handle = bb.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    bb.predict(x, s, cond, sigma_next=s_next)
    handle.remove()
    assert torch.allclose(kwargs["timestep_r"].float(), torch.tensor([600.0]))
    kwargs.pop("timestep_r")
    old = bb.transformer(**kwargs)[0].float().permute(0, 2, 1, 3, 4)
    diff = (old - with_r).abs().max().item()
    print(f"tiny MeanFlow I2V: max |v(no timestep_r) - v(timestep_r)| = {diff:.3f} for max |v| = {with_r.abs().max().item():.2f}")
    assert diff > 1e-3
    with pytest.raises(ValueError, match="MeanFlow"):
        bb.training_loss(torch.randn(1, 3, 8, 16, 16), cond, torch.tensor([0.5]), torch.randn(1, 3, 8, 16, 16))


def test_meanflow_trajectory_rescoring_gives_ratio_one(meanflow):
    bb, _, cond = meanflow
    traj = bb.rollout(cond, "flow_grpo", 3, 2.0, torch.Generator().manual_seed(3), num_frames=9, keep_trajectory=True, decode=False)
    for i in range(3):
        s, s_next = float(traj.sigmas[i]), float(traj.sigmas[i + 1])
        v = bb.guided_velocity(traj.x_t[:, i], torch.full((1,), s), cond, 2.0, sigma_next=torch.full((1,), s_next))
        _, _, _, lp = sde_step_with_logprob(v, traj.x_t[:, i], s, s_next, "flow_grpo", 0.7, prev_sample=traj.x_next[:, i])
        assert torch.equal(lp, traj.log_prob[:, i])


# ---------------------------------------------------------------------- bf16
def test_bf16_compute_keeps_lora_masters_and_fp32_modules_in_fp32():
    ref = WanBackbone(lora_rank=4, lora_alpha=4)
    bb = WanBackbone(lora_rank=4, lora_alpha=4, dtype="bfloat16")
    fp32_names = bb.transformer._keep_in_fp32_modules
    for name, p in bb.transformer.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, name
        elif any(k in name.split(".") for k in fp32_names):
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.bfloat16, name
    # the same LoRA init as fp32 (adapters are drawn before the cast)
    assert len(ref.trainable_parameters()) == len(bb.trainable_parameters()) > 0
    assert all(torch.equal(a, b) for a, b in zip(ref.trainable_parameters(), bb.trainable_parameters()))
    _perturb_lora(ref, 1)
    _perturb_lora(bb, 1)
    cond = bb.encode_condition({"caption": [CAPTION]})
    x0, noise = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(2)), torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    loss = bb.training_loss(x0, cond, torch.tensor([0.5]), noise)
    loss_ref = ref.training_loss(x0, ref.encode_condition({"caption": [CAPTION]}), torch.tensor([0.5]), noise)
    assert loss.dtype == torch.float32 and abs(loss.item() - loss_ref.item()) / loss_ref.item() < 0.05
    loss.sum().backward()
    grads = [p.grad for p in bb.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with pytest.raises(ValueError, match="finetune='full'"):
        WanBackbone(finetune="full", dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        WanBackbone(dtype="bf16")


def test_meanflow_grpo_step_loss_rescores_with_ratio_one_and_the_moving_reference(meanflow):
    """``GRPO.step_loss`` (policy and the moving-reference KL of SAGE-GRPO's dual KL) passes each step's next level to a
    MeanFlow model: re-scoring the rollout's own steps gives ratio 1 and a zero moving KL (anchor = policy)."""
    from lightning_vidalign.algorithms import SAGEGRPO

    bb, _, cond = meanflow
    module = SAGEGRPO(backbone=bb, rollouts_per_condition=2, guidance=2.0)
    module.refresh_anchor()
    traj = bb.rollout(cond, "sage", 3, 2.0, torch.Generator().manual_seed(4), num_frames=9, keep_trajectory=True, decode=False, eta=module.eta)
    for i in range(3):
        s, s_next = float(traj.sigmas[i]), float(traj.sigmas[i + 1])
        loss, metrics = module.step_loss(traj.x_t[:, i], traj.x_next[:, i], traj.log_prob[:, i], torch.ones(1), s, s_next, cond, 1.0)
        assert torch.isfinite(loss).all() and float(metrics["ratio"]) == 1.0, (i, metrics)
        assert float(metrics["kl/moving"]) == 0.0 and float(metrics["kl/step"]) == 0.0


def test_meanflow_i2v_fits_with_validation_through_the_cli(tmp_path, monkeypatch):
    """SAGE-GRPO on a tiny MeanFlow I2V HunyuanVideo 1.5 through ``vidalign fit`` with validation on: no ``val/loss``
    (no loss at one level), rollouts with ``timestep_r``, the LoRA trained."""
    from lightning_vidalign.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", os.path.join(root, "configs", "sage_grpo.yaml"), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
          "--trainer.val_check_interval", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
          "--model.backbone", "lightning_vidalign.backbones.HunyuanVideo15Backbone", "--model.backbone.pretrained_path", "tiny",
          "--model.backbone.mode", "i2v", "--model.backbone.tiny_transformer", '{"use_meanflow": true}', "--model.num_inference_steps", "3",
          "--model.rollouts_per_condition", "2", "--model.rollout_batch_size", "4", "--model.train_batch_size", "4"])
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
