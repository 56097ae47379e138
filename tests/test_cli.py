import glob
import os

import pytest
import yaml

from lightning_vidalign.cli import main

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"sft.yaml", "shift.yaml", "imr_pretrain.yaml", "sage_grpo.yaml", "flow_grpo.yaml", "dance_grpo.yaml", "cps_grpo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(c) for c in CONFIGS])
def test_every_config_parses_and_instantiates(path):
    with open(path) as f:
        first = f.readline()
    assert first.startswith("# Launch: vidalign "), f"{path} must start with its launch command"
    from lightning_vidalign.cli import VidAlignCLI

    cli = VidAlignCLI(args=["--config", path], run=False)
    assert cli.model is not None and cli.datamodule is not None


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join(ROOT, "configs", "shift.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_vidalign.algorithms.SHIFT"
    assert printed["model"]["init_args"]["lam"] == 0.01


def test_user_subclass_and_missing_key_error(tmp_path, capsys):
    from lightning_vidalign.cli import VidAlignCLI

    cli = VidAlignCLI(
        args=["--config", os.path.join(ROOT, "configs", "sft.yaml"), "--model", "custom_method.MyMethod",
              "--model.backbone", "lightning_vidalign.backbones.SVDBackbone", "--model.backbone.lora_rank", "4"],
        run=False,
    )
    assert type(cli.model).__name__ == "MyMethod"
    with pytest.raises(SystemExit):
        VidAlignCLI(args=["--model", "lightning_vidalign.algorithms.SFT"], run=False)
    assert "backbone" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_subcommands(subcommand, tmp_path):
    limit = {"validate": "limit_val_batches", "test": "limit_test_batches", "predict": "limit_predict_batches"}[subcommand]
    from lightning_vidalign.cli import VidAlignCLI

    cli = VidAlignCLI(args=[
        subcommand, "--config", os.path.join(ROOT, "configs", "sft.yaml"), f"--trainer.{limit}", "1",
        "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path),
        "--model.num_inference_steps", "2", "--model.val_num_videos", "1",
    ])
    if subcommand == "predict":
        out = cli.trainer.predict_loop.predictions
        assert out[0]["video"].shape == (2, 8, 3, 64, 64)
    else:
        metrics = cli.trainer.callback_metrics
        assert f"{'test' if subcommand == 'test' else 'val'}/gen/motion_score" in metrics


def test_console_script_exits_zero(tmp_path):
    """The installed ``vidalign`` script runs a job and exits 0 (sys.exit(main()) must get None)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "vidalign")
    assert os.path.isfile(script), "the project must be installed (pip install -e .)"
    out = subprocess.run(
        [script, "validate", "--config", os.path.join(ROOT, "configs", "sft.yaml"), "--trainer.limit_val_batches", "1",
         "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path),
         "--model.num_inference_steps", "2", "--model.val_num_videos", "1"],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_grpo_config_with_a_frozen_discriminator_appended_on_the_command_line(tmp_path, monkeypatch):
    """The header of configs/sage_grpo.yaml: a pretrained IMR, frozen, added to the heuristic rewards."""
    import torch

    monkeypatch.chdir(tmp_path)  # the config's runs/ paths land here

    from lightning_vidalign.cli import VidAlignCLI
    from lightning_vidalign.rewards import IMRReward

    IMRReward(seed=3).save_pretrained(str(tmp_path / "imr.pt"))
    cli = VidAlignCLI(args=[
        "fit", "--config", os.path.join(ROOT, "configs", "sage_grpo.yaml"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
        "--data.captions", os.path.join(ROOT, "configs", "data", "skvideo_captions.jsonl"), "--trainer.callbacks+=lightning_vidalign.rewards.IMRReward", "--trainer.callbacks.adversarial=false",
        f"--trainer.callbacks.pretrained={tmp_path / 'imr.pt'}", "--trainer.callbacks.weight=0.1",
        "--model.num_inference_steps", "4",
    ])
    imr = [cb for cb in cli.trainer.callbacks if isinstance(cb, IMRReward)]
    assert len(imr) == 1 and imr[0].num_updates == 0  # frozen: never trained
    saved = torch.load(tmp_path / "imr.pt", weights_only=False)["ema"]
    assert all(torch.equal(v, saved[k]) for k, v in imr[0].ema.state_dict().items())
    metrics = cli.trainer.callback_metrics
    assert {"reward/imr/mean", "reward/motion/mean", "reward/flicker/mean"} <= set(metrics)
    assert cli.model.updates == 4  # 2 rounds x 2 minibatches
