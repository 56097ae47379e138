"""Issue 35: the GPU proof kit (scripts/gpu_check.py) runs on CPU at tiny sizes as it is run on a GPU: the JSON's
structure, on-policy re-scoring gives ratio 1 exactly in fp32 (every SDE, both models, at a training batch size
other than the rollout batch size), the real-size rollout equals WanPipeline's, and the time-boxing records what it
skipped and why."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
KEYS = {"device", "commit", "ratio_drift", "real_size", "compile", "strategies"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    res = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--workdir", str(out / "work")], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.load(open(out / "gpu_check.json")), (out / "gpu_check.md").read_text()


def test_cpu_run_structure_and_ratio_one_in_fp32(cpu_run):
    report, table = cpu_run
    assert KEYS <= set(report) and report["device"].startswith("CPU") and report["dtype"] == "float32"
    models = report["ratio_drift"]["models"]
    assert set(models) == {"tiny_wan", "wan2.1_t2v_1.3b"}
    for model, per in models.items():
        assert set(per) == {"flow", "dance", "cps", "sage"}, (model, per)
        for sde, r in per.items():
            st = r["setting"]
            assert st["rollout_batch_size"] != st["train_batch_size"]  # a different batch composition when re-scored
            steps = r["fp32_maths"]["per_step"]
            # CPS's last step has std 0 (no density, not trained); the others train every step
            assert [s["step"] for s in steps] == list(range(st["steps"] - (1 if sde == "cps" else 0)))
            assert all(s["max"] == 0.0 and s["clip_frac"] == 0.0 and s["n"] == st["rollouts"] for s in steps), (model, sde, steps)
            assert r["fp32_maths"]["all"]["max"] == 0.0 and r["bf16_maths"]["all"]["max"] == 0.0
            assert st["clip_range"] == {"flow": 1e-4, "dance": 1e-4, "cps": 1e-5, "sage": 1e-4}[sde]  # read from configs/<sde>_grpo.yaml
    rs = report["real_size"]
    assert rs["setting"]["text_tokens"] == 512  # the real layout's text length, not the tiny default
    assert rs["rollout"]["max_abs_diff"] < 1e-4 and rs["vae_decode"]["video_shape"][1] == rs["setting"]["frames"]
    for kind in ("grpo", "sft"):
        for ac in ("on", "off"):
            step = rs[f"{kind}_step_ac_{ac}"]
            assert step["s_per_step"] > 0 and step["peak_GB"] is None  # no CUDA: no peak
    for part in ("compile", "strategies"):
        assert "needs CUDA" in report[part]["skipped"]
    assert "| tiny_wan | flow | 0.0001 | 0 / 0 / 0 | 0.0% |" in table and "rollout (ours / WanPipeline)" in table


def test_budget_exhausted_skips_every_part_with_its_reason(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--budget-s", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert KEYS <= set(report)
    assert all(report[p]["skipped"].startswith("budget: 0 s left") for p in ("ratio_drift", "real_size"))
    assert os.path.isfile(tmp_path / "gpu_check.md")


def test_a_part_stops_between_measurements_when_the_budget_runs_out(tmp_path):
    """The time-boxing inside a part: after the budget runs out (here: after two measurements), each remaining SDE and
    model is recorded as skipped with the reason, and what was measured stays."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import torch

    import gpu_check

    class TwoMeasurements(gpu_check.Budget):
        def __init__(self):
            super().__init__(100.0)
            self.calls = 0

        def skip_reason(self, need_s, what):
            self.calls += 1
            return None if self.calls <= 3 else f"budget: test, {what} needs ~{need_s:.0f} s"  # the model's check + 2 SDEs

    models = gpu_check.Models(torch.device("cpu"), "float32", "tiny", str(tmp_path))
    out = gpu_check.part_ratio_drift({"models": models, "size": "tiny", "workdir": str(tmp_path)}, TwoMeasurements())
    tiny = out["models"]["tiny_wan"]
    assert "fp32_maths" in tiny["flow"] and "fp32_maths" in tiny["dance"]
    assert tiny["cps"]["skipped"].startswith("budget: test, tiny_wan/cps") and "skipped" in tiny["sage"]
    assert out["models"]["wan2.1_t2v_1.3b"]["skipped"].startswith("budget: test, wan2.1_t2v_1.3b drift")


@pytest.mark.slow
def test_compile_and_strategy_parts_run_on_cpu_when_named(tmp_path):
    """The CUDA parts' code paths on CPU (~40 s): compile of the tiny Wan's repeated blocks (same velocity within fp32
    rounding) and the shipped FSDP2 fragment as a user runs it (world 1, exit 0); DeepSpeed's exit code is recorded
    whatever it is (it needs CUDA)."""
    res = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--parts", "compile", "strategies"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert report["compile"]["max_abs_diff"] < 1e-3 and report["compile"]["compiled_s"] > 0
    assert report["strategies"]["fsdp2"]["returncode"] == 0, report["strategies"]["fsdp2"]["log_tail"]
    assert isinstance(report["strategies"]["deepspeed_zero2"]["returncode"], int)
    assert "not asked for" in report["ratio_drift"]["skipped"]


def test_a_failing_measurement_is_recorded_and_the_others_still_run(tmp_path):
    """One measurement raising (a CUDA out-of-memory on the GPU; here the VAE decode) is recorded as its error, the
    part's other measurements run, and the table says so."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import torch

    import gpu_check

    models = gpu_check.Models(torch.device("cpu"), "float32", "tiny", str(tmp_path))
    bb = models.real()

    def decode(latents):
        raise RuntimeError("CUDA out of memory (simulated)")

    bb.decode = decode
    out = gpu_check.part_real_size({"models": models, "size": "tiny", "workdir": str(tmp_path)}, gpu_check.Budget(300))
    assert out["vae_decode"]["error"] == "RuntimeError: CUDA out of memory (simulated)" and out["vae_decode"]["peak_GB_at_failure"] is None
    assert out["rollout"]["max_abs_diff"] < 1e-4 and all(out[k]["s_per_step"] > 0 for k in ("grpo_step_ac_on", "sft_step_ac_off", "grpo_step_ac_off"))
    report = {"device": "CPU", "commit": "x", "date": "d", "size": "tiny", "budget_s": 1.0, "seconds": 1.0, "ratio_drift": {"skipped": "s"},
              "real_size": out, "compile": {"error": "E", "traceback": "t"}, "strategies": {"skipped": "s"}}
    table = gpu_check.markdown(report)
    assert "| VAE decode | error: RuntimeError: CUDA out of memory (simulated) |" in table and "_error: E_" in table
