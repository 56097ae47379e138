"""Issue 35: the GPU kit's packing scripts on CPU — pack wheels into parts that fit a copy limit (a file larger than a
part is cut into chunks), receive the parts into a fresh stage, join and check them, install into a fresh target
with this repository, and import from there."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = os.path.join(ROOT, "scripts", "device", "pack.py")
INSTALL = os.path.join(ROOT, "scripts", "device", "install.py")


def _run(*args, **kw):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Two small packages at this project's pins for this interpreter, in parts of 150 KiB (jsonargparse's 177 KB wheel
    is cut in two)."""
    out = tmp_path_factory.mktemp("pack") / "device"
    res = _run(PACK, "--out", out, "--python-version", "here", "--packages", "jsonargparse", "docstring_parser", "--limit-mib", 150 / 1024,
               "--margin-mib", 0, "--tree-bytes", 0, "--any-out")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_pack_splits_into_parts_under_the_limit_with_one_manifest(packed):
    parts = sorted(p for p in os.listdir(packed) if p.startswith("part"))
    assert len(parts) >= 2
    manifests = [json.load(open(packed / p / "manifest.json")) for p in parts]
    assert all(m == manifests[0] for m in manifests) and manifests[0]["parts"] == len(parts)
    for p in parts:  # every part within the limit (the manifest itself is a few hundred bytes)
        assert sum(os.path.getsize(packed / p / f) for f in os.listdir(packed / p) if f != "manifest.json") <= 150 * 1024
    jsonarg = next(f for f in manifests[0]["files"] if f["name"].startswith("jsonargparse-"))
    assert len(jsonarg["chunks"]) == 2 and sum(size for _, _, size in jsonarg["chunks"]) == jsonarg["size"]
    commands = (packed / "COMMANDS.md").read_text()
    assert all("install.py receive" in commands and f"/{p}" in commands for p in parts)
    assert commands.count("install.py install") == 1 and "scripts/gpu_check.py --out $OUT/gpu" in commands
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert f"VIDALIGN_COMMIT={head}" in commands  # the device's copy has no git: the results name the packed commit


def test_pack_refuses_a_folder_a_device_command_cannot_carry(tmp_path):
    outside = _run(PACK, "--out", tmp_path / "parts", "--wheel-dir", tmp_path)
    assert outside.returncode == 2 and "is outside the repository" in outside.stderr and "Traceback" not in outside.stderr
    tracked = _run(PACK, "--out", os.path.join(ROOT, "docs", "parts_here"), "--wheel-dir", tmp_path)
    assert tracked.returncode == 2 and "is not ignored by git" in tracked.stderr
    assert not os.path.exists(os.path.join(ROOT, "docs", "parts_here"))


def test_install_names_missing_parts_then_installs_and_imports_from_the_target(packed, tmp_path):
    stage, target = tmp_path / "stage", tmp_path / "site"
    assert _run(INSTALL, "receive", packed / "part1", "--stage", stage).returncode == 0
    early = _run(INSTALL, "install", "--stage", stage, "--target", target)
    assert early.returncode == 1 and "part(s) [2" in early.stderr and "receive them first" in early.stderr and "Traceback" not in early.stderr
    for p in sorted(os.listdir(packed)):
        if p.startswith("part"):
            assert _run(INSTALL, "receive", packed / p, "--stage", stage).returncode == 0
    res = _run(INSTALL, "install", "--stage", stage, "--target", target)
    assert res.returncode == 0, res.stderr[-3000:]
    # -P: the working directory (this repository's sources) is not on the path; PYTHONPATH=target comes before the venv
    probe = ("import jsonargparse, docstring_parser, lightning_vidalign, lightning_vidalign.algorithms as a; "
             "from lightning_vidalign.config_files import resolve_data_path; "
             "print(jsonargparse.__file__, docstring_parser.__file__, lightning_vidalign.__file__, a.__file__, a.GRPO.__name__)")
    res = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert res.returncode == 0, res.stderr[-3000:]
    files = res.stdout.split()
    assert all(f.startswith(str(target)) for f in files[:4]) and files[4] == "GRPO"
    # the package data laid out as an install does: the demo bases and the shipped configs
    assert (target / "lightning_vidalign" / "demo_bases" / "wan_tiny" / "model_index.json").is_file()
    assert (target / "lightning_vidalign" / "configs" / "strategies" / "fsdp2.yaml").is_file()
    assert (target / "lightning_vidalign" / "configs" / "data" / "skvideo_captions.jsonl").is_file()


def test_a_part_of_another_pack_is_refused(packed, tmp_path):
    stage = tmp_path / "stage"
    assert _run(INSTALL, "receive", packed / "part1", "--stage", stage).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.load(open(packed / "part2" / "manifest.json"))
    manifest["files"][0]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = _run(INSTALL, "receive", other, "--stage", stage)
    assert res.returncode == 1 and "belongs to another pack" in res.stderr


def test_a_corrupted_chunk_is_refused(packed, tmp_path):
    stage = tmp_path / "stage"
    for p in sorted(os.listdir(packed)):
        if p.startswith("part"):
            assert _run(INSTALL, "receive", packed / p, "--stage", stage).returncode == 0
    chunk = next(f for f in os.listdir(stage) if f.endswith(".chunk001"))
    with open(stage / chunk, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01")
    res = _run(INSTALL, "install", "--stage", stage, "--target", tmp_path / "site")
    part = json.load(open(stage / "manifest.json"))
    holders = next(sorted({p for p, _, _ in f["chunks"]}) for f in part["files"] if any(c == chunk for _, c, _ in f["chunks"]))
    assert res.returncode == 1 and "does not match the manifest (SHA-256 differs)" in res.stderr and f"receive part(s) {holders} again" in res.stderr
