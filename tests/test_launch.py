"""The shipped strategy fragments and a multi-node launch, run through the ``vidalign`` CLI exactly as a user
runs them (issue 18): 2 CPU processes (gloo) per command."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
VIDALIGN = shutil.which("vidalign", path=os.path.dirname(sys.executable)) or shutil.which("vidalign")
FAST = ["--data.init_args.shot_detector", "histogram", "--model.init_args.val_num_videos", "0"]  # start-up only, same training


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1", **extra}
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "RANK"):
        if k not in extra:
            env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_fragment_runs_on_two_devices_as_written(tmp_path):
    """The command of issue 18 (it failed: data_parallel_size resolved to the number of nodes)."""
    cmd = [VIDALIGN, "fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/strategies/fsdp2.yaml",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "1", *FAST,
           "--trainer.callbacks+=rehearsal_callbacks.DumpAdapters", "--trainer.callbacks.out", str(tmp_path / "dump")]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert a["world_size"] == 2 and a["sharded"] and a["batches"] == 1
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])


@pytest.mark.parametrize("fragment", ["ddp", "fsdp2"])
def test_two_node_rehearsal_on_loopback_and_resume(tmp_path, fragment):
    """2 "nodes" x 1 process on 127.0.0.1 with Lightning's environment variables (MASTER_ADDR, MASTER_PORT,
    NODE_RANK, WORLD_SIZE, LOCAL_RANK) and --trainer.num_nodes 2, as the sbatch script launches them: both
    ranks end with identical adapters, and a resume from the run's last.ckpt continues to the next batch."""

    def launch(max_steps, dump, extra=()):
        port = str(_free_port())
        cmd = [VIDALIGN, "fit", "--config", f"{ROOT}/configs/sft.yaml", "--config", f"{ROOT}/configs/strategies/{fragment}.yaml",
               "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.max_steps", str(max_steps),
               "--trainer.callbacks.init_args.every_n_train_steps", "2", *FAST,
               "--trainer.callbacks+=rehearsal_callbacks.DumpAdapters", "--trainer.callbacks.out", str(tmp_path / dump), *extra]
        procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0"))
                 for r in (0, 1)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
            assert "pre-optimization state" not in out + err  # checkpoints were written (every 2 batches): no advice essay
        return [torch.load(tmp_path / dump / f"rank{r}.pt") for r in (0, 1)]

    a, b = launch(2, "first")
    assert a["world_size"] == 2 and a["batches"] == b["batches"] == 2 and a["sharded"] == (fragment == "fsdp2")
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert any(v.abs().sum() > 0 for k, v in a["lora"].items() if "lora_B" in k)
    ckpt = tmp_path / "runs" / "sft" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # the LoRA written at the end of fit (every rank gathers, rank 0 writes) holds the trained adapters,
    # and `vidalign export` of the checkpoint writes the same tensors
    from safetensors.torch import load_file

    from lightning_vidalign.backbones import SVDBackbone

    lora_file = tmp_path / "runs" / "sft" / "lora" / "pytorch_lora_weights.safetensors"
    fresh = SVDBackbone(pretrained_path="demo:svd_tiny", lora_rank=8, lora_alpha=8)
    fresh.load_lora(str(lora_file.parent))
    assert all(torch.allclose(v, a["lora"][k], rtol=1e-6, atol=0) for k, v in fresh.trainable_state_dict().items())
    out = subprocess.run([VIDALIGN, "export", "--config", f"{ROOT}/configs/sft.yaml", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "exported")],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "args parameter is intended" not in out.stderr
    exported, at_end = load_file(tmp_path / "exported" / "pytorch_lora_weights.safetensors"), load_file(lora_file)
    assert exported.keys() == at_end.keys() and all(torch.equal(exported[k], at_end[k]) for k in at_end)
    if fragment == "ddp":  # a checkpoint of another LoRA config is named, not half-loaded
        from lightning_vidalign.checkpointing import CheckpointMismatchError
        from lightning_vidalign.cli import export

        with pytest.raises(CheckpointMismatchError, match=r"last.ckpt: its adapters do not fit this run's backbone(.|\n)*lora\.target_modules"):
            export(["--config", f"{ROOT}/configs/sft.yaml", "--model.init_args.backbone.init_args.lora_target_modules", ".*attn1.to_q",
                    "--ckpt_path", str(ckpt), "--output", str(tmp_path / "never")])
    c, d = launch(3, "resumed", ["--ckpt_path", str(ckpt)])
    assert c["batches"] == d["batches"] == 3 and c["global_step"] == 3
    assert all(torch.equal(c["lora"][k], d["lora"][k]) for k in c["lora"])
    assert any(not torch.equal(c["lora"][k], a["lora"][k]) for k in a["lora"])  # trained on from batch 2


def test_docs_add_a_method_example_runs_as_written(tmp_path):
    """The "Add a method" file and command of docs/extending.md, run from the folder holding my_pkg/ (it failed with
    "No module named 'my_pkg'": console scripts do not put the working folder on sys.path), into its own run folder
    (the command once reused the SFT config's runs/sft, which a user who ran SFT before had used: refused)."""
    import re

    page = open(os.path.join(ROOT, "docs", "extending.md")).read()
    section = page[page.index("## Add a method") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    path = re.match(r"# (\S+)", code).group(1)
    (tmp_path / os.path.dirname(path)).mkdir(parents=True)
    (tmp_path / path).write_text(code)
    command = re.search(r"`(vidalign fit [^`]*my_pkg[^`]*)`", section).group(1).split()
    assert "--trainer.default_root_dir" in command and "runs/sft" not in command
    (tmp_path / "runs" / "sft" / "checkpoints").mkdir(parents=True)  # a user who ran configs/sft.yaml before
    (tmp_path / "runs" / "sft" / "checkpoints" / "last.ckpt").write_bytes(b"")
    command = [VIDALIGN if a == "vidalign" else (os.path.join(ROOT, a) if a.startswith("configs/") else a) for a in command]
    out = subprocess.run([*command, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                          "--trainer.callbacks+=rehearsal_callbacks.DumpAdapters", "--trainer.callbacks.out", str(tmp_path / "dump"), *FAST[:2]],
                         cwd=tmp_path, env={**_env(), "PYTHONPATH": HERE}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    for noise in ("💡 Tip", "LeafSpec", "Loading weights", "are not expected by", "/-2", "v_num"):
        assert noise not in console, noise  # quiet console (issue 18)
    assert "LoRA (diffusers format) written to" in console and "`max_steps=2` reached" in console
    state = torch.load(tmp_path / "dump" / "rank0.pt")
    assert state["batches"] == 2 and any(v.abs().sum() > 0 for k, v in state["lora"].items() if "lora_B" in k)


def test_docs_grpo_variant_example_runs_as_written(tmp_path):
    """The "A GRPO variant" file and command of docs/extending.md (saved as my_pkg/my_variant.py, as the page says), run
    as written from the folder holding my_pkg/ for 1 round, into its own run folder: a newcomer who ran Getting started
    has runs/flow_grpo already (the command once wrote there and was refused)."""
    import re

    page = open(os.path.join(ROOT, "docs", "extending.md")).read()
    section = page[page.index("## A GRPO variant") : page.index("## Add a reward")]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "my_variant.py").write_text(code)
    command = re.search(r"```bash\n(\S*vidalign fit [^\n]*my_pkg[^\n]*)\n```", section).group(1).split()
    assert "--trainer.default_root_dir" in command
    (tmp_path / "runs" / "flow_grpo" / "checkpoints").mkdir(parents=True)  # Getting started's Flow-GRPO run
    (tmp_path / "runs" / "flow_grpo" / "checkpoints" / "last.ckpt").write_bytes(b"")
    command = [VIDALIGN if a.endswith("vidalign") else (os.path.join(ROOT, a) if a.startswith("configs/") else a) for a in command]
    out = subprocess.run([*command, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", *FAST[:2]],
                         cwd=tmp_path, env={**_env(), "PYTHONPATH": HERE}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "`max_steps=1` reached" in out.stdout + out.stderr
    assert (tmp_path / "runs" / "my_variant" / "lora" / "pytorch_lora_weights.safetensors").is_file()
