"""configs/slurm/vidalign.sbatch on a real SLURM cluster (issue 36): a single-host cluster started by
scripts/slurm_test_cluster.sh (Debian's slurmctld/slurmd/munge, installed when missing; root only), the script submitted
with `sbatch` as the README says (CPU instead of GPUs: `--gpus-per-node=0` and `-- --trainer.accelerator cpu`), 2 tasks
on 1 node (DDP over gloo), ranks from SLURM through `srun`.

- the job trains to the end, the log lands in the submission folder as `<job name>-<job id>.out`;
- a preemption (`scancel --signal=USR1`, what `--signal=USR1@120` sends) makes both ranks save last.ckpt,
  rank 0 requeues the job through the real `scontrol`, the requeued job (SLURM_RESTART_COUNT 1) resumes with
  `--ckpt_path last` and ends with the adapters of the uninterrupted job, bit for bit.

What a real cluster cannot do here (several nodes) stays rehearsed with stand-ins in tests/test_launch.py and
tests/test_cli.py."""
import os
import shutil
import subprocess
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "slurm_test_cluster.sh")
SBATCH = os.path.join("configs", "slurm", "vidalign.sbatch")
CPU = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]  # the allocation of this 2-core host


def _fit_args(run):
    return ["configs/sft.yaml", "configs/strategies/ddp.yaml", "--", "--trainer.accelerator", "cpu", "--trainer.max_steps", "12",
            "--trainer.default_root_dir", str(run), "--data.init_args.shot_detector", "histogram", "--model.init_args.val_num_videos", "0",
            "--trainer.limit_val_batches", "0"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster's environment (``SLURM_CONF`` set); stopped (its own daemons, by PID) after the module."""
    if os.geteuid() != 0:
        pytest.skip("the single-host SLURM recipe runs its daemons as root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    folder = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", SCRIPT, "start", str(folder)], capture_output=True, text=True, timeout=600)
    if start.returncode == 3:
        pytest.skip(start.stderr.strip())
    assert start.returncode == 0, start.stdout + start.stderr
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    yield env
    subprocess.run(["bash", SCRIPT, "stop", str(folder)], capture_output=True, text=True, timeout=60)


#: variables of an earlier in-process distributed test (Lightning sets MASTER_PORT in this process): sbatch exports the
#: submitting shell's environment, and a port this process still holds failed the job's rendezvous (EADDRINUSE, seen)
_LAUNCH_VARS = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def _submit(env, name, run):
    env = {k: v for k, v in env.items() if k not in _LAUNCH_VARS}  # (a login shell's environment)
    out = subprocess.run(["sbatch", "--parsable", "-J", name, *CPU, SBATCH, *_fit_args(run)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _state(env, job):
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def _wait_gone(env, job, timeout=600):
    deadline = time.time() + timeout
    while _state(env, job) and time.time() < deadline:
        time.sleep(0.5)
    assert not _state(env, job), f"job {job} still {_state(env, job)} after {timeout} s"


def _lora(run):
    from safetensors.torch import load_file

    return load_file(os.path.join(run, "lora", "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """One job of 12 steps to the end: its log (read, then removed from the submission folder) and its run folder."""
    run = tmp_path_factory.mktemp("sbatch") / "run"
    job = _submit(slurm, "vidalign-test-full", run)
    _wait_gone(slurm, job)
    log = os.path.join(ROOT, f"vidalign-test-full-{job}.out")  # where the sbatch script's header says: the submission folder
    assert os.path.isfile(log)
    text = open(log).read()
    os.remove(log)
    return text, run


def test_sbatch_trains_to_the_end_on_two_tasks(uninterrupted):
    text, run = uninterrupted
    assert "--ckpt_path last: no last.ckpt in" in text  # the first launch starts a new run
    assert text.count("`Trainer.fit` stopped: `max_steps=12` reached.") == 1 and "Traceback" not in text, text[-3000:]
    assert "LoRA (diffusers format) written to" in text and os.path.isfile(run / "checkpoints" / "last.ckpt")


def test_preemption_requeues_and_the_requeued_job_resumes_to_the_uninterrupted_adapters(slurm, uninterrupted, tmp_path):
    _, full_run = uninterrupted
    run = tmp_path / "run"
    job = _submit(slurm, "vidalign-test-preempt", run)
    log = os.path.join(ROOT, f"vidalign-test-preempt-{job}.out")
    deadline = time.time() + 600
    while not (os.path.isfile(log) and "Trainable params" in open(log).read()) and time.time() < deadline:
        assert _state(slurm, job), open(log).read()[-3000:] if os.path.isfile(log) else f"job {job} ended without a log"
        time.sleep(0.1)
    time.sleep(2.0)  # into the training steps
    signalled = time.strftime("%H:%M:%S")
    assert subprocess.run(["scancel", "--signal=USR1", job], env=slurm).returncode == 0  # what --signal=USR1@120 sends
    while _state(slurm, job) != "PENDING" and time.time() < deadline:  # requeued by rank 0's scontrol
        time.sleep(0.2)
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    assert "Restarts=1" in shown, shown
    # SLURM holds a requeued job ~2 minutes (BeginTime) before it may start again; the test does not wait for that
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    _wait_gone(slurm, job)
    text = open(log).read()
    os.remove(log)
    print(f"signal sent at {signalled}\n" + "\n".join(ln for ln in text.splitlines() if "PreemptionCheckpoint" in ln or "CANCELLED" in ln
                                                          or "Restored" in ln or "max_steps" in ln or "ckpt_path" in ln))
    saved = [ln for ln in text.splitlines() if "SIGUSR1 received; checkpoint written to" in ln]
    assert len(saved) == 2 and {"rank 0", "rank 1"} == {ln.split(", ")[1].split("]")[0] for ln in saved}, text[-3000:]
    assert f"scontrol requeue {job} -> rc 0" in text and "DUE TO JOB REQUEUE" in text
    assert "Restored all states from the checkpoint at" in text and text.count("`max_steps=12` reached") == 1
    assert "Killed" not in text  # every rank shut down by itself after the requeue (none waited for SIGKILL)
    a, b = _lora(run), _lora(full_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
