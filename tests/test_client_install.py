"""What `pip install .` gives without extras: the client and the `qaas` command, no server and no torch. The
server's and the worker's commands say which extra they need instead of failing with a traceback."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qaas import cli
from tests.conftest import fail_or_skip

ROOT = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 300


def _requirements(extras: dict[str, list[str]], extra: str) -> set[str]:
    """The distributions an extra brings (an extra that names qaas[other] brings other's too), normalized."""
    names: set[str] = set()
    for requirement in extras[extra]:
        match = re.match(r"([A-Za-z0-9._-]+)(?:\[([^\]]+)\])?", requirement)
        assert match, requirement
        name, inner = match.groups("")
        if name == "qaas":
            names |= {dist for other in inner.split(",") for dist in _requirements(extras, other.strip())}
        else:
            names.add(name.lower().replace("-", "_"))
    return names


def test_the_packages_each_extra_is_checked_for_are_in_that_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, packages in cli.EXTRAS.items():
        assert set(packages) <= _requirements(extras, extra), extra
    assert {command.extra for command in cli.COMMANDS.values()} <= set(cli.EXTRAS)


def test_a_command_whose_extra_is_missing_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a)
    )
    assert cli.main(["quantize", "--help"]) == 2
    assert capsys.readouterr().err == "qaas quantize needs the worker extra: pip install 'qaas[worker]'\n"

    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib, "import_module", lambda _module: missing("uvicorn"))
    assert cli.main(["serve", "--port", "1"]) == 2
    assert capsys.readouterr().err == "qaas serve needs the server extra: pip install 'qaas[server]'\n"
    # A module of qaas's own that is not there is a bug: it is not blamed on an extra.
    monkeypatch.setattr(importlib, "import_module", lambda _module: missing("app.core.nothing"))
    with pytest.raises(ModuleNotFoundError, match="app.core.nothing"):
        cli.main(["keys", "list"])


def test_the_server_and_worker_commands_parse_their_own_flags() -> None:
    for command, flag in (
        ("serve", "--data-dir"),
        ("worker", "--concurrency"),
        ("quantize", "--batch-sizes"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "qaas", command, "--help"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: qaas {command} ") and flag in done.stdout


def _sources(target: Path) -> Path:
    """What `pip install .` builds from: pyproject.toml, the README and the packages it includes, copied so that
    the build writes nothing into the working tree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    target.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", target)
    shutil.copy2(ROOT / project["project"]["readme"], target)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ROOT.iterdir():
        # A package, not qaas.egg-info (which "qaas*" matches too).
        if (folder / "__init__.py").is_file() and any(fnmatch.fnmatch(folder.name, p) for p in patterns):
            shutil.copytree(folder, target / folder.name, ignore=ignore)
    return target


def _fresh_venv(venv: Path, source: Path) -> None:
    """`pip install SOURCE` (with its dependencies, from the configured index) into a new venv at `venv`.
    Quick: pip is this venv's (`--python`: the new one needs none of its own, no ensurepip step), nothing is
    byte-compiled ahead, and pip's cache keeps the downloads. Fails under CI when it cannot, else skips."""
    steps = (
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
         "--no-compile", str(source)],
    )  # fmt: skip
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if done.returncode != 0:
            fail_or_skip(f"cannot build a fresh venv ({step[2]}): {(done.stdout + done.stderr)[-3000:]}")


@pytest.mark.slow
def test_pip_install_without_extras_gives_the_client_alone(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _fresh_venv(venv, _sources(tmp_path / "src"))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
        # In tmp_path, not the repository: `python -c` puts the working directory first on sys.path.
        return subprocess.run(
            [str(part) for part in command], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
        )

    qaas, python = venv / "bin" / "qaas", venv / "bin" / "python"
    overview = run(qaas, "--help")
    assert overview.returncode == 0 and "submit" in overview.stdout and "serve" in overview.stdout, overview
    submit = run(qaas, "submit", "--help")
    assert submit.returncode == 0 and "--weight-granularity" in submit.stdout, submit
    client = run(python, "-c", "import qaas.client")
    assert client.returncode == 0, client.stderr
    where = run(python, "-c", "import qaas; print(qaas.__file__)")
    assert where.stdout.startswith(str(venv)), where
    for module in ("fastapi", "sqlalchemy", "torch"):
        absent = run(python, "-c", f"import {module}")
        assert absent.returncode == 1 and f"No module named '{module}'" in absent.stderr, (module, absent)
    for command, extra in (("serve", "server"), ("quantize", "worker")):
        refused = run(qaas, command, "--help")
        assert refused.returncode == 2, refused
        assert refused.stderr == f"qaas {command} needs the {extra} extra: pip install 'qaas[{extra}]'\n"
