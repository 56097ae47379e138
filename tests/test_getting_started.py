"""Getting started (docs/getting-started.md) as a new user runs it (issue 33): in a fresh copy of the repository's
files (what a clone holds: tracked and untracked-but-not-ignored files, no .venv, no runs/), each fenced block in the
page's order, each after the one before — ``bash`` blocks through bash from the copy's root, a ``python`` block whose
first line is ``# <file>.py`` saved as that file (the page says to save it; a later bash block runs it). A block
whose preceding line is ``<!-- getting-started: skip (reason) -->`` is not run (the test suite itself, a server).

The first block installs the package into a new ``.venv`` through pip (``-c constraints.txt``) and trains SHIFT; the
whole page takes several minutes on 2 CPU cores, so the test is opt-in (``-m slow``)."""
import os
import re
import shutil
import subprocess
import time

import pytest
from docs_pages import fenced_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "getting-started.md")


def page_steps(text: str) -> list[tuple[str, str, str | None]]:
    """``(language, code, skip reason or None)`` of each fenced block of the page, in order."""
    return fenced_blocks(text, "getting-started")


def fresh_copy(dest: str) -> None:
    """The files a clone of the repository holds (git's view of this checkout: tracked and untracked, ignored ones out)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue  # deleted in the work tree, not yet in a commit
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def test_the_page_steps_are_bash_or_saved_python_files():
    steps = page_steps(open(PAGE).read())
    assert [lang for lang, _, _ in steps][:1] == ["bash"] and "pip install -c constraints.txt -e ." in steps[0][1]
    for lang, code, skip in steps:
        assert lang in ("bash", "python"), f"a {lang or 'plain'} block in Getting started: say how to run it"
        if lang == "python":
            assert re.match(r"# (\S+\.py)", code), "a Python block of Getting started starts with '# <file>.py' (save it as)"
            name = re.match(r"# (\S+\.py)", code).group(1)
            assert any(lang2 == "bash" and name in code2 for lang2, code2, _ in steps), f"no step runs {name}"


@pytest.mark.slow
def test_getting_started_runs_in_order_from_a_fresh_copy(tmp_path):
    work = tmp_path / "lightning-vidalign"
    fresh_copy(str(work))
    assert not (work / ".venv").exists() and not (work / "runs").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    timings = []
    for n, (lang, code, skip) in enumerate(page_steps(open(PAGE).read())):
        if skip is not None:
            timings.append((n, "skipped", skip))
            continue
        if lang == "python":
            name = re.match(r"# (\S+\.py)", code).group(1)
            (work / name).write_text(code)
            continue
        start = time.time()
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        timings.append((n, f"{time.time() - start:.0f} s", code.splitlines()[0][:100]))
        assert out.returncode == 0, f"step {n}: {code}\n{out.stdout[-3000:]}\n{out.stderr[-4000:]}"
    print("\n".join(f"step {n}: {t}: {what}" for n, t, what in timings))
    for path in ("runs/shift/lora/pytorch_lora_weights.safetensors", "runs/shift/checkpoints/last.ckpt",
                 "runs/flow_grpo/lora/pytorch_lora_weights.safetensors", "runs/shift/merged-last/model_index.json", "first_frame.png",
                 "wan_flow_grpo.gif", "svd_shift.gif"):
        assert (work / path).is_file(), path
