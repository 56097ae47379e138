"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks:``).

The package maps several source folders into one import tree (``pyproject.toml``, ``[tool.setuptools]
package-dir``: ``lightning_vidalign.algorithms`` is ``algorithms/``, ``lightning_vidalign.rewards`` is ``rewards/``, ...),
which griffe's static finder cannot follow: it finds ``lightning_vidalign/`` and no ``algorithms`` inside it. Before
the build, ``on_config`` lays out the import tree as symbolic links in a temporary folder (from the mapping in
``pyproject.toml``, so a new subpackage needs no change here) and hands that folder to mkdocstrings' Python handler as
its only search path, so the API pages are read from the checkout itself, with or without an install.

``SphinxRoles`` (a griffe extension, ``mkdocs.yml``: the Python handler's ``extensions``) turns the docstrings' Sphinx
roles (``:class:`X```) into inline code.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from mkdocs.plugins import event_priority

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_tree(root: str = ROOT, dest: str | None = None) -> str:
    """Lay out the packages of ``root``'s ``pyproject.toml`` as their import tree of symbolic links under ``dest`` (a
    new temporary folder by default) and return ``dest``."""
    setuptools = tomllib.load(open(os.path.join(root, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    mapping = setuptools.get("package-dir", {})
    dest = dest or tempfile.mkdtemp(prefix="vidalign-docs-src-")
    for package in sorted(setuptools["packages"], key=lambda p: p.count(".")):  # parents first
        source = os.path.join(root, mapping.get(package, package.replace(".", os.sep)))
        target = os.path.join(dest, *package.split("."))
        os.makedirs(target, exist_ok=True)
        for entry in os.listdir(source):
            link = os.path.join(target, entry)
            if entry == "__pycache__" or os.path.lexists(link):
                continue
            if os.path.isdir(os.path.join(source, entry)) and any(p.startswith(f"{package}.{entry}") for p in mapping):
                continue  # a mapped subpackage: laid out as its own folder
            os.symlink(os.path.join(source, entry), link)
    return dest


@event_priority(100)  # before mkdocstrings' own on_config, which creates the handler with its search paths
def on_config(config):
    dest = import_tree()
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    handlers = config["plugins"]["mkdocstrings"].config.handlers
    handlers.setdefault("python", {})["paths"] = [dest]
    return config


try:  # the griffe extension below is loaded by mkdocstrings (mkdocs.yml: extensions), not by MkDocs
    import griffe
except ModuleNotFoundError:  # pragma: no cover - only without the docs extra
    griffe = None

if griffe is not None:
    import re

    ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")

    class SphinxRoles(griffe.Extension):
        """The docstrings cross-reference in Sphinx's roles (``:class:`X```, ``:func:`~a.b.c```); Markdown shows them as
        they are. Each becomes inline code of its target (``X``, ``a.b.c``)."""

        def on_instance(self, *, obj, **kwargs) -> None:
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda m: f"`{m.group(1)}`", obj.docstring.value)
