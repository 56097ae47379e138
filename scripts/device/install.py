#!/usr/bin/env python3
"""Put the parts of ``scripts/device/pack.py`` back together on the GPU machine and install them (issue 35).

Standard library only (it runs before anything is installed)::

    python3 scripts/device/install.py receive .device/part1        # each part, in its own command
    python3 scripts/device/install.py install                      # after the last part
    export PYTHONPATH=/tmp/vidalign-site

``receive`` copies a part's chunks into the stage folder (default ``/tmp/vidalign-device``, kept while the machine
stays warm); ``install`` checks that every chunk of the manifest arrived (naming the missing parts), joins the
chunks, checks each wheel's SHA-256, installs the wheels with ``pip install --no-index --no-deps --target`` (default
``/tmp/vidalign-site``) and then this repository itself (``--no-build-isolation``: the machine's setuptools), so
``PYTHONPATH=<target>`` puts diffusers, peft, av, ... and ``lightning_vidalign`` in front of the image's packages.
Our design.
"""
from __future__ import annotations

import argparse
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
    """
    manifest = os.path.join(part, "manifest.json")
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"install: {part} has no manifest.json: not a part written by scripts/device/pack.py")
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
            raise ValueError(f"install: {entry['name']} does not match the manifest (size {os.path.getsize(out)} vs {entry['size']}, or SHA-256)")
        joined.append(out)
    return joined


def install(stage: str = STAGE, target: str = TARGET, repo: str = ROOT) -> None:
    """Assemble, then ``pip install --no-index --no-deps --target`` the wheels and this repository.

    Raises:
        subprocess.CalledProcessError: when pip fails (its output is shown).
    """
    wheels = assemble(stage)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", target]
    subprocess.run([*pip, *wheels], check=True)
    subprocess.run([*pip, "--no-build-isolation", repo], check=True)
    print(f"install: {len(wheels)} wheel(s) and {repo} installed into {target}; now: export PYTHONPATH={target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Receive the parts of scripts/device/pack.py and install them (on the GPU machine).")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("receive", help="copy one part into the stage folder")
    r.add_argument("part")
    r.add_argument("--stage", default=STAGE)
    i = sub.add_parser("install", help="join the parts and install wheels and repository into the target folder")
    i.add_argument("--stage", default=STAGE)
    i.add_argument("--target", default=TARGET)
    args = parser.parse_args(argv)
    if args.command == "receive":
        receive(args.part, args.stage)
    else:
        install(args.stage, args.target)


if __name__ == "__main__":
    main()
