"""The ``resumable`` command line.

Exit codes: 0 success, 1 a failed check, 2 bad usage or input. Errors are one
line on stderr, never a traceback: every subcommand handler runs under the one
handler in ``main``, which turns ``ResumableError`` and ``OSError`` into a
message. Subcommands import what they need inside their handler, so
``resumable --help`` is fast and works without the optional dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resumable import __version__
from resumable.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    ResumableError,
    UnsupportedFormat,
)
from resumable.runfiles import RUN_FILE as RUN_FILE_NAME

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2

Handler = Callable[[argparse.Namespace], int]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of front ends owned by other modules are added
    only when ``command`` names them, so ``--help`` imports nothing optional."""
    parser = argparse.ArgumentParser(
        prog="resumable",
        description="Make long-running Python processes safe to interrupt and cheap to resume.",
    )
    parser.add_argument("--version", action="version", version=f"resumable {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)  # usage errors exit 2 inside argparse
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``resumable list DIR | head``): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED_CHECK
    except ResumableError as exc:
        return _fail(args, str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        return _fail(args, _describe_os_error(exc), EXIT_BAD_INPUT)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    sys.stderr.write(f"resumable {args.command}: error: {message}\n")
    return code


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


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


# --- resumable run ------------------------------------------------------------


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "run",
        help="run a command; restart it with RESUMABLE_RESUME=auto when it crashes",
        description=(
            "Run CMD in its own process group, pass SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 on "
            "to it, and start it again when it crashes (a non-zero exit that was not a "
            "requested stop, or a kill), with exponential backoff. Exits with the child's "
            "exit code (128+N for a death by signal N)."
        ),
        usage="resumable run [-h] [--max-restarts N] [--backoff SECONDS] "
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
        "(default: the value of --dir in CMD)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command to run")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from resumable.supervise import Supervisor, run_dir_from_command

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


# --- resumable demo -----------------------------------------------------------


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
    from resumable.demo import DemoConfig, run_demo

    config = DemoConfig() if args.steps is None else DemoConfig.for_steps(args.steps)
    if config.steps < 1:
        return _fail(args, f"--steps must be 1 or more, got {config.steps}", EXIT_BAD_INPUT)
    _check_directory_target(args.directory)
    serve = not args.no_serve and _server_available()
    return run_demo(args.directory, config, serve=serve, stream=sys.stdout)


def _server_available() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("fastapi", "uvicorn", "resumable.server")
    )


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
    missing: str,
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
    from resumable.store import CheckpointStore

    return CheckpointStore(store_dir)


def _checkpoint_dirs(store_dir: Path) -> list[Path]:
    """The committed checkpoint directories: hidden ones (``.tmp-*``) are never read."""
    if not store_dir.is_dir():
        return []
    return sorted(p for p in store_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _entries(store_dir: Path, *, verify: bool) -> list[_Entry]:
    """Every checkpoint of ``store_dir`` in step order; unreadable ones last, with the problem."""
    store = _open_store(store_dir)
    good: list[_Entry] = []
    bad: list[_Entry] = []
    for path in _checkpoint_dirs(store_dir):
        try:
            info = store.get(path)
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
    from resumable.runfiles import read_json

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
        store.get(path)  # a manifest that cannot be read is bad input: exit 2
        entries = [_Entry(path, None, problem=_verify_problem(store, path))]
    else:
        entries = _entries(_locate(path).store_dir, verify=True)
    bad = [e for e in entries if e.problem is not None]
    if args.json:
        _print_json(
            {
                "ok": not bad,
                "checked": len(entries),
                "checkpoints": [
                    {"path": str(e.path), "ok": e.problem is None, "problem": e.problem}
                    for e in entries
                ],
            }
        )
    else:
        for entry in entries:
            verdict = "ok" if entry.problem is None else f"CORRUPT: {entry.problem}"
            sys.stdout.write(f"{entry.path}: {verdict}\n")
    if not entries:
        sys.stderr.write(f"resumable verify: no checkpoints in {path}\n")
    if bad:
        sys.stderr.write(
            f"resumable verify: {len(bad)} of {len(entries)} checkpoint(s) failed: "
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
    location = _locate(args.directory)
    best = _best_spec(args, location)
    if args.keep_best is not None and best is None:
        raise ConfigError("--keep-best needs --metric M (the run names no best metric)")
    from resumable.store import CheckpointStore

    store = CheckpointStore(
        location.store_dir,
        keep_last=args.keep_last,
        # The best checkpoint is never pruned: keep at least one when a metric ranks them.
        keep_best=(args.keep_best if args.keep_best is not None else 1) if best else None,
        best=best,
    )
    try:
        explicit = [store.get(ref) for ref in args.delete]
        removed = list(store.prune(dry_run=args.dry_run))
        gone = {info.path for info in removed}
        for info in explicit:
            if info.path not in gone:
                if not args.dry_run:
                    store.delete(info.path, force=True)
                removed.append(info)
        kept = [e for e in _entries(location.store_dir, verify=False) if e.path not in gone]
    finally:
        store.close()
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        _print_json(
            {
                "dry_run": args.dry_run,
                "deleted": [_info_json(info) for info in removed],
                "kept": [e.to_json() for e in kept if e.path not in {i.path for i in removed}],
            }
        )
    else:
        for info in removed:
            sys.stdout.write(f"{verb} {info.path} (step {info.step})\n")
        sys.stdout.write(f"{verb} {len(removed)} checkpoint(s)\n")
    return EXIT_OK


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
