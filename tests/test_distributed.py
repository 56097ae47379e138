import os
import subprocess
import sys

import torch


def test_shift_ddp_two_processes_keeps_ranks_identical(tmp_path):
    """DDP (gloo, 2 CPU processes): different data per rank, yet identical LoRA (DDP gradient sync) and
    identical discriminators (the reward callback's manual all-reduce) after 4 SHIFT steps."""
    job = os.path.join(os.path.dirname(__file__), "ddp_shift_job.py")
    out = subprocess.run([sys.executable, job, str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a["updates"] == b["updates"] == 4
    assert a["lora"] and all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert all(torch.equal(a["disc"][k], b["disc"][k]) for k in a["disc"])
    assert any(v.abs().sum() > 0 for k, v in a["lora"].items() if "lora_B" in k)  # trained (lora_B starts at zero)
