#!/usr/bin/env python3
"""Put the parts of ``scripts/device/pack.py`` back together on the GPU machine and install them (issue 35).

Standard library only (it runs before anything is installed)::

    python3 scripts/device/install.py receive .device/part1        # each part, in its own command
    python3 scripts/device/install.py install                      # after the last part
    export PYTHONPATH=/tmp/vidalign-site

``receive`` copies a part's chunks into the stage folder (default ``/tmp/vidalign-device``, kept while the machine
stays warm; a part of another pack is refused); ``install`` checks that every chunk of the manifest arrived (naming
the missing parts), joins the chunks, checks each wheel's size and SHA-256 (naming the parts to send again),
installs the wheels with ``pip install --no-index --no-deps --target`` (default ``/tmp/vidalign-site``), then lays
this repository's packages into the target as ``pip install`` would (``pyproject.toml``'s ``package-dir`` mapping
and package data, read with ``tomllib``; no build step, so neither setuptools nor wheel are needed there, and the
code is the machine's copy of the work tree, not a build of an older one). ``PYTHONPATH=<target>`` then puts
diffusers, peft, av, ... and ``lightning_vidalign`` in front of the image's packages. Errors are one line (exit 1).
Our design.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE = "/tmp/vidalign-device"
TARGET = "/tmp/vidalign-site"


def receive(part: str, stage: str = STAGE) -> list[str]:
    """Copy the chunks and the manifest of ``part`` into ``stage``; returns the chunk names copied.

    Raises:
        FileNotFoundError: when ``part`` has no ``manifest.json`` (not a part written by pack.py).
        ValueError: when the stage holds parts of another pack (another manifest).
    """
    manifest = os.path.join(part, "manifest.json")
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"install: {part} has no manifest.json: not a part written by scripts/device/pack.py")
    staged = os.path.join(stage, "manifest.json")
    if os.path.isfile(staged):
        with open(staged) as f, open(manifest) as g:
            if json.load(f) != json.load(g):
                raise ValueError(f"install: {part} belongs to another pack than the parts already in {stage}: remove {stage} and receive "
                                 "the parts of one pack")
    os.makedirs(stage, exist_ok=True)
    names = sorted(f for f in os.listdir(part) if f != "manifest.json")
    for name in names:
        shutil.copyfile(os.path.join(part, name), os.path.join(stage, name))
    shutil.copyfile(manifest, os.path.join(stage, "manifest.json"))
    print(f"install: received {len(names)} file(s) of {part} into {stage}")
    return names


def assemble(stage: str = STAGE) -> list[str]:
    """Join the chunks of every file of the manifest in ``stage`` and check its SHA-256; returns the joined paths.

    Raises:
        FileNotFoundError: no manifest, or chunks missing (names the parts to receive).
        ValueError: a joined file whose size or SHA-256 differs from the manifest's.
    """
    path = os.path.join(stage, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"install: no manifest in {stage}: receive the parts first (install.py receive <part>)")
    with open(path) as f:
        manifest = json.load(f)
    missing = sorted({part for entry in manifest["files"] for part, chunk, _ in entry["chunks"] if not os.path.isfile(os.path.join(stage, chunk))})
    if missing:
        raise FileNotFoundError(f"install: chunks of part(s) {missing} of {manifest['parts']} are missing in {stage}: receive them first")
    out_dir = os.path.join(stage, "wheels")
    os.makedirs(out_dir, exist_ok=True)
    joined = []
    for entry in manifest["files"]:
        out = os.path.join(out_dir, entry["name"])
        digest = hashlib.sha256()
        with open(out, "wb") as dst:
            for _, chunk, _ in entry["chunks"]:
                with open(os.path.join(stage, chunk), "rb") as src:
                    for block in iter(lambda: src.read(2**20), b""):
                        digest.update(block)
                        dst.write(block)
        if os.path.getsize(out) != entry["size"] or digest.hexdigest() != entry["sha256"]:
            parts = sorted({part for part, _, _ in entry["chunks"]})
            what = f"size {os.path.getsize(out)} instead of {entry['size']}" if os.path.getsize(out) != entry["size"] else "SHA-256 differs"
            raise ValueError(f"install: {entry['name']} does not match the manifest ({what}): receive part(s) {parts} again")
        joined.append(out)
    return joined


def lay_out_packages(repo: str, target: str) -> list[str]:
    """Copy this repository's packages into ``target`` as an install lays them out: each package of
    ``[tool.setuptools] packages`` from its ``package-dir`` folder (its ``*.py`` files), with the
    ``[tool.setuptools.package-data]`` files. Returns the package names.

    Raises:
        FileNotFoundError: naming a package folder that ``pyproject.toml`` maps and the repository lacks.
    """
    import tomllib

    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    mapping, data = tool.get("package-dir", {}), tool.get("package-data", {})
    for name in tool["packages"]:
        src = os.path.join(repo, mapping.get(name, name.replace(".", "/")))
        if not os.path.isdir(src):
            raise FileNotFoundError(f"install: pyproject.toml maps package {name} to {src}, which does not exist")
        dst = os.path.join(target, *name.split("."))
        os.makedirs(dst, exist_ok=True)
        for file in os.listdir(src):
            if file.endswith(".py"):
                shutil.copyfile(os.path.join(src, file), os.path.join(dst, file))
        for pattern in data.get(name, []):
            for dirpath, _, files in os.walk(src):
                for file in files:
                    rel = os.path.relpath(os.path.join(dirpath, file), src)
                    if fnmatch.fnmatch(rel, pattern) and rel.count(os.sep) == pattern.count("/"):
                        os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
                        shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))
    return list(tool["packages"])


def install(stage: str = STAGE, target: str = TARGET, repo: str = ROOT) -> None:
    """Assemble, ``pip install --no-index --no-deps --target`` the wheels, then lay this repository's packages into the
    target (:func:`lay_out_packages`).

    Raises:
        subprocess.CalledProcessError: when pip fails (its output is shown).
    """
    wheels = assemble(stage)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", target]
    subprocess.run([*pip, *wheels], check=True)
    packages = lay_out_packages(repo, target)
    print(f"install: {len(wheels)} wheel(s) and {len(packages)} package(s) of {repo} installed into {target}; now: export PYTHONPATH={target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Receive the parts of scripts/device/pack.py and install them (on the GPU machine).")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("receive", help="copy one part into the stage folder")
    r.add_argument("part", help="a part folder written by pack.py, e.g. .device/part1")
    r.add_argument("--stage", default=STAGE, help=f"where the parts wait (default {STAGE})")
    i = sub.add_parser("install", help="join the parts, install the wheels and lay this repository's packages into the target folder")
    i.add_argument("--stage", default=STAGE, help=f"where the parts wait (default {STAGE})")
    i.add_argument("--target", default=TARGET, help=f"install folder, then PYTHONPATH=<it> (default {TARGET})")
    args = parser.parse_args(argv)
    try:
        if args.command == "receive":
            receive(args.part, args.stage)
        else:
            install(args.stage, args.target)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as e:
        print(f"{e}" if not isinstance(e, subprocess.CalledProcessError) else f"install: pip failed (exit {e.returncode})", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
