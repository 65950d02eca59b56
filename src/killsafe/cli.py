"""The ``killsafe`` command line.

Exit codes: 0 success, 1 a failed check, 2 bad usage or input. Errors are one
line on stderr, never a traceback: every subcommand handler runs under the one
handler in ``main``, which turns ``KillsafeError`` and ``OSError`` into a
message. Subcommands import what they need inside their handler, so
``killsafe --help`` is fast and works without the optional dependencies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from killsafe import __version__
from killsafe.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    KillsafeError,
    UnsupportedFormat,
)
from killsafe.runfiles import RUN_FILE as RUN_FILE_NAME

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit 2; subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of front ends owned by other modules are added
    only when ``command`` names them, so ``--help`` imports nothing optional."""
    parser: argparse.ArgumentParser = _Parser(
        prog="killsafe",
        description="Make long-running Python processes safe to interrupt and cheap to resume.",
    )
    parser.add_argument("--version", action="version", version=f"killsafe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(commands)
    _add_list(commands)
    _add_inspect(commands)
    _add_verify(commands)
    _add_prune(commands)
    _add_diff(commands)
    _add_front_end(
        commands,
        command,
        "report",
        "killsafe.report",
        help="the report of a run: outcome, sessions, metrics, checkpoints",
    )
    _add_front_end(
        commands,
        command,
        "preflight",
        "killsafe.preflight",
        help="go/no-go checks before a long run (disk, packages, data)",
    )
    _add_front_end(
        commands,
        command,
        "serve",
        "killsafe.server",
        help="the dashboard and HTTP API of a run directory, live or finished",
        missing="the dashboard needs FastAPI and uvicorn: pip install fastapi uvicorn",
    )
    _add_run(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)  # usage errors exit 2 inside argparse
    if extra:
        where = f"killsafe {args.command}" if args.command else "killsafe"
        parser.exit(
            EXIT_BAD_INPUT,
            f"{where}: error: unrecognized arguments: {' '.join(extra)}; see `{where} --help`\n",
        )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    _show_library_messages()
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``killsafe list DIR | head``): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED_CHECK
    except KillsafeError as exc:
        return _fail(args, str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        return _fail(args, _describe_os_error(exc), EXIT_BAD_INPUT)
    except ModuleNotFoundError as exc:  # an optional dependency this command needs
        return _fail(args, _missing_module(exc), EXIT_BAD_INPUT)


def _show_library_messages() -> None:
    """Show killsafe's log messages (a served URL, a resume, a skipped checkpoint)
    on stderr as plain lines, unless the embedding program configured logging."""
    import logging

    logger = logging.getLogger("killsafe")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    sys.stderr.write(f"killsafe {args.command}: error: {message}\n")
    return code


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _missing_module(exc: ModuleNotFoundError) -> str:
    name = exc.name or str(exc)
    if name.split(".")[0] == "killsafe":
        return f"{name} is missing from this installation of killsafe; reinstall it"
    return f"this command needs {name}, which is not installed: pip install {name}"


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    item = getattr(value, "item", None)
    if callable(item):  # numpy and torch scalars
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _existing_directory(path: Path, what: str) -> Path:
    """``path`` if it is a directory; otherwise a one-line error naming it."""
    if not path.exists():
        raise CheckpointNotFound(f"{path} does not exist; give {what}")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; give {what}")
    return path


# --- killsafe run ------------------------------------------------------------


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "run",
        help="run a command; restart it with KILLSAFE_RESUME=auto when it crashes",
        description=(
            "Run CMD in its own process group, pass SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 on "
            "to it, and start it again when it crashes (a non-zero exit that was not a "
            "requested stop, or a kill), with exponential backoff. Exits with the child's "
            "exit code (128+N for a death by signal N)."
        ),
        usage="killsafe run [-h] [--max-restarts N] [--backoff SECONDS] "
        "[--max-backoff SECONDS] [--dir DIR] -- CMD...",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="give up after N restarts (default 3)",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="wait before the first restart, doubled for each further one (default 1)",
    )
    p.add_argument(
        "--max-backoff",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait between restarts (default 60)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="the run directory whose run.json records the restarts "
        "(default: the value of --dir in CMD, or DIR of `killsafe demo DIR`)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command to run")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from killsafe.supervise import Supervisor, run_dir_from_command

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    supervisor = Supervisor(
        command,
        max_restarts=args.max_restarts,
        backoff=args.backoff,
        max_backoff=args.max_backoff,
        run_dir=args.dir if args.dir is not None else run_dir_from_command(command),
    )
    return supervisor.run()


# --- killsafe demo -----------------------------------------------------------


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "demo",
        help="train a small PyTorch network with checkpoints; run it again to resume",
        description=(
            "Train a small network on synthetic data generated inside the package, with "
            "checkpoints, live progress, the dashboard and a report at the end. Ctrl+C "
            "stops it gracefully; the same command continues where it stopped."
        ),
    )
    p.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=Path("runs/demo"),
        metavar="DIR",
        help="the run directory (default runs/demo)",
    )
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps")
    p.add_argument(
        "--no-serve", action="store_true", help="do not start the dashboard during the run"
    )
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        return _fail(
            args,
            "the demo needs PyTorch; install it with: pip install -c constraints.txt -e '.[torch]'",
            EXIT_BAD_INPUT,
        )
    from killsafe.demo import DemoConfig, run_demo

    config = DemoConfig() if args.steps is None else DemoConfig.for_steps(args.steps)
    if config.steps < 1:
        return _fail(args, f"--steps must be 1 or more, got {config.steps}", EXIT_BAD_INPUT)
    _check_directory_target(args.directory)
    serve = not args.no_serve and _server_available()
    if not args.no_serve and not serve:
        sys.stderr.write(
            "killsafe demo: running without the dashboard, which needs FastAPI and uvicorn: "
            "pip install -c constraints.txt -e '.[server]'\n"
        )
    return run_demo(args.directory, config, serve=serve, stream=sys.stdout)


def _server_available() -> bool:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def _check_directory_target(path: Path) -> None:
    """Refuse a path that exists but is not a directory (a run directory is created)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; give a run directory (it is created if missing)")


# --- front ends of other modules: report, preflight, serve ----------------------


def _add_front_end(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    selected: str | None,
    name: str,
    module_name: str,
    *,
    help: str,
    missing: str = "",
) -> None:
    """Mount ``module.add_cli_arguments`` / ``module.run_cli`` as subcommand ``name``."""
    p = commands.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
    if selected != name:
        return  # not asked for: do not import the module
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        message = missing or f"cannot import {module_name}: {exc}"
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(handler=lambda args: _fail(args, message, EXIT_BAD_INPUT))
        return
    module.add_cli_arguments(p)
    p.set_defaults(handler=module.run_cli)


# --- checkpoints: list, inspect, verify, prune, diff ----------------------------

MANIFEST_FILE = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
WHAT_DIR = "a run directory or a checkpoints directory"


@dataclass(frozen=True)
class _Location:
    """What a DIR argument points at."""

    store_dir: Path
    run_dir: Path | None


@dataclass
class _Entry:
    """One checkpoint directory as ``list``, ``verify`` and ``prune`` see it."""

    path: Path
    info: Any  # format.CheckpointInfo, or None when the manifest is unreadable
    problem: str | None = None
    marks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        info = self.info
        return {
            "path": str(self.path),
            "step": None if info is None else info.step,
            "name": None if info is None else info.name,
            "reason": None if info is None else info.reason,
            "created": None if info is None else info.created,
            "size": None if info is None else info.size,
            "metrics": {} if info is None else dict(info.metrics),
            "latest": "latest" in self.marks,
            "best": "best" in self.marks,
            "corrupt": self.problem is not None,
            "problem": self.problem,
        }


def _locate(path: Path) -> _Location:
    _existing_directory(path, WHAT_DIR)
    if (path / MANIFEST_FILE).exists():
        raise ConfigError(f"{path} is one checkpoint; give {WHAT_DIR} (or use inspect)")
    if (path / CHECKPOINTS_DIR).is_dir():
        return _Location(store_dir=path / CHECKPOINTS_DIR, run_dir=path)
    if (path / RUN_FILE_NAME).exists():
        return _Location(store_dir=path / CHECKPOINTS_DIR, run_dir=path)  # no checkpoint yet
    parent = path.parent
    run_dir = parent if (parent / RUN_FILE_NAME).exists() else None
    return _Location(store_dir=path, run_dir=run_dir)


def _open_store(store_dir: Path) -> Any:
    from killsafe.store import CheckpointStore

    return CheckpointStore(store_dir)


def _checkpoint_dirs(store_dir: Path) -> list[Path]:
    """The committed checkpoint directories (``step-*``); ``.tmp-*`` ones are never read."""
    if not store_dir.is_dir():
        return []
    return sorted(p for p in store_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _entries(store_dir: Path, *, verify: bool) -> list[_Entry]:
    """Every checkpoint of ``store_dir`` in step order; unreadable ones last, with the problem."""
    store = _open_store(store_dir)
    good: list[_Entry] = []
    bad: list[_Entry] = []
    for path in _checkpoint_dirs(store_dir):
        try:
            info = store.listed(path)
        except (CorruptCheckpoint, UnsupportedFormat, CheckpointNotFound) as exc:
            bad.append(_Entry(path, None, problem=str(exc)))
            continue
        entry = _Entry(path, info)
        if verify:
            entry.problem = _verify_problem(store, path)
        good.append(entry)
    good.sort(key=lambda e: (e.info.step, e.info.created))
    return good + bad


def _verify_problem(store: Any, path: Path) -> str | None:
    try:
        store.verify(path)
    except (CorruptCheckpoint, UnsupportedFormat) as exc:
        return str(exc)
    return None


def _best_spec(args: argparse.Namespace, location: _Location) -> tuple[str, str] | None:
    """``--metric``/``--mode``, else the run's own ``best`` from ``run.json``."""
    if args.metric is not None:
        return args.metric, args.mode
    if location.run_dir is None:
        return None
    from killsafe.runfiles import read_json

    run = read_json(location.run_dir / RUN_FILE_NAME) or {}
    best = (run.get("config") or {}).get("best") if isinstance(run, dict) else None
    if isinstance(best, list) and len(best) == 2:
        return str(best[0]), str(best[1])
    return None


def _mark(entries: list[_Entry], best: tuple[str, str] | None) -> None:
    usable = [e for e in entries if e.info is not None and e.problem is None]
    if usable:
        usable[-1].marks.append("latest")
    if best is not None:
        metric, mode = best
        scored = [e for e in usable if _number(e.info.metrics.get(metric)) is not None]
        if scored:
            pick = min if mode == "min" else max
            pick(scored, key=lambda e: float(e.info.metrics[metric])).marks.append("best")
    for entry in entries:
        if entry.problem is not None:
            entry.marks.append("corrupt")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_list(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "list",
        help="the checkpoints of a run, with latest, best and corrupt marked",
        description="List the checkpoints of DIR (a run directory or its checkpoints "
        "directory): step, name, reason, created, size, metrics and marks.",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help=WHAT_DIR)
    p.add_argument("--verify", action="store_true", help="also check every checksum")
    _add_best_flags(p)
    _add_data_flags(p)
    p.set_defaults(handler=_cmd_list)


def _add_best_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metric",
        default=None,
        metavar="M",
        help="the metric that ranks checkpoints (default: the run's own best metric)",
    )
    p.add_argument(
        "--mode", choices=("min", "max"), default="min", help="lower or higher is better"
    )


def _cmd_list(args: argparse.Namespace) -> int:
    location = _locate(args.directory)
    entries = _entries(location.store_dir, verify=args.verify)
    _mark(entries, _best_spec(args, location))
    if args.json:
        _print_json(
            {
                "directory": str(location.store_dir),
                "checkpoints": [e.to_json() for e in entries],
            }
        )
    elif not entries:
        sys.stdout.write(f"no checkpoints in {location.store_dir}\n")
    else:
        headers = ["step", "name", "reason", "created", "size", "metrics", "marks"]
        _print_table(headers, [_list_row(e) for e in entries])
        for entry in entries:
            if entry.problem is not None:
                sys.stdout.write(f"corrupt: {entry.path}: {entry.problem}\n")
    return EXIT_FAILED_CHECK if args.verify and any(e.problem for e in entries) else EXIT_OK


def _list_row(entry: _Entry) -> list[str]:
    marks = ",".join(entry.marks)
    info = entry.info
    if info is None:
        return ["?", entry.path.name, "", "", "", "", marks]
    return [
        str(info.step),
        info.name or "",
        info.reason or "",
        _format_time(info.created),
        _format_size(info.size),
        _format_metrics(info.metrics),
        marks,
    ]


def _format_time(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _format_size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal, aligned plain columns otherwise (greppable, no box)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")


def _add_verify(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "verify",
        help="check every checksum; exit 1 naming each bad file",
        description="Check the sizes and checksums of every file of every checkpoint in "
        "DIR, or of the one checkpoint CKPT. Exit 1 when any fails, naming each.",
    )
    p.add_argument("path", type=Path, metavar="DIR|CKPT", help=f"{WHAT_DIR}, or a checkpoint")
    _add_data_flags(p)
    p.set_defaults(handler=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    path = _existing_directory(args.path, f"{WHAT_DIR}, or a checkpoint")
    if (path / MANIFEST_FILE).exists():
        store = _open_store(path.parent)
        info = store.get(path)  # a manifest that cannot be read is bad input: exit 2
        entries = [_Entry(path, info, problem=_verify_problem(store, path))]
    else:
        entries = _entries(_locate(path).store_dir, verify=True)
    bad = [e for e in entries if e.problem is not None]
    if args.json:
        _print_json(
            {
                "ok": not bad,
                "checked": len(entries),
                "checkpoints": [
                    {
                        "path": str(e.path),
                        "ok": e.problem is None,
                        "problem": e.problem,
                        "manifest_checksum": e.info is not None and e.info.manifest_checksum,
                    }
                    for e in entries
                ],
            }
        )
    else:
        for entry in entries:
            verdict = "ok" if entry.problem is None else f"CORRUPT: {entry.problem}"
            if entry.problem is None and not entry.info.manifest_checksum:
                verdict += " (no manifest checksum: written by an older version)"
            sys.stdout.write(f"{entry.path}: {verdict}\n")
    if not entries:
        sys.stderr.write(f"killsafe verify: no checkpoints in {path}\n")
    if bad:
        sys.stderr.write(
            f"killsafe verify: {len(bad)} of {len(entries)} checkpoint(s) failed: "
            + ", ".join(str(e.path) for e in bad)
            + "\n"
        )
        return EXIT_FAILED_CHECK
    return EXIT_OK


def _add_prune(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "prune",
        help="delete old checkpoints, keeping the newest, the best and named ones",
        description="Delete the checkpoints of DIR that retention does not keep. The newest "
        "verified checkpoint, the best ones and named ones are never deleted unless "
        "named with --delete.",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help=WHAT_DIR)
    p.add_argument("--keep-last", type=int, required=True, metavar="N", help="keep the newest N")
    p.add_argument("--keep-best", type=int, default=None, metavar="K", help="keep the best K")
    _add_best_flags(p)
    p.add_argument(
        "--delete",
        action="append",
        default=[],
        metavar="REF",
        help="also delete this checkpoint (a step, a name or a path), whatever it is",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    _add_data_flags(p)
    p.set_defaults(handler=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> int:
    for flag, value in (("--keep-last", args.keep_last), ("--keep-best", args.keep_best)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be 1 or more, got {value}")
    location = _locate(args.directory)
    best = _best_spec(args, location)
    if args.keep_best is not None and best is None:
        raise ConfigError("--keep-best needs --metric M (the run names no best metric)")
    from killsafe.store import CheckpointStore

    store = CheckpointStore(
        location.store_dir,
        keep_last=args.keep_last,
        # The best checkpoint is never pruned: keep at least one when a metric ranks them.
        keep_best=(args.keep_best if args.keep_best is not None else 1) if best else None,
        best=best,
    )
    try:
        explicit = [store.get(_reference(ref)) for ref in args.delete]
        newest_sound = store.latest(verify=True)
        removed = [
            info
            for info in store.prune(dry_run=True)
            if newest_sound is None or info.path != newest_sound.path
        ]
        removed += [info for info in explicit if info.path not in {i.path for i in removed}]
        if not args.dry_run:
            for info in removed:
                store.delete(info, force=True)
    finally:
        store.close()
    gone = {info.path for info in removed}
    kept = [e for e in _entries(location.store_dir, verify=False) if e.path not in gone]
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        _print_json(
            {
                "dry_run": args.dry_run,
                "deleted": [_info_json(info) for info in removed],
                "kept": [e.to_json() for e in kept],
            }
        )
    else:
        for info in removed:
            sys.stdout.write(f"{verb} {info.path} (step {info.step})\n")
        sys.stdout.write(f"{verb} {len(removed)} checkpoint(s)\n")
    return EXIT_OK


def _reference(text: str) -> str | int:
    """A checkpoint reference from the command line: a step number, a name or a path."""
    return int(text) if text.isdigit() else text


def _info_json(info: Any) -> dict[str, Any]:
    return {
        "path": str(info.path),
        "step": info.step,
        "name": info.name,
        "reason": info.reason,
        "created": info.created,
        "size": info.size,
        "metrics": dict(info.metrics),
    }


# --- the state tree of a manifest, without loading tensors ------------------------

_TORCH_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8,
    "complex32": 4, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4,
    "uint16": 2, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}  # fmt: skip
_CONTAINERS = ("dict", "list", "tuple", "set", "frozenset")


@dataclass(frozen=True)
class _Leaf:
    """One node of a saved state tree, as the manifest describes it."""

    parts: tuple[str | int, ...]  # dict keys and list indices from the root
    node: dict[str, Any]

    @property
    def path(self) -> str:
        text = ""
        for part in self.parts:
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += f".{part}" if text else part
        return text or "(root)"

    @property
    def kind(self) -> str:
        return str(self.node.get("type"))

    @property
    def is_data(self) -> bool:
        """A tensor, an array or bytes stored in the tensor file."""
        return self.kind in ("tensor", "ndarray") or "entry" in self.node

    def describe(self) -> dict[str, Any]:
        node = self.node
        row: dict[str, Any] = {"path": self.path, "type": self.kind}
        if self.kind in _CONTAINERS:
            row["length"] = len(node.get("entries") or node.get("items") or [])
        if "dtype" in node:
            row["dtype"] = node["dtype"]
        if "shape" in node:
            row["shape"] = list(node["shape"])
        size = _node_nbytes(node)
        if size is not None:
            row["size"] = size
        if "entry" in node:
            row["entry"] = node["entry"]
        value = _plain_value(node)
        if value is not _NO_VALUE:
            row["value"] = value
        return row


_NO_VALUE = object()


def _walk(node: Any, parts: tuple[str | int, ...] = ()) -> list[_Leaf]:
    """Every node of a manifest tree, parents before children."""
    if not isinstance(node, dict) or "type" not in node:
        raise CorruptCheckpoint(f"the state tree is malformed at {_Leaf(parts, {}).path}")
    found = [_Leaf(parts, node)]
    kind = node["type"]
    if kind == "dict" and isinstance(node.get("entries"), dict):
        for key, child in node["entries"].items():
            found += _walk(child, (*parts, key))
    elif kind == "dict":
        for key_node, child in node.get("items") or []:
            key = _plain_value(key_node)
            key = key if isinstance(key, (int, str)) and not isinstance(key, bool) else str(key)
            found += _walk(child, (*parts, key))
    elif kind in _CONTAINERS:
        for index, child in enumerate(node.get("items") or []):
            found += _walk(child, (*parts, index))
    return found


def _plain_value(node: dict[str, Any]) -> Any:
    """The value of a scalar node (int, float, str, bool, None, small bytes), else _NO_VALUE.

    ``node`` belongs to a manifest checked by ``format.read_manifest``.
    """
    import base64

    from killsafe.format import float_value, int_value

    kind = node.get("type")
    if kind == "none":
        return None
    if kind in ("bool", "str"):
        return node.get("value")
    if kind == "int":
        return _shown_int(int_value(node))
    if kind == "float":
        return float_value(node)
    if kind == "bytes" and "base64" in node:
        return f"<{len(base64.b64decode(node['base64']))} bytes>"
    if kind == "npscalar":
        return f"<numpy {node.get('dtype')}>"
    return _NO_VALUE


_MAX_DECIMAL_BITS = 13_000  # about 3,900 digits: below Python's int-to-str limit


def _shown_int(value: int) -> int | str:
    """``value``, or its hex text (``0x...``) when too long for decimal (and for JSON)."""
    if value.bit_length() <= _MAX_DECIMAL_BITS:
        return value
    return f"-0x{-value:x}" if value < 0 else f"0x{value:x}"


def _node_nbytes(node: dict[str, Any]) -> int | None:
    kind = node.get("type")
    shape = node.get("shape")
    if kind == "bytes":
        return int(node["size"]) if "size" in node else None
    if not isinstance(shape, list):
        return None
    count = 1
    for n in shape:
        count *= int(n)
    dtype = str(node.get("dtype"))
    if kind == "tensor":
        itemsize = _TORCH_ITEMSIZE.get(dtype)
    else:  # numpy dtype strings: "<f4", "|b1", "<U8" (4 bytes a character)
        digits = "".join(c for c in dtype.split("[")[0] if c.isdigit())
        itemsize = int(digits) * (4 if "U" in dtype else 1) if digits else None
    return None if itemsize is None else count * itemsize


def _read_checkpoint_manifest(path: Path) -> dict[str, Any]:
    """The validated manifest of checkpoint directory ``path`` (bad input otherwise)."""
    from killsafe.format import read_manifest

    _existing_directory(path, "a checkpoint directory (such as DIR/checkpoints/step-000100)")
    if not (path / MANIFEST_FILE).exists() and (
        (path / CHECKPOINTS_DIR).is_dir() or any(p.name.startswith("step-") for p in path.iterdir())
    ):
        raise ConfigError(
            f"{path} holds checkpoints; give one of them (`killsafe list {path}` shows them)"
        )
    return read_manifest(path)


def _add_inspect(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "inspect",
        help="a checkpoint's metadata and state tree, without loading tensors",
        description="Show the metadata of checkpoint CKPT and its state tree: every "
        "value's path and type, and the dtype, shape and size of tensors and arrays. "
        "Reads the manifest only.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint directory")
    _add_data_flags(p)
    p.set_defaults(handler=_cmd_inspect)


def _checkpoint_summary(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    files = {
        name: {"size": info["size"], "xxh3": info["xxh3"]}
        for name, info in manifest["files"].items()
    }
    return {
        "path": str(path),
        "step": manifest["step"],
        "name": manifest["name"],
        "reason": manifest["reason"],
        "created": manifest["created"],
        "format_version": manifest["format_version"],
        "size": sum(info["size"] for info in files.values()),
        "files": files,
        "metrics": manifest["metrics"],
        "metadata": manifest["metadata"],
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    manifest = _read_checkpoint_manifest(args.checkpoint)
    summary = _checkpoint_summary(args.checkpoint, manifest)
    nodes = [leaf.describe() for leaf in _walk(manifest["tree"])]
    if args.json:
        _print_json({**summary, "tree": nodes})
        return EXIT_OK
    out = sys.stdout
    for key in ("path", "step", "name", "reason"):
        out.write(f"{key + ':':<10}{'' if summary[key] is None else summary[key]}\n")
    out.write(f"{'created:':<10}{_format_time(summary['created'])}\n")
    out.write(f"{'format:':<10}{summary['format_version']}\n")
    files = ", ".join(f"{n} {_format_size(f['size'])}" for n, f in summary["files"].items())
    out.write(f"{'size:':<10}{_format_size(summary['size'])}{f' ({files})' if files else ''}\n")
    out.write(f"{'metrics:':<10}{_format_metrics(summary['metrics'])}\n")
    if summary["metadata"]:
        metadata = json.dumps(summary["metadata"], default=_json_default)
        out.write(f"{'metadata:':<10}{metadata}\n")
    out.write("\n")
    _print_table(["path", "type", "dtype", "shape", "size", "value"], _tree_rows(nodes))
    return EXIT_OK


def _tree_rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for node in nodes:
        kind = node["type"]
        if "length" in node:
            kind += f" ({node['length']})"
        value = ""
        if "value" in node:
            value = repr(node["value"]) if node["type"] == "str" else str(node["value"])
            value = value if len(value) <= 40 else value[:37] + "..."
        rows.append(
            [
                node["path"],
                kind,
                str(node.get("dtype", "")),
                str(node["shape"]) if "shape" in node else "",
                _format_size(node["size"]) if "size" in node else "",
                value,
            ]
        )
    return rows


# --- diff -----------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 20  # compare tensors a million elements at a time


def _add_diff(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "diff",
        help="two checkpoints side by side: metadata, metrics, and what changed",
        description="Compare checkpoints A and B: metadata and metrics, the paths only in "
        "one, and for every value in both whether it changed (for tensors and arrays, the "
        "largest absolute difference). Tensors are loaded one pair at a time, memory-mapped.",
    )
    p.add_argument("a", type=Path, metavar="A", help="a checkpoint directory")
    p.add_argument("b", type=Path, metavar="B", help="another checkpoint directory")
    _add_data_flags(p)
    p.set_defaults(handler=_cmd_diff)


def _cmd_diff(args: argparse.Namespace) -> int:
    manifests = _read_checkpoint_manifest(args.a), _read_checkpoint_manifest(args.b)
    summaries = [
        _checkpoint_summary(p, m) for p, m in zip((args.a, args.b), manifests, strict=True)
    ]
    result: dict[str, Any] = {
        "a": summaries[0],
        "b": summaries[1],
        "fields": _changed_fields(summaries),
        "metrics": _compare_mapping(manifests[0]["metrics"], manifests[1]["metrics"]),
        "metadata": _compare_mapping(manifests[0]["metadata"], manifests[1]["metadata"]),
    }
    result.update(_compare_trees(args.a, args.b, *manifests))
    if args.json:
        _print_json(result)
    else:
        _write_diff_text(result)
    return EXIT_OK


def _changed_fields(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    a, b = summaries
    keys = ("step", "name", "reason", "created", "format_version", "size")
    return {k: {"a": a[k], "b": b[k]} for k in keys if a[k] != b[k]}


def _compare_mapping(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every key of either side: both values, and the change of numbers."""
    rows: dict[str, dict[str, Any]] = {}
    for key in list(a) + [k for k in b if k not in a]:
        row: dict[str, Any] = {"a": a.get(key), "b": b.get(key)}
        if key not in a or key not in b:
            row["only_in"] = "a" if key in a else "b"
        elif _number(a[key]) is not None and _number(b[key]) is not None:
            row["delta"] = float(b[key]) - float(a[key])
        row["changed"] = a.get(key) != b.get(key) or "only_in" in row
        rows[key] = row
    return rows


def _compare_trees(
    path_a: Path, path_b: Path, manifest_a: dict[str, Any], manifest_b: dict[str, Any]
) -> dict[str, Any]:
    leaves_a = {leaf.path: leaf for leaf in _walk(manifest_a["tree"])}
    leaves_b = {leaf.path: leaf for leaf in _walk(manifest_b["tree"])}
    values = []
    for path, leaf_a in leaves_a.items():
        leaf_b = leaves_b.get(path)
        if leaf_b is None or (leaf_a.kind in _CONTAINERS and leaf_b.kind == leaf_a.kind):
            continue
        values.append(_compare_leaf(path_a, path_b, manifest_a, manifest_b, leaf_a, leaf_b))
    return {
        "only_in_a": [p for p in leaves_a if p not in leaves_b],
        "only_in_b": [p for p in leaves_b if p not in leaves_a],
        "values": values,
    }


def _compare_leaf(
    path_a: Path,
    path_b: Path,
    manifest_a: dict[str, Any],
    manifest_b: dict[str, Any],
    a: _Leaf,
    b: _Leaf,
) -> dict[str, Any]:
    row: dict[str, Any] = {"path": a.path, "type": a.kind}
    described_a, described_b = a.describe(), b.describe()
    for key in ("dtype", "shape"):
        if key in described_a or key in described_b:
            row[key] = described_a.get(key)
            if described_a.get(key) != described_b.get(key):
                row[f"{key}_b"] = described_b.get(key)
    if a.kind != b.kind:
        row.update(changed=True, type_b=b.kind)
    elif not a.is_data and not b.is_data:
        row["changed"] = a.node != b.node
        if row["changed"] and "value" in described_a:
            row.update(a=described_a["value"], b=described_b.get("value"))
    elif "dtype_b" in row or "shape_b" in row:
        row["changed"] = True
    else:
        row.update(_compare_data(path_a, path_b, manifest_a, manifest_b, a, b))
    return row


def _compare_data(
    path_a: Path,
    path_b: Path,
    manifest_a: dict[str, Any],
    manifest_b: dict[str, Any],
    a: _Leaf,
    b: _Leaf,
) -> dict[str, Any]:
    """Load one pair (memory-mapped, checksums verified) and measure the difference."""
    value_a = _read_leaf(path_a, manifest_a, a)
    value_b = _read_leaf(path_b, manifest_b, b)
    if isinstance(value_a, (bytes, bytearray)):
        return {"changed": value_a != value_b}
    changed, largest = _difference(value_a, value_b)
    return {"changed": changed, "max_abs_diff": largest}


def _read_leaf(path: Path, manifest: dict[str, Any], leaf: _Leaf) -> Any:
    """The value of one tensor, array or bytes node, and nothing else of the checkpoint.

    The node is decoded as a tree of its own (so any key works, dots and int
    keys included, unlike a dotted ``subtree``); memory-mapped, only its bytes
    are touched and their checksum verified.
    """
    from killsafe.format import read_tree

    return read_tree(path, {**manifest, "tree": leaf.node}, mmap=True)


def _difference(a: Any, b: Any) -> tuple[bool, float | None]:
    """(changed, largest |a - b|) of two same-shape tensors or arrays, chunk by chunk.

    NaN against NaN is no change; NaN against a number an infinite difference.
    Arrays that are not numbers (strings, dates) give ``(changed, None)``.
    """
    if type(a).__module__.startswith("torch"):
        return _torch_difference(a, b)
    return _numpy_difference(a, b)


def _torch_difference(a: Any, b: Any) -> tuple[bool, float | None]:
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    changed, largest = False, 0.0
    for start in range(0, flat_a.numel(), _CHUNK_ELEMENTS):
        x = flat_a[start : start + _CHUNK_ELEMENTS]
        y = flat_b[start : start + _CHUNK_ELEMENTS]
        if not x.is_complex():
            x, y = x.double(), y.double()
        same = (x == y) | (x.isnan() & y.isnan())
        if bool(same.all()):
            continue
        changed = True
        difference = (x - y).abs()[~same].nan_to_num(nan=math.inf, posinf=math.inf)
        largest = max(largest, float(difference.max()))
    return changed, largest


def _numpy_difference(a: Any, b: Any) -> tuple[bool, float | None]:
    import numpy as np

    if a.dtype.kind not in "biufc":
        return not np.array_equal(a, b), None
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    changed, largest = False, 0.0
    wide = np.complex128 if a.dtype.kind == "c" else np.float64
    for start in range(0, flat_a.size, _CHUNK_ELEMENTS):
        x = flat_a[start : start + _CHUNK_ELEMENTS].astype(wide)
        y = flat_b[start : start + _CHUNK_ELEMENTS].astype(wide)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        if same.all():
            continue
        changed = True
        difference = np.nan_to_num(np.abs(x - y)[~same], nan=math.inf)
        largest = max(largest, float(difference.max()))
    return changed, largest


def _write_diff_text(result: dict[str, Any]) -> None:
    out = sys.stdout
    for side in ("a", "b"):
        info = result[side]
        name = f", name {info['name']}" if info["name"] else ""
        out.write(f"{side.upper()}: {info['path']} (step {info['step']}{name})\n")
    if result["fields"]:
        out.write("\nfields:\n")
        for key, row in result["fields"].items():
            a, b = row["a"], row["b"]
            if key == "created":
                a, b = _format_time(a), _format_time(b)
            out.write(f"  {key}: {a} -> {b}\n")
    for section in ("metrics", "metadata"):
        rows = {k: r for k, r in result[section].items() if r["changed"]}
        if rows:
            out.write(f"\n{section}:\n")
            for key, row in rows.items():
                out.write(f"  {key}: {_change_text(row)}\n")
    out.write("\nstate:\n")
    for side in ("a", "b"):
        for path in result[f"only_in_{side}"]:
            out.write(f"  only in {side.upper()}: {path}\n")
    table = []
    for row in result["values"]:
        table.append([row["path"], row["type"], _value_change_text(row)])
    if table:
        _print_table(["path", "type", "change"], table)
    changed = sum(1 for row in result["values"] if row.get("changed"))
    out.write(
        f"\n{changed} of {len(result['values'])} values changed, "
        f"{len(result['only_in_a'])} only in A, {len(result['only_in_b'])} only in B\n"
    )


def _change_text(row: dict[str, Any]) -> str:
    if "only_in" in row:
        side = row["only_in"]
        return f"only in {side.upper()} ({row[side]!r})"
    text = f"{_short(row['a'])} -> {_short(row['b'])}"
    if "delta" in row:
        text += f" ({row['delta']:+.4g})"
    return text


def _value_change_text(row: dict[str, Any]) -> str:
    if row.get("changed") is None:
        return row.get("note", "not compared")
    if "type_b" in row:
        return f"type {row['type']} -> {row['type_b']}"
    parts = []
    for key in ("dtype", "shape"):
        if f"{key}_b" in row:
            parts.append(f"{key} {row[key]} -> {row[f'{key}_b']}")
    if parts:
        return "; ".join(parts)
    if not row["changed"]:
        return "same"
    if "max_abs_diff" in row and row["max_abs_diff"] is not None:
        return f"changed, max abs diff {row['max_abs_diff']:.6g}"
    if "a" in row:
        return f"{_short(row['a'])} -> {_short(row['b'])}"
    return "changed"


def _short(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
