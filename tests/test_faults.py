"""Faults lose nothing (issue 36): a reward service killed mid-run ends `vidalign fit` with the state of the last
completed batch saved (nothing of the failed batch in it), the error labelled by its cause (not "bad input") and the
resume command printed; that command, run as printed once the service is back, reaches the end with the adapters of
an uninterrupted run, bit for bit. (Ctrl-C: tests/test_run_folder.py; SLURM preemption: tests/test_slurm.py.)"""
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDALIGN = shutil.which("vidalign", path=os.path.dirname(sys.executable)) or shutil.which("vidalign")
ENV = {**{k: v for k, v in os.environ.items() if k != "VIDALIGN_TRACEBACK"}, "HF_HUB_OFFLINE": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port):
    """`vidalign serve-reward` of the luminance reward on ``port``, up (its /health answers)."""
    proc = subprocess.Popen([VIDALIGN, "serve-reward", "--reward", "lightning_vidalign.rewards.LuminanceReward", "--port", str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            return proc, json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2))
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
    raise AssertionError("serve-reward did not come up")


def _batches(port):
    try:
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2))["batches"]
    except OSError:
        return -1


def _fit(run, port, *extra):
    return [VIDALIGN, "fit", "--config", f"{ROOT}/configs/flow_grpo.yaml", "--config", f"{ROOT}/configs/rewards/remote.yaml",
            "--trainer.callbacks.url", f"http://127.0.0.1:{port}", "--trainer.callbacks.max_retries", "1", "--trainer.callbacks.retry_backoff", "0.2",
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4", "--model.init_args.num_inference_steps", "4",
            "--model.init_args.val_num_videos", "0", "--trainer.limit_val_batches", "0", "--data.init_args.shot_detector", "histogram", *extra]


def _lora(run):
    from safetensors.torch import load_file

    return load_file(os.path.join(run, "lora", "pytorch_lora_weights.safetensors"))


def test_a_reward_service_killed_mid_run_loses_no_completed_batch(tmp_path):
    port = _free_port()
    server, _ = _serve(port)
    try:
        full = subprocess.run(_fit(tmp_path / "full", port), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
        assert full.returncode == 0, full.stderr[-3000:]
        per_round = _batches(port) / 4  # scored batches per round (the overlapped chunks)
        # the same run again; the service is killed once it has scored two rounds
        run = subprocess.Popen(_fit(tmp_path / "run", port), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = _batches(port)
        deadline = time.time() + 600
        while _batches(port) < start + 2 * per_round and time.time() < deadline and run.poll() is None:
            time.sleep(0.05)
        server.kill()
        server.wait()
        err = run.stderr.read()
        run.wait(timeout=600)
    finally:
        if server.poll() is None:
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
    server, _ = _serve(port)  # the cause fixed: the service is back, on its address
    try:
        resumed = subprocess.run([VIDALIGN, *argv[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    finally:
        server.kill()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    a, b = _lora(tmp_path / "run"), _lora(tmp_path / "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
