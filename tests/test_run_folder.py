"""A run's folder and console, through the ``vidalign`` CLI as a user runs it (issue 18): a second ``fit`` into a used
run folder is refused (``--ckpt_path last`` resumes it), ``load_from_checkpoint`` rebuilds a run from its checkpoint
alone, bad input is one line without traceback and leaves no empty log folder, the top-level ``--optimizer`` is refused,
and the model summary has no FLOPs column of zeros."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDALIGN = shutil.which("vidalign", path=os.path.dirname(sys.executable)) or shutil.which("vidalign")
FAST = ["--data.init_args.shot_detector", "histogram", "--model.init_args.val_num_videos", "0", "--trainer.limit_val_batches", "0"]


def _vidalign(*args, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VIDALIGN_TRACEBACK", None)
    return subprocess.run([VIDALIGN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_used_run_folder_is_refused_last_resumes_and_the_checkpoint_loads_alone(tmp_path):
    run = tmp_path / "runs" / "sft"
    sft = ["fit", "--config", f"{ROOT}/configs/sft.yaml", "--trainer.default_root_dir", str(run), *FAST]
    # --ckpt_path last in a new folder (what a requeued SLURM script passes on every launch): a new run, said once
    first = _vidalign(*sft, "--trainer.max_steps", "1", "--ckpt_path", "last", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"--ckpt_path last: no last.ckpt in {run / 'checkpoints'} yet, so a new run starts there" in first.stdout + first.stderr
    # Lightning's hint to set save_last is moot here (we say a new run starts). Its other hint, that `srun` is available
    # and unused, is printed on a machine with SLURM installed (a login node) and is right there: it is left as is, and
    # this test does not depend on whether SLURM is installed (issue 36)
    assert "save_last=True" not in first.stdout + first.stderr
    # the model summary: no FLOPs column (always 0 here), the Fréchet metric under its own name
    assert "FLOPs" not in first.stdout and "TransNetV2FrechetDistance" in first.stdout and "FrechetInceptionDistance" not in first.stdout
    assert (run / "checkpoints" / "last.ckpt").is_file() and sorted(os.listdir(run / "tb")) == ["version_0"]

    again = _vidalign(*sft, "--trainer.max_steps", "1", cwd=tmp_path)
    assert again.returncode == 2
    assert "RunFolderInUseError" in again.stderr and "--ckpt_path last" in again.stderr and str(run) in again.stderr
    assert "Traceback" not in again.stderr
    assert sorted(os.listdir(run / "tb")) == ["version_0"] and sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]

    # resumed mid-epoch (5 batches per epoch) across an epoch end: the progress bar counts the run's batches and
    # agrees with the stop line (Lightning's own bar read "4/2" here)
    resumed = _vidalign(*sft, "--trainer.max_steps", "7", "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {run / 'checkpoints' / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    assert "`max_steps=7` reached" in resumed.stdout + resumed.stderr
    bar = [line for line in resumed.stdout.splitlines() if line.startswith("Epoch ")][-1]
    assert bar.startswith("Epoch 1 ") and " 7/7 " in bar, bar
    # time and speed of this fit's 6 batches (Lightning's restarted at the epoch and read 0:00:00 and 0.00it/s)
    import re

    clock, speed = re.search(r" 7/7 (\d+:\d\d:\d\d) • \S+ ([\d.]+)(it/s|s/it) ", bar).group(1, 2)
    assert clock != "0:00:00" and float(speed) > 0, bar
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 7 and sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]
    # extending a finished run (its last.ckpt written as it stopped at max_steps=1, mid-epoch) continues where it
    # stopped: the same adapters bitwise as an uninterrupted run of 7 (Lightning's epoch-end state skipped the
    # epoch's other 4 batches)
    straight = tmp_path / "runs" / "sft_straight"
    once = _vidalign("fit", "--config", f"{ROOT}/configs/sft.yaml", "--trainer.default_root_dir", str(straight), *FAST,
                     "--trainer.max_steps", "7", cwd=tmp_path)
    assert once.returncode == 0, once.stderr[-3000:]
    ref = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    lora = [k for k in ref["state_dict"] if "lora_" in k]
    assert lora and all(torch.equal(ref["state_dict"][k], ckpt["state_dict"][k]) for k in lora)

    # load_from_checkpoint, from the checkpoint alone: the run's class (also when called on the base class), its
    # backbone rebuilt from the recorded config, the trained adapters loaded
    import lightning_vidalign  # noqa: F401
    from lightning_vidalign.algorithms import SFT
    from lightning_vidalign.module import VideoAlignModule

    for cls in (SFT, VideoAlignModule):
        model = cls.load_from_checkpoint(str(run / "checkpoints" / "last.ckpt"))
        assert type(model) is SFT and model.backbone.lora_config.r == 8
        state = model.state_dict()
        adapters = {k: v for k, v in ckpt["state_dict"].items() if "lora_" in k}
        assert adapters and all(torch.equal(state[k], v) for k, v in adapters.items())
        assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained, not the initial zeros
    # another method's class: named, with the class to load it with (Lightning's message spoke of blocked code)
    from lightning_vidalign.algorithms import SHIFT

    with pytest.raises(TypeError, match="written by a SFT run .* not a SHIFT: load it with SFT.load_from_checkpoint"):
        SHIFT.load_from_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    # a checkpoint missing an adapter tensor is named, not loaded half
    missing = next(k for k in ckpt["state_dict"] if "lora_A" in k)
    del ckpt["state_dict"][missing]
    torch.save(ckpt, tmp_path / "partial.ckpt")
    with pytest.raises(KeyError, match="checkpoint lacks 1 adapter tensor"):
        SFT.load_from_checkpoint(str(tmp_path / "partial.ckpt"))


def test_bad_input_is_one_line_and_leaves_no_log_folder(tmp_path):
    run = tmp_path / "run"
    base = ["fit", "--config", f"{ROOT}/configs/sft.yaml", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "1", *FAST]
    # an error while building the model: jsonargparse used to wrap it with the whole config (printed twice)
    missing = _vidalign(*base, "--model.init_args.backbone.init_args.pretrained_path", str(tmp_path / "no_such_model"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.count("does not exist") == 1 and "no_such_model" in missing.stderr
    assert "Traceback" not in missing.stderr and "Namespace(" not in missing.stderr and len(missing.stderr) < 600
    # an error in the data's setup, after the logger made its folder: the empty version folder is removed
    captions = tmp_path / "other.jsonl"
    captions.write_text(json.dumps({"video": "my_clip_001.mp4", "caption": "a cat"}) + "\n")
    unmatched = _vidalign(*base, "--data.init_args.captions", str(captions), cwd=tmp_path)
    assert unmatched.returncode == 2, unmatched.stderr[-3000:]
    assert "vidalign: ValueError: data.captions" in unmatched.stderr and "none of its 1 video name(s)" in unmatched.stderr
    assert "Traceback" not in unmatched.stderr
    assert not run.exists()  # the run folder this failed start made is gone too
    # a malformed captions row (issue 36): the file and its line, not json's count inside the row's text
    captions.write_text(json.dumps({"video": "a.mp4", "caption": "a cat"}) + '\n{"video": "b.mp4", "caption": "a dog"\n')
    malformed = _vidalign(*base, "--data.init_args.captions", str(captions), cwd=tmp_path)
    assert malformed.returncode == 2 and f"vidalign: ValueError: {captions}:2: not valid JSON" in malformed.stderr, malformed.stderr[-3000:]
    assert "Traceback" not in malformed.stderr and malformed.stderr.splitlines()[-2].startswith(f"vidalign: ValueError: {captions}:2:")
    # a folder without videos: what a source may be, and the option to set
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no video here")
    empty = _vidalign(*base, "--data.init_args.sources", f"[{tmp_path / 'empty'}]", cwd=tmp_path)
    assert empty.returncode == 2 and "vidalign: VideoDecodeError: no video in" in empty.stderr, empty.stderr[-3000:]
    assert ".mp4" in empty.stderr and "--data.init_args.sources" in empty.stderr and "Traceback" not in empty.stderr
    # a bug keeps its traceback: an exception raised inside a library is not shortened (the optimizer's own check)
    bug = _vidalign(*base, "--model.init_args.optimizer.init_args.lr", "-1", cwd=tmp_path)
    assert bug.returncode != 0 and "Traceback" in bug.stderr and "Invalid learning rate" in bug.stderr


def test_top_level_optimizer_is_refused_naming_the_module_option(tmp_path):
    out = _vidalign("fit", "--config", f"{ROOT}/configs/sft.yaml", "--optimizer", "Adam", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("vidalign: UsageError: --optimizer is not an option")
    assert out.stderr.splitlines()[-1] == "(bad input: no traceback shown; VIDALIGN_TRACEBACK=1 shows it)"
    assert "--model.init_args.optimizer" in out.stderr and "warm-up" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_ends_at_a_saved_batch_and_resuming_gives_the_uninterrupted_run(tmp_path):
    """Issue 36: Ctrl-C (SIGINT) during `vidalign fit` finishes the current batch, saves last.ckpt, prints the resume
    command and exits 130 (no LoRA exported: not the run's result); that command, run as printed, reaches the end with
    the adapters of an uninterrupted run, bit for bit."""
    import signal
    import threading
    import time

    from safetensors.torch import load_file

    def fit(run, *extra):
        return ["fit", "--config", f"{ROOT}/configs/sft.yaml", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "12", *FAST, *extra]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([VIDALIGN, *fit(tmp_path / "run")], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not any("Trainable params" in line for line in seen) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.5)  # into the training steps
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "vidalign: SIGINT received: the current batch finishes" in err and "Traceback" not in err
    resume = next(line for line in err.splitlines() if line.strip().startswith("resume: vidalign fit"))
    stopped = int(err.split("stopped after batch ")[1].split()[0])
    assert 1 <= stopped < 12, err[-2000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["last.ckpt"] and not (tmp_path / "run" / "lora").exists()
    # the printed command, as printed
    import shlex

    argv = shlex.split(resume.split("resume: ", 1)[1])
    assert argv[0] == "vidalign" and argv[-2:] == ["--ckpt_path", "last"]
    resumed = _vidalign(*argv[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = _vidalign(*fit(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = load_file(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"), load_file(tmp_path / "full" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once_and_the_handlers_are_restored():
    import signal

    from lightning_vidalign.preemption import InterruptCheckpoint, resume_command

    cb = InterruptCheckpoint()
    previous = signal.getsignal(signal.SIGINT)
    cb.on_train_start(None, None)
    assert signal.getsignal(signal.SIGINT) == cb._handler
    cb._handler(signal.SIGINT, None)
    assert cb.requested and cb.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        cb._handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) == previous  # restored before raising
    from lightning_vidalign import cli, preemption

    assert preemption.ABORTED == [signal.SIGINT]
    # `vidalign` exits with the shells' code for it, whatever Lightning's graceful shutdown raised (it exits 1)
    class Aborted:
        def __init__(self, args=None):
            preemption.ABORTED.append(signal.SIGINT)
            raise SystemExit(1)

    real = cli.VidAlignCLI
    cli.VidAlignCLI = Aborted
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit"])
    finally:
        cli.VidAlignCLI = real
        preemption.ABORTED.clear()
    assert exit_info.value.code == 130
    assert resume_command(["fit", "--config", "a b.yaml", "--ckpt_path", "x.ckpt", "--trainer.max_steps=3"]) == \
        "vidalign fit --config 'a b.yaml' --trainer.max_steps=3 --ckpt_path last"
