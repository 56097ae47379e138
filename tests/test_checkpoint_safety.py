"""Resume safety (issue 20), through ``vidalign fit`` as a user runs it (configs/sft.yaml, configs/shift.yaml, the tiny
SVD demo base, 1-3 steps): a checkpoint of another method or configuration is refused with the list of differing
fields; adapter-only initialisation from another method's checkpoint starts at step 0; a writer killed with SIGKILL
mid-write leaves the previous ``last.ckpt`` intact and resumable to the uninterrupted result; a truncated
checkpoint is named with the newest intact one."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import lightning_vidalign
from lightning_vidalign.checkpointing import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    CorruptCheckpointError,
    check_identity,
    is_intact_checkpoint,
    load_adapter_weights,
    load_checkpoint_file,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
VIDALIGN = shutil.which("vidalign", path=os.path.dirname(sys.executable)) or shutil.which("vidalign")
SFT_CONFIG, SHIFT_CONFIG = f"{ROOT}/configs/sft.yaml", f"{ROOT}/configs/shift.yaml"
FAST = ["--data.init_args.shot_detector", "histogram", "--model.init_args.val_num_videos", "0"]  # start-up only, same training


def _args(config: str, root, steps: int, *extra: str) -> list[str]:
    every = ["--trainer.callbacks.init_args.every_n_train_steps", "1"] if config == SFT_CONFIG else []  # sft.yaml: one callback
    return ["fit", "--config", config, "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.logger", "false", *every, *FAST, *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def _adapters(checkpoint: dict) -> dict:
    return {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}


@pytest.fixture(autouse=True)
def _own_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # in-process CLI runs: arguments passed explicitly, not pytest's


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An uninterrupted SFT run of 3 steps (checkpoint every step): its last.ckpt and contents."""
    from lightning_vidalign.cli import VidAlignCLI

    root = tmp_path_factory.mktemp("sft")
    cli = VidAlignCLI(args=_args(SFT_CONFIG, root, 3))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the default CLI writes atomically
    ckpt = root / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3 and not [n for n in os.listdir(ckpt.parent) if ".tmp-" in n]
    return ckpt, state


def test_checkpoint_records_what_it_belongs_to(sft_run):
    _, state = sft_run
    ident = state["vidalign"]["identity"]
    assert ident["module"] == "lightning_vidalign.algorithms.sft.SFT"
    assert ident["backbone"] == "lightning_vidalign.backbones.svd.SVDBackbone" and ident["backbone.pretrained_path"] == "demo:svd_tiny"
    assert re.fullmatch(r"[0-9a-f]{16}", ident["backbone.weights"]) and ident["backbone.finetune"] == "lora"
    assert (ident["lora.rank"], ident["lora.alpha"]) == (8, 8.0) and ident["lora.target_modules"]
    assert (ident["data.num_frames"], ident["data.fps"], ident["data.height"], ident["data.width"], ident["data.batch_size"]) == (8, 7, 64, 64, 2)
    assert ident["world_size"] == 1 and ident["version"] == lightning_vidalign.__version__
    assert not any(k.startswith("algo.") for k in ident)  # SFT has no group size


def _listed_fields(message: str) -> set[str]:
    return set(re.findall(r"^  ([\w.]+): ", message, flags=re.M))


@pytest.mark.parametrize(
    "case, config, extra, fields, line",
    [
        ("method", SHIFT_CONFIG, [], {"module", "algo.rollouts_per_condition", "algo.passes"},
         "module: lightning_vidalign.algorithms.sft.SFT → lightning_vidalign.algorithms.shift.SHIFT"),
        ("lora_rank", SFT_CONFIG, ["--model.init_args.backbone.init_args.lora_rank", "4"], {"lora.rank"}, "lora.rank: 8 → 4"),
        # the random-init tiny SVD has the demo base's architecture: every shape fits, the weights do not
        ("backbone", SFT_CONFIG, ["--model.init_args.backbone.init_args.pretrained_path", "tiny"], {"backbone.weights", "backbone.pretrained_path"},
         "backbone.pretrained_path: demo:svd_tiny → tiny"),
        ("data", SFT_CONFIG, ["--data.init_args.batch_size", "1"], {"data.batch_size"}, "data.batch_size: 2 → 1"),
    ],
)
def test_resume_of_another_run_is_refused_with_the_field_list(sft_run, tmp_path, case, config, extra, fields, line):
    from lightning_vidalign.cli import VidAlignCLI

    ckpt, _ = sft_run
    with pytest.raises(CheckpointMismatchError) as info:
        VidAlignCLI(args=_args(config, tmp_path, 4, "--ckpt_path", str(ckpt), *extra))
    message = str(info.value)
    assert _listed_fields(message) == fields, message
    assert line in message and f"--ckpt_path {ckpt} belongs to another run" in message
    assert f"--model.init_args.init_adapter_from {ckpt}" in message  # the way to start a new run from it
    assert not (tmp_path / "checkpoints").exists()  # refused before any step


def test_identity_rules_evaluation_warnings_and_old_checkpoints(sft_run, caplog):
    _, state = sft_run
    saved = state["vidalign"]["identity"]
    other_method = {**saved, "module": "lightning_vidalign.algorithms.shift.SHIFT", "algo.passes": 2}
    check_identity({"vidalign": {"identity": other_method}}, saved, "x.ckpt", adapters_only=True)  # test/validate: adapters only, allowed
    with pytest.raises(CheckpointMismatchError, match="module: .*SHIFT → .*SFT"):
        check_identity({"vidalign": {"identity": other_method}}, saved, "x.ckpt")
    with pytest.raises(CheckpointMismatchError, match="world_size: 2 → 1"):
        check_identity({"vidalign": {"identity": {**saved, "world_size": 2}}}, saved, "x.ckpt")
    with caplog.at_level("WARNING", logger="lightning_vidalign.checkpointing"):
        # a package upgrade and a moved copy of the same base weights only warn
        check_identity({"vidalign": {"identity": {**saved, "version": "0.0.1", "backbone.pretrained_path": "/scratch/svd"}}}, saved, "x.ckpt")
        check_identity({"vidalign": {"batches_seen": 3}}, saved, "old.ckpt")  # written before identities: warned, resumed
    assert f"version: 0.0.1 → {lightning_vidalign.__version__}" in caplog.text and "backbone.pretrained_path: /scratch/svd → demo:svd_tiny" in caplog.text
    assert "old.ckpt records no run identity" in caplog.text


def test_adapter_only_init_from_another_method_starts_at_step_0(sft_run, tmp_path):
    """SFT then SHIFT: SHIFT starts from the SFT run's adapters, at step 0, with a fresh optimizer."""
    from lightning_vidalign.cli import VidAlignCLI

    ckpt, state = sft_run
    VidAlignCLI(args=_args(SHIFT_CONFIG, tmp_path, 1, "--model.init_args.init_adapter_from", str(ckpt),
                           "--model.init_args.rollouts_per_condition", "2", "--model.init_args.passes", "1", "--model.init_args.num_inference_steps", "2",
                           "--model.init_args.lr_scheduler.init_args.warmup_steps", "0",  # (warm-up step 0 has lr 0)
                           "--trainer.callbacks+=checkpoint_safety_helpers.DumpAtTrainStart", "--trainer.callbacks.out", str(tmp_path / "start.pt"),
                           "--trainer.callbacks+=rehearsal_callbacks.DumpAdapters", "--trainer.callbacks.out", str(tmp_path / "end")))
    sft = {k[len("backbone."):]: v for k, v in _adapters(state).items()}
    assert any(v.abs().sum() > 0 for k, v in sft.items() if "lora_B" in k)  # trained adapters (a fresh LoRA has lora_B = 0)
    start = torch.load(tmp_path / "start.pt")
    assert start["lora"].keys() == sft.keys() and all(torch.equal(start["lora"][k], sft[k]) for k in sft)
    assert start["global_step"] == 0 and start["batches"] == 0 and start["optimizer_state_entries"] == 0  # new run, fresh optimizer
    end = torch.load(tmp_path / "end" / "rank0.pt")
    assert end["global_step"] == 1 and end["batches"] == 1
    assert any(not torch.equal(end["lora"][k], sft[k]) for k in sft)  # and SHIFT trained on from them


def test_adapter_only_init_refuses_another_lora_config(sft_run, tmp_path):
    from lightning_vidalign.algorithms import SFT
    from lightning_vidalign.backbones import SVDBackbone

    ckpt, state = sft_run
    module = SFT(SVDBackbone(pretrained_path="demo:svd_tiny", lora_rank=4, lora_alpha=8), val_num_videos=0, val_frechet=False)
    before = {k: v.clone() for k, v in module.backbone.trainable_state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_adapter_weights(module, str(ckpt))
    assert _listed_fields(str(info.value)) == {"lora.rank"} and "lora.rank: 8 → 4" in str(info.value)
    # a checkpoint without identity (older): the adapter tensors themselves are checked, and named
    legacy = {**state, "vidalign": {k: v for k, v in state["vidalign"].items() if k != "identity"}}
    torch.save(legacy, tmp_path / "legacy.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"of another shape .*lora_A.*\(8, \d+\) → \(4, \d+\)"):
        load_adapter_weights(module, str(tmp_path / "legacy.ckpt"))
    assert all(torch.equal(v, module.backbone.trainable_state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(sft_run, tmp_path):
    """The second save of a run (step 2) writes half its bytes and blocks (tests/checkpoint_safety_helpers.py,
    given as --trainer.plugins); the process is killed with SIGKILL; last.ckpt is still step 1's, and a resume
    with --ckpt_path last reaches the uninterrupted run's step-3 adapters bitwise."""
    full_ckpt, full = sft_run
    run, marker = tmp_path / "run", tmp_path / "blocked"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([VIDALIGN, *_args(SFT_CONFIG, run, 3), "--trainer.plugins", "checkpoint_safety_helpers.BlockingCheckpointIO",
                                 "--trainer.plugins.marker", str(marker)], cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached its second checkpoint"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last, partial = run / "checkpoints" / "last.ckpt", marker.read_text()
    assert partial == f"{last}.tmp-{proc.pid}" and os.path.getsize(partial) > 0 and not is_intact_checkpoint(partial)
    assert is_intact_checkpoint(str(last))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1  # the previous checkpoint, whole
    out = subprocess.run([VIDALIGN, *_args(SFT_CONFIG, run, 3), "--ckpt_path", "last"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert re.search(r"Restored all states from the checkpoint at (\S+)", console).group(1) == str(last)  # not the unfinished file
    assert not os.path.exists(partial)  # removed at the next save (its writer is dead)
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 3
    a, b = _adapters(full), _adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # = the uninterrupted run


def test_truncated_checkpoint_is_named_with_the_newest_intact_one(sft_run, tmp_path, capsys):
    from lightning_vidalign.cli import VidAlignCLI

    ckpt, _ = sft_run
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    data = ckpt.read_bytes()
    intact, truncated, leftover = folder / "epoch=0-step=3.ckpt", folder / "last.ckpt", folder / "last.ckpt.tmp-999999"
    intact.write_bytes(data)
    truncated.write_bytes(data[: len(data) // 2])
    leftover.write_bytes(data)  # newest and complete, but an unfinished write's name: never offered
    now = time.time()
    for i, p in enumerate((intact, truncated, leftover)):
        os.utime(p, (now - 100 + 10 * i, now - 100 + 10 * i))
    with pytest.raises(CorruptCheckpointError) as info:
        VidAlignCLI(args=_args(SFT_CONFIG, tmp_path, 4, "--ckpt_path", "last"))
    message = str(info.value)
    assert message.startswith(f"checkpoint {truncated} ({len(data) // 2} bytes) is truncated or corrupt")
    assert "central directory" in message  # torch's own complaint kept
    assert f"The newest intact checkpoint in {folder} is {intact}: resume with --ckpt_path {intact}" in message
    # an explicit path: named by the trainer's loader too (our CLI does not read it first for hyperparameters)
    with pytest.raises(CorruptCheckpointError, match=f"resume with --ckpt_path {intact}"):
        VidAlignCLI(args=_args(SFT_CONFIG, tmp_path, 4, "--ckpt_path", str(truncated)))
    from lightning_vidalign.cli import main  # the console script: the message, exit status 2, no traceback

    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", SFT_CONFIG, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--ckpt_path", str(truncated)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"vidalign: CorruptCheckpointError: checkpoint {truncated}" in err and "Traceback" not in err
    from lightning_vidalign.strategies import FSDP2Strategy  # reads the file itself, not through the CheckpointIO

    fsdp2 = FSDP2Strategy()
    fsdp2._lightning_module = type("Module", (), {"check_checkpoint_identity": lambda self, checkpoint: None})()
    with pytest.raises(CorruptCheckpointError, match=f"resume with --ckpt_path {intact}"):
        fsdp2.load_checkpoint(str(truncated))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "last.ckpt").write_bytes(data[:1000])
    with pytest.raises(CorruptCheckpointError, match=f"There is no intact checkpoint in {lone} to fall back to"):
        load_checkpoint_file(str(lone / "last.ckpt"))


def test_stale_temporaries_of_dead_or_reused_pids_are_removed_and_a_live_writers_kept(tmp_path):
    """Before a save: a temp file of a dead process, or one named with this process's PID (a killed
    process whose PID was reused: saves within a process are sequential), is removed; a live writer's stays."""
    import os
    import subprocess

    from lightning_vidalign.checkpointing import remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        names = {"dead": f"a.ckpt.tmp-{dead.pid}", "own": f"b.ckpt.tmp-{os.getpid()}", "live": f"c.ckpt.tmp-{live.pid}", "ckpt": "last.ckpt"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        removed = {os.path.basename(p) for p in remove_stale_temporaries(str(tmp_path))}
        assert removed == {names["dead"], names["own"]}
        assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["ckpt"]])
    finally:
        live.kill()
