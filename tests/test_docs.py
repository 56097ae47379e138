"""The documentation site (issue 33): ``mkdocs build --strict`` of ``mkdocs.yml`` (no warning: links, anchors, nav, the
API pages generated from the docstrings), the Python blocks of its pages run (each in a fresh interpreter, in an empty
folder), every recipe has its method page with its learning figure, and the Getting started script that loads the
results in diffusers names a missing file instead of diffusers' offline-mode error. Getting started in order, from a
fresh copy: ``tests/test_getting_started.py`` (slow)."""
import os
import re
import subprocess
import sys

import pytest
from docs_pages import fenced_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
BIN = os.path.dirname(sys.executable)


def pages() -> list[str]:
    out = []
    for folder, _, files in os.walk(DOCS):
        out += [os.path.relpath(os.path.join(folder, f), DOCS) for f in files if f.endswith(".md")]
    return sorted(out)


def python_snippets():
    params = []
    for page in pages():
        for n, (lang, code, skip) in enumerate(b for b in fenced_blocks(open(os.path.join(DOCS, page)).read(), "snippet") if b[0] == "python"):
            marks = [pytest.mark.skip(reason=f"{page}: {skip}")] if skip is not None else []
            params.append(pytest.param(page, code, id=f"{page}:{n}", marks=marks))
    return params


def test_site_builds_strict_without_warnings(tmp_path):
    """The build as ``mkdocs build --strict`` runs it, with the environment's mkdocs (the ``docs`` extra)."""
    mkdocs = os.path.join(BIN, "mkdocs")
    assert os.path.isfile(mkdocs), f"no {mkdocs}: install the docs extra (pip install -c constraints.txt -e \".[test,docs]\")"
    out = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "WARNING" not in log and "Documentation built" in log, log[-4000:]
    site = tmp_path / "site"
    api = (site / "api" / "algorithms" / "index.html").read_text()
    for name in ("SFT", "SHIFT", "GRPO", "SAGEGRPO", "BPGO", "ViPO", "SelfPacedGRPO", "DPO", "grpo_advantages"):
        assert f'id="lightning_vidalign.algorithms.{name}"' in api or f"id=\"lightning_vidalign.algorithms.advantages.{name}\"" in api, name
    assert "Group-normalised advantages" in api  # a docstring, rendered
    module = (site / "api" / "module" / "index.html").read_text()
    assert 'id="lightning_vidalign.module.VideoAlignModule"' in module
    results = (site / "results" / "index.html").read_text()
    assert "--8&lt;--" not in results and results.count("<table") >= 6  # the learning and claims tables, included
    assert "src=\"docs/figures" not in results and "src=\"../figures/claim_kl_modes.png\"" in results


def test_every_page_block_skip_has_a_reason_and_pages_are_in_the_nav():
    import yaml

    nav = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")))["nav"]

    def files(entry):
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [f for e in entry for f in files(e)]
        return [f for v in entry.values() for f in files(v)]

    listed = set(files(nav))
    excluded = {"learning.md", "claims.md"}  # included into results.md
    assert sorted(set(pages()) - listed - excluded) == [], "pages missing from mkdocs.yml's nav"
    for page in pages():
        for line in open(os.path.join(DOCS, page)):
            if "snippet:" in line and "skip" in line:
                assert re.search(r"skip\s*\(.+\)", line), f"{page}: a skipped snippet names no reason: {line.strip()}"


@pytest.mark.parametrize("page,code", python_snippets())
def test_page_python_snippet_runs(page, code, tmp_path):
    """Each Python block of a page, in a fresh interpreter (``import lightning_vidalign`` first, as the pages say), in an
    empty folder; a block that needs what another step made is marked ``<!-- snippet: skip (reason) -->``."""
    (tmp_path / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, f"{page}:\n{code}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


def test_each_recipe_has_a_method_page_with_its_learning_figure():
    recipes = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "configs", "recipes")) if f.endswith(".yaml"))
    methods = {p: open(os.path.join(DOCS, p)).read() for p in pages() if p.startswith("methods/")}
    for recipe in recipes:
        holders = [p for p, text in methods.items() if f"configs/recipes/{recipe}.yaml" in text and f"../figures/{recipe}.png" in text]
        assert holders, f"no method page names configs/recipes/{recipe}.yaml and shows figures/{recipe}.png"
        assert os.path.isfile(os.path.join(DOCS, "figures", f"{recipe}.png"))


def test_getting_started_diffusers_script_names_what_is_missing(tmp_path):
    """Run before the steps that make its inputs (or elsewhere than the repository root), the Getting started script
    says which file is missing and which step makes it (diffusers would take the missing LoRA folder for a Hub
    repository id and fail with an offline-mode message about ``weight_name``)."""
    text = open(os.path.join(DOCS, "getting-started.md")).read()
    code = next(c for lang, c, _ in fenced_blocks(text, "snippet") if lang == "python" and c.startswith("# use_in_diffusers.py"))
    (tmp_path / "use_in_diffusers.py").write_text(code)
    out = subprocess.run([sys.executable, "use_in_diffusers.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert ("FileNotFoundError: runs/flow_grpo/lora/pytorch_lora_weights.safetensors does not exist: run "
            "`vidalign fit --config configs/flow_grpo.yaml (step 3)` from the repository root first") in out.stderr, out.stderr[-3000:]
    assert "weight_name" not in out.stderr
