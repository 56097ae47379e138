"""``vidalign estimate`` (lightning_vidalign/memory.py): real configurations on the meta device, the activation model
against SavedActivationTracker on held-out tiny shapes, the command as a user runs it, and the table of docs/scale.md equal
to its output."""
import os
import re
import subprocess
import sys

import pytest

from lightning_vidalign.memory import REAL_MODELS, block_activation_bytes, build_on_meta, shapes_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("key,low,high", [("wan2.1-1.3b", 1.3e9, 1.5e9), ("wan2.1-14b", 13.5e9, 15e9), ("hunyuanvideo1.5", 8.0e9, 8.6e9)])
def test_real_configs_build_on_meta_with_the_published_sizes(key, low, high):
    """Published sizes: Wan 2.1 1.3B / 14B, HunyuanVideo 1.5 8.3B parameters."""
    model = build_on_meta(REAL_MODELS[key])
    assert next(model.parameters()).device.type == "meta"
    assert low <= shapes_of(model, REAL_MODELS[key]).params <= high


# shapes not among the fitting ones (scripts/fit_memory_model.py's FIT_SHAPES), measured in the dtypes the backbones
# train in (LoRA float32 over a bf16 base: with the LoRA cast to bf16 the first fit was 30 % low; this test then failed)
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_activation_model_matches_the_tracker_on_tiny_builds(finetune):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from fit_memory_model import FIT_SHAPES, measure

    errors = {}
    for family, shapes in {"wan": [(6, 16, 384, 5, 12, 12, 20), (3, 32, 256, 4, 16, 8, 12)], "hunyuan15": [(6, 16, 4, 8, 8, 20), (3, 32, 3, 12, 8, 12)]}.items():
        for shape in shapes:
            assert shape not in FIT_SHAPES[family]
            measured, t = measure(family, finetune, shape)
            model = block_activation_bytes(family, finetune, t["n"], t["D"], t["F"], t["H"], t["L"])
            errors[f"{family} {shape}"] = model / measured - 1
    for k, v in errors.items():
        print(f"{finetune} {k}: model / tracker - 1 = {v:+.3%}")
    assert max(abs(v) for v in errors.values()) <= 0.05


def _estimate_output():
    script = os.path.join(os.path.dirname(sys.executable), "vidalign")
    out = subprocess.run([script, "estimate"], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_vidalign_estimate_prints_the_table_and_the_scale_page_holds_it():
    text = _estimate_output()
    for spec in REAL_MODELS.values():
        assert f"**{spec.name}**" in text
    assert text.count("| 480p") == text.count("| 720p") == 3 * 2 * 4  # models x frame counts x SP sizes
    assert "✓" in text and "✗" in text
    page = open(os.path.join(ROOT, "docs", "scale.md")).read()
    section = re.search(r"<!-- BEGIN vidalign estimate -->\n(.*?)\n<!-- END vidalign estimate -->", page, re.S)
    assert section, "docs/scale.md lacks the marked section of `vidalign estimate`"
    assert section.group(1).strip() == text, "docs/scale.md's memory table is stale: rerun `vidalign estimate` and paste its output"
