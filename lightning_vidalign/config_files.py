"""The configs that ship with the package (issue 32): ``vidalign configs list`` / ``vidalign configs copy``, and
``--config NAME`` resolving to a shipped config when no such file exists.

The repository's ``configs/`` folder is installed as the package data ``lightning_vidalign/configs`` (``pyproject.toml``
maps it, as it maps ``algorithms/``), so a wheel install has every config, strategy fragment, SLURM script and the
demo's caption files. The convention is torchtune's ``tune ls`` / ``tune cp``: list what ships, copy one to edit it.
A config names files relative to the repository root (``captions: configs/data/skvideo_captions.jsonl``); outside a
clone such a path does not exist, and :func:`resolve_data_path` reads the shipped copy instead (logged).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys

log = logging.getLogger(__name__)

#: file kinds that are configs (listed and resolved); other shipped files (caption JSONL) are data
CONFIG_SUFFIXES = (".yaml", ".yml", ".sbatch")


def shipped_dir() -> str:
    """The folder of the shipped configs: ``lightning_vidalign/configs`` of an installed wheel, or the repository's
    ``configs/`` for an editable install or a clone.

    Raises:
        FileNotFoundError: if neither exists (a broken install), naming both paths.
    """
    spec = importlib.util.find_spec("lightning_vidalign.configs")
    candidates = list(spec.submodule_search_locations) if spec is not None and spec.submodule_search_locations else []
    package = os.path.dirname(os.path.abspath(__file__))
    candidates += [os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")]
    for path in candidates:
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "strategies")):
            return path
    raise FileNotFoundError(f"no shipped configs found (looked in {candidates}); reinstall lightning-vidalign")


def list_configs() -> list[str]:
    """Names of the shipped configs relative to :func:`shipped_dir`, sorted (``flow_grpo.yaml``,
    ``models/wan2.1_t2v_1.3b.yaml``, ``real/flow_grpo_wan2.1_t2v_1.3b.yaml``, ...)."""
    root = shipped_dir()
    names = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(CONFIG_SUFFIXES):
                names.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(names)


def find_shipped(name: str) -> str | None:
    """The shipped file that ``name`` means, or None: ``name`` may be the path in the repository
    (``configs/real/flow_grpo_wan2.1_t2v_1.3b.yaml``), relative to ``configs/`` (``models/svd_xt.yaml``), or either
    without its ``.yaml`` (``flow_grpo``, ``models/svd_xt``)."""
    root = shipped_dir()
    stem = name.replace(os.sep, "/")
    stem = stem[len("configs/"):] if stem.startswith("configs/") else stem
    for candidate in (stem, stem + ".yaml"):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


def config_arguments(argv: list[str]) -> list[tuple[int, str, str]]:
    """The ``--config`` values of a command line, in order, as ``(index in argv, prefix, value)``: ``--config X`` gives
    ``(index of X, "", X)``, ``--config=X`` gives ``(its index, "--config=", X)``."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out.append((i + 1, "", argv[i + 1]))
        elif arg.startswith("--config="):
            out.append((i, "--config=", arg[len("--config="):]))
    return out


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config X`` / ``--config=X`` whose ``X`` is no file replaced by the shipped config it names
    (:func:`find_shipped`; logged). A name that is neither stays as it is (the parser then names it)."""
    out = list(argv)
    for j, prefix, value in config_arguments(argv):
        if value and not os.path.exists(value):
            shipped = find_shipped(value)
            if shipped is not None:
                log.info("--config %s: no such file here; using the shipped %s", value, shipped)
                out[j] = prefix + shipped
    return out


def resolve_data_path(path: str) -> str:
    """``path`` when it exists; else, for a repository-relative ``configs/...`` path (the shipped configs' caption and
    pair files), the shipped copy when there is one (logged); else ``path`` unchanged (the caller names it)."""
    if os.path.exists(path) or not path.replace(os.sep, "/").startswith("configs/"):
        return path
    shipped = os.path.join(shipped_dir(), path.replace(os.sep, "/")[len("configs/"):])
    if os.path.isfile(shipped):
        log.info("%s: no such file here; using the shipped %s", path, shipped)
        return shipped
    return path


def configs_command(argv: list[str]) -> None:
    """``vidalign configs list [--prefix P]`` and ``vidalign configs copy NAME [DEST]``.

    ``list`` prints one shipped config per line (optionally only names starting with ``P``, e.g. ``real/``).
    ``copy`` writes the shipped config ``NAME`` (see :func:`find_shipped`) to ``DEST`` (default: its file name in the
    current folder; a folder ``DEST`` receives the file) and refuses to overwrite an existing file.

    Raises:
        SystemExit: 2 for an unknown name, an existing destination, or a bad call (the message names it).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="vidalign configs", description="The configs shipped with lightning-vidalign: list them, or copy one to edit it.")
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="list the shipped configs")
    ls.add_argument("--prefix", default="", help="only names starting with this (e.g. real/, models/, recipes/)")
    cp = sub.add_parser("copy", help="copy a shipped config to edit it")
    cp.add_argument("name", help="a name from `vidalign configs list` (with or without .yaml)")
    cp.add_argument("dest", nargs="?", default=None, help="destination file or folder (default: the file name, here)")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name in list_configs():
            if name.startswith(args.prefix):
                print(name)
        return
    source = find_shipped(args.name)
    if source is None:
        parser.error(f"no shipped config {args.name!r}; `vidalign configs list` shows them")
    dest = args.dest or os.path.basename(source)
    if dest.endswith(("/", os.sep)):  # a folder, made if missing
        os.makedirs(dest, exist_ok=True)
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(source))
    if os.path.exists(dest):
        parser.error(f"{dest} already exists; give another destination")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    shutil.copyfile(source, dest)
    print(dest, file=sys.stdout)
