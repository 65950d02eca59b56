"""The checkpoints of a run directory: ``list``, ``verify`` and ``prune``.

DIR is a run directory or its checkpoints directory; the run's own ``best``
metric (``run.json``, read through ``RunReader``) marks and keeps the best.
When ``run.json`` names a mirror, ``list`` shows both tiers: each checkpoint
is ``local``, ``mirrored`` or ``both`` (matched by step and name).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from killsafe import storage
from killsafe.cli.common import (
    EXIT_FAILED_CHECK,
    EXIT_OK,
    MANIFEST_FILE,
    Commands,
    add_json_flag,
    existing_directory,
    format_metrics,
    format_size,
    format_time,
    number,
    print_json,
    print_table,
)
from killsafe.cli.locations import Place, path_or_url, split_url
from killsafe.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    KillsafeError,
    UnsupportedFormat,
)
from killsafe.rundir import CHECKPOINTS_DIR, RUN_FILE, RunReader

WHAT_DIR = "a run directory or a checkpoints directory"


@dataclass(frozen=True)
class _Location:
    """What a DIR argument points at."""

    store_dir: Place
    run_dir: Path | None


@dataclass
class _Entry:
    """One checkpoint directory as ``list``, ``verify`` and ``prune`` see it."""

    path: Path
    info: Any  # format.CheckpointInfo, or None when the manifest is unreadable
    problem: str | None = None
    marks: list[str] = field(default_factory=list)
    url: str | None = None  # on an object store
    tier: str | None = None  # "local", "mirrored" or "both" when the run has a mirror

    @property
    def location(self) -> str:
        return self.url or str(self.path)

    def to_json(self) -> dict[str, Any]:
        info = self.info
        return {
            "path": self.location,
            "step": None if info is None else info.step,
            "name": None if info is None else info.name,
            "reason": None if info is None else info.reason,
            "created": None if info is None else info.created,
            "size": None if info is None else info.size,
            "added": None if info is None else _added(info),
            "metrics": {} if info is None else dict(info.metrics),
            "world_size": None if info is None else info.world_size,
            "latest": "latest" in self.marks,
            "best": "best" in self.marks,
            "corrupt": self.problem is not None,
            "problem": self.problem,
            "tier": self.tier,
        }


def _locate(path: Place) -> _Location:
    if isinstance(path, str):
        return _Location(store_dir=path, run_dir=None)
    existing_directory(path, WHAT_DIR)
    if (path / MANIFEST_FILE).exists():
        raise ConfigError(f"{path} is one checkpoint; give {WHAT_DIR} (or use inspect)")
    if (path / CHECKPOINTS_DIR).is_dir():
        return _Location(store_dir=path / CHECKPOINTS_DIR, run_dir=path)
    if (path / RUN_FILE).exists():
        return _Location(store_dir=path / CHECKPOINTS_DIR, run_dir=path)  # no checkpoint yet
    parent = path.parent
    run_dir = parent if (parent / RUN_FILE).exists() else None
    return _Location(store_dir=path, run_dir=run_dir)


def _open_store(store_dir: Place) -> Any:
    from killsafe.store import CheckpointStore

    return CheckpointStore(store_dir)


def _checkpoint_dirs(store_dir: Place) -> list[Path]:
    """The committed checkpoint directories (``step-*``); ``.tmp-*`` ones are never read.

    On an object store: the keys of the checkpoints whose manifest is there.
    """
    if isinstance(store_dir, str):
        names = {i.key.split("/")[0] for i in storage.open(store_dir).list("step-")}
        return sorted(Path(name) for name in names)
    if not store_dir.is_dir():
        return []
    return sorted(p for p in store_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _entries(store_dir: Place, *, verify: bool) -> list[_Entry]:
    """Every checkpoint of ``store_dir`` in step order; unreadable ones last, with the problem."""
    store = _open_store(store_dir)
    good: list[_Entry] = []
    bad: list[_Entry] = []
    for path in _checkpoint_dirs(store_dir):
        try:
            info = store.listed(path)
        except (CorruptCheckpoint, UnsupportedFormat, CheckpointNotFound) as exc:
            url = f"{store.location}{path}" if isinstance(store_dir, str) else None
            if not (url and isinstance(exc, CheckpointNotFound)):  # data of an attempt only
                bad.append(_Entry(path, None, problem=str(exc), url=url))
            continue
        entry = _Entry(path, info, url=info.url)
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
    return RunReader(location.run_dir).best()


def _mark(entries: list[_Entry], best: tuple[str, str] | None) -> None:
    usable = [e for e in entries if e.info is not None and e.problem is None]
    if usable:
        usable[-1].marks.append("latest")
    if best is not None:
        metric, mode = best
        scored = [e for e in usable if number(e.info.metrics.get(metric)) is not None]
        if scored:
            pick = min if mode == "min" else max
            pick(scored, key=lambda e: float(e.info.metrics[metric])).marks.append("best")
    for entry in entries:
        if entry.problem is not None:
            entry.marks.append("corrupt")


def add_list(commands: Commands) -> None:
    p = commands.add_parser(
        "list",
        help="the checkpoints of a run, with latest, best and corrupt marked",
        description="List the checkpoints of DIR (a run directory or its checkpoints "
        "directory): step, name, reason, created, size, metrics and marks.",
    )
    p.add_argument("directory", type=path_or_url, metavar="DIR", help=WHAT_DIR)
    p.add_argument("--verify", action="store_true", help="also check every checksum")
    _add_best_flags(p)
    add_json_flag(p)
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
    mirror = _run_mirror(location.run_dir)
    if mirror is not None:
        entries = _with_mirror(entries, mirror, verify=args.verify)
    _mark(entries, _best_spec(args, location))
    tiered = any(e.tier is not None for e in entries)
    if args.json:
        print_json(
            {
                "directory": str(location.store_dir),
                "mirror": None if mirror is None else str(mirror),
                "checkpoints": [e.to_json() for e in entries],
            }
        )
    elif not entries:
        sys.stdout.write(f"no checkpoints in {location.store_dir}\n")
    else:
        headers = ["step", "name", "reason", "created", "size", "added", "metrics", "marks"]
        rows = [_list_row(e) for e in entries]
        if tiered:
            headers.insert(-1, "tier")
            for row, entry in zip(rows, entries, strict=True):
                row.insert(-1, entry.tier or "")
        print_table(headers, rows)
        for entry in entries:
            if entry.problem is not None:
                sys.stdout.write(f"corrupt: {entry.location}: {entry.problem}\n")
    return EXIT_FAILED_CHECK if args.verify and any(e.problem for e in entries) else EXIT_OK


def _run_mirror(run_dir: Path | None) -> Place | None:
    """The mirror ``run.json`` names, or ``None`` (also when ``run.json`` cannot be
    read: the local checkpoints are listed all the same)."""
    mirror = RunReader(run_dir).mirror() if run_dir is not None else None
    try:
        return path_or_url(mirror) if mirror is not None else None
    except argparse.ArgumentTypeError as exc:  # a hand-edited run.json: no mirror to read
        sys.stderr.write(f"killsafe list: ignoring the mirror run.json names: {exc}\n")
        return None


def _with_mirror(local: list[_Entry], mirror: Place, *, verify: bool) -> list[_Entry]:
    """The local entries and the mirror's, one row per checkpoint with its tier.

    A local and a mirrored checkpoint with the same step and name are one
    checkpoint (``both``, shown at its local path) unless either copy is
    unreadable or failed ``--verify``: then each copy keeps its own row. A
    mirror that cannot be read is said in one line on stderr; the local
    entries are listed without tiers.
    """
    try:
        remote = _entries(mirror, verify=verify)
    except (KillsafeError, OSError) as exc:
        sys.stderr.write(
            f"killsafe list: the mirror {mirror} could not be read ({exc}); "
            "listing the local checkpoints only\n"
        )
        return local
    mirrored = {key for key in map(_identity, remote) if key is not None}
    matched = set()
    for entry in local:
        key = _identity(entry)
        entry.tier = "both" if key in mirrored else "local"
        if key in mirrored:
            matched.add(key)
    only_mirrored = [e for e in remote if _identity(e) is None or _identity(e) not in matched]
    for entry in only_mirrored:
        entry.tier = "mirrored"
    merged = local + only_mirrored
    good = sorted((e for e in merged if e.info is not None), key=_order)
    return good + [e for e in merged if e.info is None]


def _identity(entry: _Entry) -> tuple[int, str | None] | None:
    """What matches a local checkpoint with its mirrored copy; ``None`` for a bad copy."""
    if entry.info is None or entry.problem is not None:
        return None
    return entry.info.step, entry.info.name


def _order(entry: _Entry) -> tuple[int, float, int]:
    return entry.info.step, entry.info.created, 0 if entry.tier != "mirrored" else 1


def _list_row(entry: _Entry) -> list[str]:
    marks = ",".join(entry.marks)
    info = entry.info
    if info is None:
        return ["?", entry.path.name, "", "", "", "", "", marks]
    return [
        str(info.step),
        info.name or "",
        info.reason or "",
        format_time(info.created),
        format_size(info.size),
        format_size(_added(info)),
        format_metrics(info.metrics),
        marks,
    ]


def _added(info: Any) -> int:
    """Bytes the save of ``info`` wrote: all of it, unless incremental (shared pieces)."""
    return int(info.size if info.added is None else info.added)


def add_verify(commands: Commands) -> None:
    p = commands.add_parser(
        "verify",
        help="check every checksum; exit 1 naming each bad file",
        description="Check the sizes and checksums of every file of every checkpoint in "
        "DIR, or of the one checkpoint CKPT. Exit 1 when any fails, naming each.",
    )
    p.add_argument(
        "path", type=path_or_url, metavar="DIR|CKPT", help=f"{WHAT_DIR}, or a checkpoint"
    )
    add_json_flag(p)
    p.set_defaults(handler=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    path = args.path
    if not isinstance(path, str):
        existing_directory(path, f"{WHAT_DIR}, or a checkpoint")
    entries = _verified_entries(path)
    bad = [e for e in entries if e.problem is not None]
    if args.json:
        print_json({"ok": not bad, "checked": len(entries), "checkpoints": _verdicts(entries)})
    else:
        _write_verdicts(entries)
    if not entries:
        sys.stderr.write(f"killsafe verify: no checkpoints in {path}\n")
    if bad:
        sys.stderr.write(
            f"killsafe verify: {len(bad)} of {len(entries)} checkpoint(s) failed: "
            + ", ".join(e.location for e in bad)
            + "\n"
        )
        return EXIT_FAILED_CHECK
    return EXIT_OK


def _verified_entries(path: Place) -> list[_Entry]:
    """The one checkpoint ``path`` is, or every checkpoint under it, each verified."""
    if isinstance(path, str):
        if path.rpartition("/")[2].startswith("step-"):
            parent, name = split_url(path)
            store = _open_store(parent)
            info = store.get(name)
            return [_Entry(info.path, info, _verify_problem(store, info.path), url=info.url)]
        return _entries(path, verify=True)
    if (path / MANIFEST_FILE).exists():
        store = _open_store(path.parent)
        info = store.get(path)  # a manifest that cannot be read is bad input: exit 2
        return [_Entry(path, info, problem=_verify_problem(store, path))]
    return _entries(_locate(path).store_dir, verify=True)


def _verdicts(entries: list[_Entry]) -> list[dict[str, Any]]:
    return [
        {
            "path": e.location,
            "ok": e.problem is None,
            "problem": e.problem,
            "manifest_checksum": e.info is not None and e.info.manifest_checksum,
        }
        for e in entries
    ]


def _write_verdicts(entries: list[_Entry]) -> None:
    for entry in entries:
        verdict = "ok" if entry.problem is None else f"CORRUPT: {entry.problem}"
        if entry.problem is None and not entry.info.manifest_checksum:
            verdict += " (no manifest checksum: written by an older version)"
        sys.stdout.write(f"{entry.location}: {verdict}\n")


def add_prune(commands: Commands) -> None:
    p = commands.add_parser(
        "prune",
        help="delete old checkpoints, keeping the newest, the best and named ones",
        description="Delete the checkpoints of DIR that retention does not keep. The newest "
        "verified checkpoint, the best ones and named ones are never deleted unless "
        "named with --delete.",
    )
    p.add_argument("directory", type=path_or_url, metavar="DIR", help=WHAT_DIR)
    p.add_argument(
        "--keep-last",
        type=int,
        default=None,
        metavar="N",
        help="keep the newest N (without it, only what --delete names goes)",
    )
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
    add_json_flag(p)
    p.set_defaults(handler=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> int:
    for flag, value in (("--keep-last", args.keep_last), ("--keep-best", args.keep_best)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be 1 or more, got {value}")
    if args.keep_last is None and not args.delete:
        raise ConfigError("prune needs --keep-last N, --delete REF or both")
    if args.keep_best is not None and args.keep_last is None:
        raise ConfigError("--keep-best needs --keep-last N (without it only --delete REF goes)")
    location = _locate(args.directory)
    best = _best_spec(args, location)
    if args.keep_best is not None and best is None:
        raise ConfigError("--keep-best needs --metric M (the run names no best metric)")
    removed = _prune(args, location.store_dir, best)
    gone = {info.path for info in removed}
    kept = [e for e in _entries(location.store_dir, verify=False) if e.path not in gone]
    _mark(kept, best)  # the marks `list` shows once the deletions are done
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "deleted": [_info_json(info) for info in removed],
                "kept": [e.to_json() for e in kept],
            }
        )
    else:
        for info in removed:
            sys.stdout.write(f"{verb} {info.location} (step {info.step})\n")
        sys.stdout.write(f"{verb} {len(removed)} checkpoint(s)\n")
    return EXIT_OK


def _prune(args: argparse.Namespace, store_dir: Place, best: tuple[str, str] | None) -> list[Any]:
    """Delete (unless ``--dry-run``) what retention drops and what ``--delete`` names.

    Retention applies only with ``--keep-last``; the newest checkpoint that
    verifies is never dropped by it.
    """
    from killsafe.store import CheckpointStore

    # The best checkpoint is never pruned: keep at least one when a metric ranks them.
    keep_best = args.keep_best if args.keep_best is not None else 1
    store = CheckpointStore(
        store_dir,
        keep_last=args.keep_last,
        keep_best=keep_best if best and args.keep_last is not None else None,
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
    return removed


def _reference(text: str) -> str | int:
    """A checkpoint reference from the command line: a step number, a name or a path."""
    return int(text) if text.isdigit() else text


def _info_json(info: Any) -> dict[str, Any]:
    return {
        "path": info.location,
        "step": info.step,
        "name": info.name,
        "reason": info.reason,
        "created": info.created,
        "size": info.size,
        "metrics": dict(info.metrics),
    }
