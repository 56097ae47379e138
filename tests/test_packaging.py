"""Reproducible installs (issue 19): constraints.txt pins what an install resolves, and CI runs exactly
the README's test command."""
import os
import re
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins() -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirement_name(spec: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", spec).group(0)).lower()


def test_every_direct_dependency_is_pinned_exactly():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    direct = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    pins = _pins()
    missing = sorted({_requirement_name(s) for s in direct} - set(pins))
    assert not missing, f"direct dependencies without an exact pin in constraints.txt: {missing}"


def test_installed_environment_matches_the_pins():
    """The running environment is what constraints.txt says (a drifted venv would test something else).
    torch's local build tag (+cpu / +cu128) is ignored: GPU users swap the build, not the version."""
    wrong = {}
    for name, version in _pins().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for an optional extra that is not installed here
        if have.split("+")[0] != version.split("+")[0]:
            wrong[name] = (version, have)
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    tests_cmd = [b for b in blocks if "pytest" in b and "venv" in b]
    assert len(tests_cmd) == 1, "README must give exactly one install-and-test command"
    assert tests_cmd[0].strip() in ci, ".ci/run must call the README's test command as written"
