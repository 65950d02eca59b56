"""The command line as a whole: help, usage errors, exit codes, no heavy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error, cli

from killsafe.cli import build_parser


def mounted_commands() -> list[str]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return list(commands.choices)  # type: ignore[arg-type]


def test_help_lists_every_command() -> None:
    out = cli("--help")
    assert out.returncode == 0
    for command in mounted_commands():
        assert command in out.stdout
    assert "run" in mounted_commands()


def test_help_imports_no_optional_dependency() -> None:
    code = (
        "import sys\n"
        "from killsafe.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'numpy', 'optuna', 'fastapi', 'uvicorn', 'matplotlib')\n"
        "print('HEAVY=' + ','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


@pytest.mark.parametrize("command", ["run", "list", "verify", "prune"])
def test_every_command_has_its_own_help(command: str) -> None:
    if command not in mounted_commands():
        pytest.skip(f"{command} is not mounted in this tree")
    out = cli(command, "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: killsafe " + command)


def test_an_unknown_command_exits_2_with_one_line() -> None:
    out = cli("frobnicate")
    assert_one_line_error(out, 2, "invalid choice: 'frobnicate'", "killsafe --help")


def test_an_unknown_flag_exits_2_with_one_line() -> None:
    out = cli("list", ".", "--no-such-flag-at-all")
    assert_one_line_error(out, 2, "killsafe list: error: unrecognized arguments")
    out = cli("run", "--max-restarts", "x", "--", "true")
    assert_one_line_error(out, 2, "invalid int value: 'x'", "killsafe run --help")


def test_no_command_prints_help_and_exits_2() -> None:
    out = cli()
    assert out.returncode == 2
    assert "COMMAND" in out.stderr


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("killsafe ")
