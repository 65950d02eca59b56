"""The package's public surface and layering."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import killsafe

ROOT = Path(__file__).resolve().parent.parent


def test_every_error_derives_from_killsafe_error() -> None:
    errors = [getattr(killsafe, name) for name in killsafe.__all__ if name[0].isupper()]
    exceptions = [e for e in errors if isinstance(e, type) and issubclass(e, BaseException)]
    assert exceptions
    for exc in exceptions:
        assert issubclass(exc, killsafe.KillsafeError)
        assert issubclass(exc, Exception)


def test_import_does_not_pull_optional_dependencies() -> None:
    code = (
        "import sys, killsafe; "
        "heavy = [m for m in ('torch', 'numpy', 'optuna', 'fastapi', 'matplotlib') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_runs_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "killsafe", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.startswith("killsafe ")


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["project"]["optional-dependencies"]


def _requirements_of(extras: list[str], table: dict[str, list[str]]) -> set[str]:
    """Distribution names an install of ``.[extras]`` pulls, following killsafe[...] links."""
    names: set[str] = set()
    for extra in extras:
        for requirement in table[extra]:
            nested = re.fullmatch(r"killsafe\[([\w,]+)\]", requirement)
            if nested:
                names |= _requirements_of(nested.group(1).split(","), table)
            else:
                names.add(re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower())
    return names


def test_the_readme_demo_command_installs_what_the_demo_uses() -> None:
    readme = (ROOT / "README.md").read_text()
    (extras,) = re.findall(
        r"pip install -c constraints\.txt -e '\.\[([\w,]+)\]' && killsafe demo", readme
    )
    names = _requirements_of(extras.split(","), _extras())
    # numpy: torch warns "Failed to initialize NumPy" without it; matplotlib: report.png.
    assert {"torch", "numpy", "fastapi", "uvicorn", "matplotlib"} <= names, names
    assert "torch==" in (ROOT / "constraints.txt").read_text()  # the pin stays


def test_the_torch_extra_brings_numpy() -> None:
    assert "numpy" in _requirements_of(["torch"], _extras())
