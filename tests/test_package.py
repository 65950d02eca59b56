"""The package's public surface and layering."""

from __future__ import annotations

import subprocess
import sys

import killsafe


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
