import glob
import os

import pytest
import yaml

from lightning_vidalign.cli import main

ROOT = os.path.dirname(os.path.dirname(__file__))
ALL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
STRATEGY_CONFIGS = [c for c in ALL_CONFIGS if os.sep + "strategies" + os.sep in c]
# configs/rewards/*.yaml are fragments appended to an algorithm config by a second --config (their model
# files are local weights): tests/test_reward_models.py fits one step with each on tiny saved instances.
REWARD_FRAGMENTS = [c for c in ALL_CONFIGS if os.sep + "rewards" + os.sep in c]
# configs/claims.yaml is read by scripts/learning_runs.py (variants of the recipes), not by vidalign fit;
# tests/test_learning_runs.py checks it.
NOT_FIT_CONFIGS = [os.path.join(ROOT, "configs", "claims.yaml")]
# configs/models/*.yaml (the model zoo) and configs/real/*.yaml (reference recipes) name a downloaded checkpoint by a
# placeholder path: tests/test_model_zoo.py runs each as launched on a real-layout folder
ZOO_AND_RECIPES = [c for c in ALL_CONFIGS if os.sep + "models" + os.sep in c or os.sep + "real" + os.sep in c]
CONFIGS = [c for c in ALL_CONFIGS if c not in STRATEGY_CONFIGS and c not in NOT_FIT_CONFIGS and c not in REWARD_FRAGMENTS and c not in ZOO_AND_RECIPES]


def test_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"sft.yaml", "shift.yaml", "imr_pretrain.yaml", "sage_grpo.yaml", "flow_grpo.yaml", "dance_grpo.yaml", "cps_grpo.yaml"} <= names


def _pretrained_reward_files(config_path: str, root: str) -> None:
    """Write fresh discriminator files where a config expects pretrained ones (``pretrained: runs/...``)."""
    from lightning_vidalign.rewards import IMRReward, LMRReward

    with open(config_path) as f:
        cfg = yaml.safe_load(f)
    for cb in cfg.get("trainer", {}).get("callbacks") or []:
        path = (cb.get("init_args") or {}).get("pretrained")
        if path:
            cls = LMRReward if cb["class_path"].endswith("LMRReward") else IMRReward
            os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
            cls(**{k: v for k, v in cb["init_args"].items() if k in ("name", "num_queries")}).save_pretrained(os.path.join(root, path))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(c, os.path.join(ROOT, "configs")) for c in CONFIGS])
def test_every_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    with open(path) as f:
        first = f.readline()
    assert first.startswith("# Launch: vidalign "), f"{path} must start with its launch command"
    from lightning_vidalign.cli import VidAlignCLI

    monkeypatch.chdir(tmp_path)  # relative runs/ paths (outputs, pretrained rewards) land here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # (configs/loggers/mlflow.yaml's store, as its launch line says)
    _pretrained_reward_files(path, str(tmp_path))

    # a fragment launched after another config (its launch line names both, in order) is built as launched
    words = first.split()
    configs = [os.path.join(ROOT, words[i + 1]) for i, w in enumerate(words[:-1]) if w == "--config"]
    args = [a for c in (configs if path in configs else [path]) for a in ("--config", c)]
    cli = VidAlignCLI(args=args, run=False)
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


@pytest.mark.parametrize("path", REWARD_FRAGMENTS, ids=[os.path.basename(c) for c in REWARD_FRAGMENTS])
def test_reward_fragments_append_one_reward_and_select_it(path):
    """A reward fragment starts with its launch line (an algorithm config, then the fragment), appends one
    reward callback (``callbacks+``) and makes the algorithm score with it (``model.init_args.rewards``)."""
    with open(path) as f:
        first = f.readline()
        cfg = yaml.safe_load(f)
    assert first.startswith("# Launch: vidalign fit --config configs/") and f"--config configs/rewards/{os.path.basename(path)}" in first
    added = cfg["trainer"]["callbacks+"]
    assert len(added) == 1 and added[0]["class_path"].startswith("lightning_vidalign.rewards.")
    assert cfg["model"]["init_args"]["rewards"] == [added[0]["init_args"]["name"]]


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2.yaml"])
def test_strategy_configs_combine_with_an_algorithm_config(name):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lightning_vidalign.cli import VidAlignCLI

    path = os.path.join(ROOT, "configs", "strategies", name)
    with open(path) as f:
        assert f.readline().startswith("# Launch: vidalign ")
    cli = VidAlignCLI(args=["--config", os.path.join(ROOT, "configs", "sage_grpo.yaml"), "--config", path, "--trainer.accelerator", "cpu"], run=False)
    assert isinstance(cli.trainer.strategy, DDPStrategy if name == "ddp.yaml" else ModelParallelStrategy)
    assert cli.trainer.num_devices == 2


def test_deepspeed_config_matches_the_strategy_signature():
    """DeepSpeed needs CUDA and its package: validate the config against DeepSpeedStrategy without building it."""
    import inspect

    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import DeepSpeedStrategy

    path = os.path.join(ROOT, "configs", "strategies", "deepspeed_zero2.yaml")
    with open(path) as f:
        assert f.readline().startswith("# Launch: vidalign ")
        cfg = yaml.safe_load(f)
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert set(strategy["init_args"]) <= set(inspect.signature(DeepSpeedStrategy.__init__).parameters)
    parser = ArgumentParser()
    parser.add_class_arguments(DeepSpeedStrategy, "strategy")
    parsed = parser.parse_object({"strategy": strategy["init_args"]})  # type-checks every init arg
    ds = parsed.strategy.config
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] > 0


def test_fsdp1_and_multi_step_deepspeed_are_refused():
    """Lightning cannot even build FSDP1/DeepSpeed trainers on CPU; the module's own check is run on
    strategy objects created without their (GPU-requiring) constructors."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_vidalign.algorithms import GRPO, SFT
    from lightning_vidalign.backbones import SVDBackbone, WanBackbone

    module = SFT(SVDBackbone(lora_rank=2))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match="fsdp2.yaml"):
        module.setup("fit")
    grpo = GRPO(backbone=WanBackbone(lora_rank=2), sampler="ode", minibatches_per_round=2)
    grpo._trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(ValueError, match="minibatches_per_round: 1"):
        grpo.setup("fit")
    grpo.optimizer_steps_per_batch = 1
    grpo.setup("fit")  # one optimizer step per batch: allowed


def _sbatch_args(tmp_path, *args):
    """Run the sbatch script with bash as SLURM would (a stand-in ``srun`` on PATH records its arguments)."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/srun_args\n')
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "7"}
    out = subprocess.run(["bash", os.path.join(ROOT, "configs", "slurm", "vidalign.sbatch"), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return (tmp_path / "srun_args").read_text().splitlines()


def test_slurm_script_matches_the_trainer(tmp_path):
    """The sbatch file sets num_nodes/devices from the allocation, adds the preemption callback, resumes from
    last, passes every config given and the extra arguments after ``--``; its log needs no folder."""
    import inspect
    import re

    from lightning_vidalign.preemption import PreemptionCheckpoint

    text = open(os.path.join(ROOT, "configs", "slurm", "vidalign.sbatch")).read()
    assert text.splitlines()[1].startswith("# Launch: sbatch configs/slurm/vidalign.sbatch")
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    assert nodes >= 1 and tasks == gpus  # one process per GPU
    assert "/" not in re.search(r"#SBATCH --output=(\S+)", text).group(1)  # opened by SLURM before the script runs
    assert "--signal=USR1@" in text and "#SBATCH --requeue" in text
    assert "signal_name" in inspect.signature(PreemptionCheckpoint.__init__).parameters
    args = _sbatch_args(tmp_path, "configs/sage_grpo.yaml", "configs/strategies/fsdp2.yaml", "--", "--trainer.max_steps", "100")
    assert args[:4] == ["--kill-on-bad-exit=1", ".venv/bin/vidalign", "fit", "--config"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--config"] == ["configs/sage_grpo.yaml", "configs/strategies/fsdp2.yaml"]
    assert args[args.index("--trainer.num_nodes") + 1] == "2" and args[args.index("--trainer.devices") + 1] == "8"
    assert "--trainer.callbacks+=lightning_vidalign.preemption.PreemptionCheckpoint" in args and args[args.index("--ckpt_path") + 1] == "last"
    assert args[-2:] == ["--trainer.max_steps", "100"]
    default = _sbatch_args(tmp_path)
    assert [default[i + 1] for i, a in enumerate(default) if a == "--config"] == ["configs/sage_grpo.yaml", "configs/strategies/ddp.yaml"]


def test_slurm_srun_arguments_parse(tmp_path, capsys):
    """What the sbatch file hands to srun parses with the CLI (CPU in place of the GPU)."""
    args = _sbatch_args(tmp_path, "configs/sage_grpo.yaml", "configs/strategies/fsdp2.yaml", "--", "--trainer.max_steps", "100")
    args = args[args.index("fit") :]
    args[args.index("--trainer.accelerator") + 1] = "cpu"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args + ["--print_config"])
    finally:
        os.chdir(cwd)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["plugins"]["init_args"]["auto_requeue"] is False
    assert printed["trainer"]["num_nodes"] == 2 and printed["trainer"]["max_steps"] == 100
    assert printed["trainer"]["strategy"]["class_path"] == "lightning_vidalign.strategies.FSDP2Strategy"
    assert any(cb["class_path"].endswith("PreemptionCheckpoint") for cb in printed["trainer"]["callbacks"])


def test_one_command_evaluation_reports_frechet_and_motion(tmp_path):
    from lightning_vidalign.cli import VidAlignCLI

    cli = VidAlignCLI(args=[
        "test", "--config", os.path.join(ROOT, "configs", "eval.yaml"), "--trainer.limit_test_batches", "2",
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--model.init_args.num_inference_steps", "2",
    ])
    metrics = cli.trainer.callback_metrics
    for key in ("test/frechet_transnetv2", "test/gen/motion_score", "test/real/motion_score", "test/gen/dynamic_degree",
                "test/gen/temporal_flickering", "test/gen/motion_smoothness"):
        assert key in metrics, key
    assert float(metrics["test/frechet_transnetv2"]) > 0


SHIFT_ABLATIONS = ["a0_imr", "a1_noise_alignment", "a2_adversarial", "a3_lmr", "a4_full"]


def _ablation_row(name: str, tmp_path):
    """Reward pretraining (1 step each, as the configs' headers say) then the ablation row for 2 rounds."""
    from lightning_vidalign.cli import VidAlignCLI

    common = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0", "--model.num_inference_steps", "2"]
    for pre in ("imr_pretrain", "lmr_pretrain"):
        if not os.path.isfile(tmp_path / "runs" / pre / f"{pre[:3]}.pt"):
            VidAlignCLI(args=["fit", "--config", os.path.join(ROOT, "configs", f"{pre}.yaml"), "--trainer.max_steps", "1", "--model.negatives_per_real", "1", *common])
    cfg = os.path.join(ROOT, "configs", "shift", f"{name}.yaml")
    with open(cfg) as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    keep = [cb for cb in callbacks if "ModelCheckpoint" not in cb["class_path"]]
    cb_file = tmp_path / f"{name}_callbacks.yaml"
    cb_file.write_text(yaml.safe_dump({"trainer": {"callbacks": keep}}))
    return VidAlignCLI(args=["fit", "--config", cfg, "--config", str(cb_file), "--trainer.max_steps", "2", "--model.passes", "1", *common])


def _check_ablation(name, cli):
    from lightning_vidalign.rewards import IMRReward, LMRReward

    metrics = cli.trainer.callback_metrics
    rewards = {cb.name: cb for cb in cli.trainer.callbacks if isinstance(cb, (IMRReward, LMRReward))}
    want_lmr = name in ("a3_lmr", "a4_full")
    assert set(rewards) == ({"imr", "lmr"} if want_lmr else {"imr"})
    adversarial = name in ("a2_adversarial", "a4_full")
    for r in rewards.values():
        assert r.adversarial == adversarial and r.num_updates == (1 + 2 if adversarial else 1)  # 1 pretraining step (+ 2 rounds)
        assert f"reward/{r.name}/mean" in metrics
    assert cli.model.noise_alignment == (name != "a0_imr")
    assert {"reward/total/mean", "train/loss"} <= set(metrics) and all(bool(v.isfinite()) for v in metrics.values())


def test_full_shift_ablation_row_runs(tmp_path, monkeypatch):
    """A4 (both rewards, adversarial, noise alignment) in the default suite; all rows under -m slow."""
    monkeypatch.chdir(tmp_path)
    _check_ablation("a4_full", _ablation_row("a4_full", tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIFT_ABLATIONS)
def test_every_shift_ablation_row_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _check_ablation(name, _ablation_row(name, tmp_path))
