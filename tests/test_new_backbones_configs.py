"""Every GRPO-family and DPO Wan config, as written, with each new backbone swapped in on the command line
(issue 23): the tiny Wan 2.2 A14B-style two experts (a folder written by the test) and the tiny HunyuanVideo 1.5,
2 steps through the CLI, a trained LoRA exported. sage_grpo.yaml and dpo_wan.yaml also run by default in
tests/test_wan_experts.py and tests/test_hunyuan_video15.py; this sweep is opt-in (``-m slow``, ~4 min on 2 cores: 18 runs, 4-38 s each)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIGS = ["flow_grpo.yaml", "dance_grpo.yaml", "cps_grpo.yaml", "sage_grpo.yaml", "bpgo.yaml", "self_paced_grpo.yaml", "vipo.yaml",
           "joint_grpo.yaml", "dpo_wan.yaml"]
SMALL = ["--model.rollouts_per_condition", "2", "--model.num_inference_steps", "4"]
SMALL_GRPO = SMALL + ["--model.rollout_batch_size", "4", "--model.train_batch_size", "4"]


@pytest.fixture(scope="module")
def experts_folder(tmp_path_factory):
    from lightning_vidalign.backbones import WanBackbone

    path = tmp_path_factory.mktemp("wan22_a14b_tiny")
    WanBackbone(boundary_ratio=0.875, finetune="full", mode="t2v").save_pretrained(str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["wan_two_experts", "hunyuan_video15"])
@pytest.mark.parametrize("config", CONFIGS)
def test_config_runs_with_the_new_backbone(config, backbone, experts_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lightning_vidalign.cli import main

    monkeypatch.chdir(tmp_path)
    if backbone == "wan_two_experts":
        swap = ["--model.backbone.pretrained_path", str(experts_folder), "--model.backbone.mode", "t2v"]
    else:
        swap = ["--model.backbone", "lightning_vidalign.backbones.HunyuanVideo15Backbone", "--model.backbone.pretrained_path", "tiny", "--model.backbone.mode", "t2v"]
    main(["fit", "--config", os.path.join(ROOT, "configs", config), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path), "--data.captions", os.path.join(ROOT, "configs", "data", "skvideo_captions.jsonl"),
          *swap, *(SMALL if config.startswith("dpo") else SMALL_GRPO)])
    files = sorted(f for f in os.listdir(tmp_path / "lora") if f.endswith(".safetensors"))
    assert files == (["pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"] if backbone == "wan_two_experts"
                     else ["pytorch_lora_weights.safetensors"])
    for f in files:
        assert any(v.abs().max() > 0 for k, v in load_file(tmp_path / "lora" / f).items() if "lora_B" in k), f  # trained
