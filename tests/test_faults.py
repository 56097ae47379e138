"""Faults lose nothing (issue 36): a reward service killed mid-run ends `vidalign fit` with the state of the last
completed batch saved (nothing of the failed batch in it), the error labelled by its cause (not "bad input") and the
resume command printed; that command, run as printed once the service is back, reaches the end with the adapters of
an uninterrupted run, bit for bit. (Ctrl-C: tests/test_run_folder.py; SLURM preemption: tests/test_slurm.py.)"""
import os
import shlex
import shutil
import subprocess
import sys
import time

import torch

from lightning_vidalign.rewards import LuminanceReward, RewardServer

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
