"""Issue 32: configs travel with the package (``vidalign configs list`` / ``copy``, ``--config NAME`` of a shipped config),
``vidalign --help`` lists every subcommand, and a wheel installed in a fresh virtual environment runs the README's
commands outside the repository."""
import glob
import os
import subprocess
import sys

import pytest

from lightning_vidalign.cli import TOP_LEVEL_HELP, main
from lightning_vidalign.config_files import find_shipped, list_configs, resolve_config_arguments, resolve_data_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ("fit", "validate", "test", "predict", "check-model", "configs", "estimate", "export", "cache", "shard", "serve-reward")


def test_help_lists_every_subcommand(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"\n  {name} " in out, name
    assert out.strip() == TOP_LEVEL_HELP.strip()


def test_every_config_file_is_listed_and_found():
    shipped = set(list_configs())
    in_repo = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)}
    assert in_repo <= shipped and "slurm/vidalign.sbatch" in shipped
    assert {"models/wan2.1_t2v_1.3b.yaml", "real/sage_grpo_hunyuanvideo1.5_480p_t2v.yaml", "strategies/fsdp2.yaml"} <= shipped
    for name in ("flow_grpo", "flow_grpo.yaml", "configs/flow_grpo.yaml", "models/svd_xt"):
        assert find_shipped(name) == os.path.join(ROOT, "configs", "flow_grpo.yaml" if "flow" in name else "models/svd_xt.yaml")
    assert find_shipped("no_such_config") is None


def test_config_arguments_resolve_only_when_no_such_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "flow_grpo", "--config=models/wan2.1_t2v_1.3b", "--config", "mine.yaml"]
    assert resolve_config_arguments(args) == ["fit", "--config", os.path.join(ROOT, "configs", "flow_grpo.yaml"),
                                              "--config=" + os.path.join(ROOT, "configs", "models", "wan2.1_t2v_1.3b.yaml"), "--config", "mine.yaml"]
    (tmp_path / "flow_grpo").write_text("trainer: {}\n")  # a file of that name here wins
    assert resolve_config_arguments(["fit", "--config", "flow_grpo"]) == ["fit", "--config", "flow_grpo"]
    assert resolve_data_path("configs/data/skvideo_captions.jsonl") == os.path.join(ROOT, "configs", "data", "skvideo_captions.jsonl")


def test_configs_copy_and_its_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["configs", "copy", "real/flow_grpo_wan2.1_t2v_1.3b"])
    assert (tmp_path / "flow_grpo_wan2.1_t2v_1.3b.yaml").read_text() == open(os.path.join(ROOT, "configs", "real", "flow_grpo_wan2.1_t2v_1.3b.yaml")).read()
    (tmp_path / "mine").mkdir()
    main(["configs", "copy", "sft", "mine"])
    assert (tmp_path / "mine" / "sft.yaml").is_file()
    for args, message in ((["configs", "copy", "sft", "mine"], "already exists"), (["configs", "copy", "nope"], "no shipped config 'nope'")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    main(["configs", "list", "--prefix", "models/"])
    assert capsys.readouterr().out.split() == sorted(f"models/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, "configs", "models", "*.yaml")))


def test_a_wheel_in_a_fresh_venv_runs_the_readme_commands_outside_the_repository(tmp_path):
    """``pip wheel`` of the project, installed with ``--no-deps`` into a new virtual environment that borrows this
    environment's dependencies through a ``.pth`` line (nothing is downloaded); from a folder outside the repository:
    ``vidalign --help``, ``configs list``, ``configs copy`` and one step of ``vidalign fit --config flow_grpo`` (the
    demo base, the caption file and the config all from the wheel)."""
    import site
    import sysconfig

    import shutil

    # built from a copy of the source tree: pip builds in place, and setuptools' build/ folder must not land in (or be
    # reused from) the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache", "lightning_logs"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)], check=True, cwd=tmp_path)
    wheel = glob.glob(str(dist / "lightning_vidalign-*.whl"))[0]
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    fresh_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(fresh_site, "_borrowed_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # this environment's packages, after the wheel's own
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    vidalign = str(venv / "bin" / "vidalign")

    def run(*args):
        proc = subprocess.run([vidalign, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"vidalign {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    where = subprocess.run([py, "-c", "import lightning_vidalign, os; print(os.path.dirname(lightning_vidalign.__file__))"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), f"imported {where}, not the wheel"
    assert "check-model" in run("--help")
    listed = run("configs", "list").split()
    assert "models/svd_xt.yaml" in listed and "real/shift_svd_xt.yaml" in listed and "data/skvideo_captions.jsonl" not in listed
    assert os.path.isfile(os.path.join(where, "configs", "data", "skvideo_captions.jsonl"))
    run("configs", "copy", "flow_grpo")
    assert (work / "flow_grpo.yaml").is_file()
    out = run("fit", "--config", "flow_grpo", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--model.init_args.num_inference_steps", "2",
              "--model.init_args.rollouts_per_condition", "2", "--model.init_args.rollout_batch_size", "4", "--model.init_args.train_batch_size", "4",
              "--trainer.default_root_dir", str(work / "runs" / "flow_grpo"))
    assert os.path.isfile(work / "runs" / "flow_grpo" / "checkpoints" / "last.ckpt"), out[-2000:]
