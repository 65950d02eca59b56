"""Checks before a long run: a go/no-go table that costs seconds, not hours.

``Preflight`` runs named checks and collects one row per check. Built in:

- the run directory is writable;
- free disk for ``keep_last + 2`` checkpoints of the state's estimated size;
- existing checkpoints found (a hint that the run will resume from them);
- required packages importable at required versions (``requires=["torch>=2.0"]``);
- data files exist and are not empty;
- JSONL files parse, with required fields, a minimum count and a class balance;
- a round trip of the state through the checkpoint store (save, load, compare
  bit for bit, then restore into the Stateful objects and compare what they
  hand out again), which catches state that cannot be saved or restored.

User checks are plain functions: ``None`` or ``True`` passes; ``False``, a
string (the reason) or an exception fails. ``killsafe preflight`` is the same
from the command line (exit 0 go, 1 no-go, 2 bad input).

Example::

    result = Preflight("runs/exp1", state={"weights": w}, requires=["numpy>=1.24"]).run()
    print(result.format_table())
    if not result.ok:
        raise SystemExit(1)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from killsafe.errors import ConfigError, KillsafeError
from killsafe.progress import format_duration, format_size
from killsafe.report import list_checkpoints
from killsafe.rundir import CHECKPOINTS_DIR

__all__ = [
    "CheckFn",
    "Preflight",
    "PreflightResult",
    "PreflightRow",
    "add_cli_arguments",
    "estimate_state_size",
    "parse_size",
    "run_cli",
]

CheckFn = Callable[[], Any]
"""A user check: returns None/True (pass), False or a string (fail), or raises (fail)."""

STATE_OVERHEAD = 64 * 1024
"""Bytes added to a state's estimate for the manifest and file headers."""


@dataclass(frozen=True)
class PreflightRow:
    """One check's outcome. ``status`` is ``ok``, ``fail``, ``warn`` (passes) or ``skip``."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "status": self.status,
            "detail": self.detail,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class PreflightResult:
    """All rows of a pre-flight; ``ok`` is True when no check failed (go)."""

    directory: str
    rows: list[PreflightRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def failed(self) -> list[PreflightRow]:
        return [row for row in self.rows if not row.ok]

    def format_table(self) -> str:
        """A plain go/no-go table, one check a line, the verdict last."""
        width = max([len("CHECK"), *(len(r.name) for r in self.rows)])
        lines = [f"preflight: {self.directory}", f"{'CHECK':<{width}}  RESULT  DETAIL"]
        for row in self.rows:
            lines.append(f"{row.name:<{width}}  {row.status.upper():<6}  {row.detail}")
        if self.ok:
            lines.append(f"GO: {len(self.rows)} checks, none failed")
        else:
            names = ", ".join(r.name for r in self.failed)
            lines.append(f"NO-GO: {len(self.failed)} of {len(self.rows)} checks failed ({names})")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "ok": self.ok,
            "rows": [row.to_json() for row in self.rows],
        }


class CheckFailed(Exception):
    """Raised inside a built-in check to fail it with a one-line reason."""


class CheckSkipped(Exception):
    """Raised inside a built-in check that does not apply."""


class CheckWarning(Exception):
    """Raised inside a built-in check that passes with something to point out."""


class Preflight:
    """Named checks before a long run.

    Args:
        directory: the run directory (need not exist yet).
        state: the state the run will checkpoint (a dict of tracked objects);
            enables the disk estimate and the save/load round trip.
        keep_last: how many checkpoints the run keeps; free disk is checked
            for ``keep_last + 2`` of them (the new one being written and a
            best or emergency one).
        checks: user checks as ``(name, fn)`` pairs or a mapping.
        requires: package requirements such as ``"torch>=2.0"`` or ``"numpy"``.
        data: files or directories that must exist and not be empty.
        jsonl: JSONL files to check, each a path or a dict ``{"path",
            "required": [fields], "min_count": n, "balance": field,
            "max_ratio": 3.0}``.
        state_size: the state's size in bytes, when there is no ``state``
            to estimate it from (without either, the newest checkpoint in
            ``directory`` gives the size).
        round_trip: save and load the state and compare (default True).

    Raises ``ConfigError`` for a malformed requirement or JSONL spec.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        state: Any = None,
        keep_last: int | None = 3,
        checks: Iterable[tuple[str, CheckFn]] | Mapping[str, CheckFn] = (),
        requires: Iterable[str] = (),
        data: Iterable[str | os.PathLike[str]] = (),
        jsonl: Iterable[str | os.PathLike[str] | Mapping[str, Any]] = (),
        state_size: int | None = None,
        round_trip: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.state = state
        self.keep_last = keep_last
        self.state_size = state_size
        self.round_trip = round_trip
        self.requires = [_parse_requirement(r) for r in requires]
        self.data = [Path(p) for p in data]
        self.jsonl = [_jsonl_spec(s) for s in jsonl]
        pairs = checks.items() if isinstance(checks, Mapping) else checks
        self._user_checks: list[tuple[str, CheckFn]] = []
        for name, fn in pairs:
            self.add(name, fn)

    def add(self, name: str, fn: CheckFn) -> Preflight:
        """Register a user check (build the model, load one batch...). Returns self."""
        if not callable(fn):
            raise ConfigError(f"preflight check {name!r}: {fn!r} is not callable; pass a function")
        self._user_checks.append((name, fn))
        return self

    def run(self) -> PreflightResult:
        """Run every check, built-in first, in order; never raises for a failing check."""
        rows = [_run_check(name, fn) for name, fn in self._builtin_checks()]
        rows += [_run_user_check(name, fn) for name, fn in self._user_checks]
        return PreflightResult(str(self.directory), rows)

    def run_or_exit(self, stream: IO[str] | None = None) -> PreflightResult:
        """Run the checks, write the table to ``stream`` (default stderr), and on a
        no-go raise ``SystemExit(1)``; on a go return the result.
        """
        result = self.run()
        out = stream if stream is not None else sys.stderr
        out.write(result.format_table())
        out.flush()
        if not result.ok:
            raise SystemExit(1)
        return result

    def _builtin_checks(self) -> list[tuple[str, Callable[[], str]]]:
        checks: list[tuple[str, Callable[[], str]]] = [
            ("directory writable", self._check_writable),
            ("free disk", self._check_free_disk),
            ("existing checkpoints", self._check_existing),
        ]
        for requirement in self.requires:
            checks.append((f"package {requirement.text}", _package_check(requirement)))
        for path in self.data:
            checks.append((f"data {path}", _data_check(path)))
        for spec in self.jsonl:
            checks.append((f"jsonl {spec['path']}", _jsonl_check(spec)))
        if self.state is not None and self.round_trip:
            checks.append(("save/load round trip", self._check_round_trip))
        return checks

    # -- built-in checks ----------------------------------------------------

    def _check_writable(self) -> str:
        target = self.directory
        existing = _existing_ancestor(target)
        if existing is None or not existing.is_dir():
            raise CheckFailed(f"{existing or target} is not a directory; choose another --dir")
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".preflight-") as probe:
                probe.write(b"x")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            raise CheckFailed(f"cannot write in {existing}: {exc.strerror or exc}") from exc
        if existing != target.absolute():
            return f"{target} will be created (in {existing})"
        return f"{target} exists: {_contents(target)}"

    def estimated_state_size(self) -> int | None:
        """Bytes one checkpoint of the state takes, estimated; None when unknown.

        From ``state_size``, else the ``state``, else the newest checkpoint
        already in the directory (a run about to resume).
        """
        if self.state_size is not None:
            return self.state_size
        if self.state is not None:
            return estimate_state_size(self.state)
        checkpoints = list_checkpoints(self.directory)
        if checkpoints and isinstance(checkpoints[-1]["size"], int):
            return int(checkpoints[-1]["size"])
        return None

    def _check_free_disk(self) -> str:
        size = self.estimated_state_size()
        if size is None:
            raise CheckSkipped("no state, state size or existing checkpoint to size")
        existing = _existing_ancestor(self.directory)
        if existing is None:
            raise CheckFailed(f"no existing directory above {self.directory}")
        free = shutil.disk_usage(existing).free
        # keep_last=None keeps every checkpoint: check for the fewest it will hold.
        count = (1 if self.keep_last is None else self.keep_last) + 2
        needed = count * size
        kept = " (keep_last=None keeps all: at least)" if self.keep_last is None else ""
        detail = (
            f"need {format_size(needed)}{kept} ({count} checkpoints of ~{format_size(size)}), "
            f"{format_size(free)} free on {existing}"
        )
        if free < needed:
            raise CheckFailed(detail + "; free space or lower keep_last")
        return detail

    def _check_existing(self) -> str:
        checkpoints = list_checkpoints(self.directory)
        if not checkpoints:
            return "none: the run starts fresh"
        latest = checkpoints[-1]
        raise CheckWarning(
            f"{len(checkpoints)} found, latest step {latest['step']} ({latest['name']}): "
            "resume='auto' continues from it; resume='never' refuses to mix with them"
        )

    def _check_round_trip(self) -> str:
        try:
            from killsafe.store import CheckpointStore
        except ImportError as exc:
            raise CheckSkipped("the checkpoint store is not available in this build") from exc
        tree = _capture(self.state)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="killsafe-preflight-") as tmp:
            store = CheckpointStore(Path(tmp) / CHECKPOINTS_DIR)
            try:
                info = store.save(tree, step=0, reason="preflight")
                loaded = store.load("latest")
            except KillsafeError as exc:
                raise CheckFailed(str(exc)) from exc
            finally:
                store.close()
        _fail_on_differences("loaded state differs", compare_trees(tree, loaded))
        restored = self._restore_into_objects(loaded)
        took = format_duration(time.monotonic() - started)
        into = f", restored into {restored} object(s)" if restored else ""
        return f"{format_size(info.size)} saved and loaded back bit for bit{into} in {took}"

    def _restore_into_objects(self, loaded: Any) -> int:
        """Give each Stateful object its loaded state back, as a resume does, then
        check that it hands out the same state again. The state is the one it
        holds now, so a correct ``load_state_dict`` changes nothing.
        """
        if not isinstance(self.state, Mapping) or not isinstance(loaded, Mapping):
            return 0
        targets = {n: v for n, v in self.state.items() if _is_stateful(v) and n in loaded}
        if not targets:
            return 0
        try:
            from killsafe.state import restore
        except ImportError:
            return 0
        try:
            restore(targets, loaded)
        except Exception as exc:
            raise CheckFailed(f"saved and loaded, but not restored: {exc}") from exc
        again = _capture(targets)
        expected = {name: loaded[name] for name in targets}
        _fail_on_differences("state after restore differs", compare_trees(expected, again))
        return len(targets)


def _is_stateful(value: Any) -> bool:
    return (
        not isinstance(value, type)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


def _fail_on_differences(what: str, mismatches: list[str]) -> None:
    if mismatches:
        shown = "; ".join(mismatches[:3])
        more = f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
        raise CheckFailed(f"{what}: {shown}{more}")


# -- running checks -----------------------------------------------------------


def _run_check(name: str, fn: Callable[[], str]) -> PreflightRow:
    started = time.monotonic()
    try:
        detail = fn()
        status = "ok"
    except CheckFailed as exc:
        status, detail = "fail", str(exc)
    except CheckWarning as exc:
        status, detail = "warn", str(exc)
    except CheckSkipped as exc:
        status, detail = "skip", str(exc)
    except Exception as exc:  # a broken built-in check is a failed check, not a crash
        status, detail = "fail", f"{type(exc).__name__}: {exc}"
    return PreflightRow(name, status, _one_line(detail), time.monotonic() - started)


def _run_user_check(name: str, fn: CheckFn) -> PreflightRow:
    started = time.monotonic()
    try:
        outcome = fn()
    except Exception as exc:
        status, detail = "fail", f"{type(exc).__name__}: {exc}"
    else:
        if outcome is None or outcome is True:
            status, detail = "ok", "passed"
        elif outcome is False:
            status, detail = "fail", "returned False"
        elif isinstance(outcome, str):
            status, detail = "fail", outcome
        else:
            status, detail = "fail", f"returned {outcome!r}; return None/True to pass"
    return PreflightRow(name, status, _one_line(detail), time.monotonic() - started)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _contents(directory: Path) -> str:
    """What an existing directory holds, in a few words: a run, checkpoints, files."""
    entries = [entry.name for entry in directory.iterdir()]
    if not entries:
        return "empty"
    checkpoints = len(list_checkpoints(directory))
    held = f"{checkpoints} checkpoint{'' if checkpoints == 1 else 's'}"
    if (directory / "run.json").is_file():
        return f"a run with {held}"
    if checkpoints:
        return held
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, no run"


def _existing_ancestor(path: Path) -> Path | None:
    """``path`` itself or its nearest existing ancestor (a file stops the search)."""
    current = path.absolute()
    while not current.exists():
        if current.parent == current:
            return None
        current = current.parent
    return current


# -- packages -------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    text: str
    name: str
    op: str | None
    version: str | None


_REQUIREMENT = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(==|!=|>=|<=|~=|>|<)\s*([0-9][0-9A-Za-z.+!-]*))?\s*$"
)


def _parse_requirement(text: str) -> Requirement:
    match = _REQUIREMENT.match(text)
    if match is None:
        raise ConfigError(
            f"requirement {text!r} is not understood; write NAME or NAME>=VERSION "
            "(operators ==, !=, >=, <=, >, <, ~=)"
        )
    name, op, version = match.groups()
    return Requirement(text.replace(" ", ""), name, op, version)


def _package_check(requirement: Requirement) -> Callable[[], str]:
    def check() -> str:
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if not _importable(requirement.name):
            raise CheckFailed(f"not installed; run: pip install '{requirement.text}'")
        if requirement.op is None:
            return f"installed {installed or '(version unknown)'}"
        if installed is None:
            raise CheckFailed(f"importable but its version is unknown; need {requirement.text}")
        assert requirement.version is not None
        if not version_satisfies(installed, requirement.op, requirement.version):
            raise CheckFailed(
                f"installed {installed}, need {requirement.op}{requirement.version}; "
                f"run: pip install '{requirement.text}'"
            )
        return f"installed {installed}"

    return check


def _importable(name: str) -> bool:
    direct = {name, name.replace("-", "_"), name.replace("-", "_").lower()}
    if any(_module_exists(m) for m in direct):
        return True
    # The import name differs from the distribution's (scikit-learn -> sklearn).
    try:
        mapping = importlib.metadata.packages_distributions()
    except Exception:  # broken metadata of an unrelated package
        return False
    wanted = _normalise(name)
    return any(
        _module_exists(module)
        for module, dists in mapping.items()
        if any(_normalise(d) == wanted for d in dists)
    )


def _module_exists(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_satisfies(installed: str, op: str, wanted: str) -> bool:
    """Whether version ``installed`` satisfies ``op wanted`` (PEP 440 when packaging exists)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _simple_satisfies(installed, op, wanted)
    try:
        return Version(installed) in SpecifierSet(f"{op}{wanted}")
    except InvalidVersion:
        return _simple_satisfies(installed, op, wanted)


def _release(version: str, *, strip: bool = True) -> tuple[int, ...]:
    numbers = []
    for part in re.split(r"[.+]", version):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
    while strip and numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def _simple_satisfies(installed: str, op: str, wanted: str) -> bool:
    have, need = _release(installed), _release(wanted)
    if op == "~=":  # ~=2.1 means >=2.1 and ==2.*
        parts = wanted.split(".")
        prefix = _release(".".join(parts[:-1]), strip=False) if len(parts) > 1 else need
        padded = _release(installed, strip=False) + (0,) * len(prefix)
        return have >= need and padded[: len(prefix)] == prefix
    results = {
        "==": have == need,
        "!=": have != need,
        ">=": have >= need,
        "<=": have <= need,
        ">": have > need,
        "<": have < need,
    }
    return results[op]


# -- data files -----------------------------------------------------------------


def _data_check(path: Path) -> Callable[[], str]:
    def check() -> str:
        if not path.exists():
            raise CheckFailed(f"{path} does not exist")
        if path.is_dir():
            count = sum(1 for _ in path.iterdir())
            if count == 0:
                raise CheckFailed(f"{path} is an empty directory")
            return f"directory with {count} entries"
        size = path.stat().st_size
        if size == 0:
            raise CheckFailed(f"{path} is empty (0 bytes)")
        return format_size(size)

    return check


def _jsonl_spec(spec: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        spec = {"path": spec}
    known = {"path", "required", "min_count", "balance", "max_ratio"}
    unknown = set(spec) - known
    if unknown or "path" not in spec:
        raise ConfigError(
            f"jsonl check {dict(spec)!r}: keys must be {sorted(known)} with 'path' required"
        )
    required = spec.get("required") or []
    if isinstance(required, str):
        required = [required]
    max_ratio = spec.get("max_ratio")
    if max_ratio is None and spec.get("balance"):
        max_ratio = 3.0
    if max_ratio is not None and float(max_ratio) < 1.0:
        raise ConfigError(f"jsonl check {spec['path']}: max_ratio={max_ratio}; use 1.0 or more")
    return {
        "path": Path(spec["path"]),
        "required": list(required),
        "min_count": spec.get("min_count"),
        "balance": spec.get("balance"),
        "max_ratio": float(max_ratio) if max_ratio is not None else None,
    }


def _jsonl_check(spec: Mapping[str, Any]) -> Callable[[], str]:
    def check() -> str:
        path: Path = spec["path"]
        if not path.is_file():
            raise CheckFailed(f"{path} does not exist or is not a file")
        count = 0
        classes: Counter[str] = Counter()
        balance = spec["balance"]
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CheckFailed(f"line {number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    kind = type(record).__name__
                    raise CheckFailed(f"line {number}: a JSON {kind}, not an object")
                missing = [name for name in spec["required"] if name not in record]
                if missing:
                    raise CheckFailed(f"line {number}: missing field {', '.join(missing)}")
                if balance is not None:
                    if balance not in record:
                        raise CheckFailed(f"line {number}: missing field {balance}")
                    classes[json.dumps(record[balance], sort_keys=True)] += 1
                count += 1
        if count == 0:
            raise CheckFailed(f"{path} holds no records")
        min_count = spec["min_count"]
        if min_count is not None and count < int(min_count):
            raise CheckFailed(f"{count} records, need at least {min_count}")
        detail = f"{count} records"
        if balance is not None:
            ordered = classes.most_common()
            shown = " ".join(f"{_label(k)}={n}" for k, n in ordered[:6])
            more = f" (+{len(ordered) - 6} classes)" if len(ordered) > 6 else ""
            ratio = ordered[0][1] / ordered[-1][1]
            detail += f"; {balance}: {shown}{more}, ratio {ratio:.2f}"
            if len(ordered) < 2:
                raise CheckFailed(detail + f"; only one class of {balance}")
            if ratio > spec["max_ratio"]:
                raise CheckFailed(detail + f" > {spec['max_ratio']:.2f} allowed")
        return detail

    return check


def _label(key: str) -> str:
    value = json.loads(key)
    return value if isinstance(value, str) else key


# -- state: estimate, capture, compare ------------------------------------------


def estimate_state_size(state: Any) -> int:
    """Bytes one checkpoint of ``state`` takes: tensor and array bytes plus a margin.

    Stateful objects are asked for their ``state_dict()``; plain values count
    a few bytes each. The estimate ignores compression.
    """
    return _size_of(state, depth=0) + STATE_OVERHEAD


def _size_of(value: Any, depth: int) -> int:
    if depth > 100:
        return 0
    if _is_tensor(value):
        return int(value.numel() * value.element_size())
    if _is_ndarray(value):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8", errors="replace")) + 8
    if isinstance(value, Mapping):
        return sum(_size_of(v, depth + 1) + 16 for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(_size_of(v, depth + 1) + 8 for v in value)
    if hasattr(value, "state_dict") and callable(value.state_dict):
        return _size_of(value.state_dict(), depth + 1)
    return 16


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _is_ndarray(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic))


def _capture(state: Any) -> Any:
    try:
        from killsafe.state import capture
    except ImportError:
        return _capture_plain(state)
    return capture(state)


def _capture_plain(value: Any) -> Any:
    if hasattr(value, "state_dict") and callable(value.state_dict):
        return _capture_plain(value.state_dict())
    if isinstance(value, Mapping):
        return {k: _capture_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_capture_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_capture_plain(v) for v in value)
    return value


def compare_trees(expected: Any, actual: Any, path: str = "state") -> list[str]:
    """Every difference between two state trees, bit for bit, as ``path: what`` lines."""
    problems: list[str] = []
    _compare(expected, actual, path, problems)
    return problems


def _compare(expected: Any, actual: Any, path: str, problems: list[str]) -> None:
    if len(problems) >= 50:
        return
    if _is_tensor(expected) or _is_ndarray(expected):
        _compare_arrays(expected, actual, path, problems)
        return
    if type(expected) is not type(actual):
        problems.append(f"{path}: {type(expected).__name__} became {type(actual).__name__}")
        return
    if isinstance(expected, Mapping):
        if list(expected) != list(actual):
            missing = [k for k in expected if k not in actual]
            extra = [k for k in actual if k not in expected]
            problems.append(f"{path}: keys differ (missing {missing}, extra {extra})")
        for key in expected:
            if key in actual:
                _compare(expected[key], actual[key], f"{path}[{key!r}]", problems)
        return
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            problems.append(f"{path}: length {len(expected)} became {len(actual)}")
            return
        for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
            _compare(a, b, f"{path}[{index}]", problems)
        return
    if isinstance(expected, float):
        if _float_bits(expected) != _float_bits(actual):
            problems.append(f"{path}: {expected!r} became {actual!r}")
        return
    if expected != actual:
        problems.append(f"{path}: {_short(expected)} became {_short(actual)}")


def _compare_arrays(expected: Any, actual: Any, path: str, problems: list[str]) -> None:
    if type(expected) is not type(actual):
        problems.append(f"{path}: {type(expected).__name__} became {type(actual).__name__}")
        return
    if expected.dtype != actual.dtype or tuple(expected.shape) != tuple(actual.shape):
        problems.append(
            f"{path}: {expected.dtype}{list(expected.shape)} became "
            f"{actual.dtype}{list(actual.shape)}"
        )
        return
    if _array_bytes(expected) != _array_bytes(actual):
        problems.append(f"{path}: values differ")


def _array_bytes(value: Any) -> bytes:
    if _is_tensor(value):
        import torch

        if value.numel() == 0:
            return b""
        # clone(): a contiguous copy of just these elements (a slice's storage holds more).
        flat = value.detach().cpu().reshape(-1).clone()
        return bytes(flat.view(torch.uint8).numpy().tobytes())
    import numpy

    return bytes(numpy.ascontiguousarray(value).tobytes())


def _float_bits(value: float) -> bytes:
    import struct

    return struct.pack("<d", value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- command line -----------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"512"``, ``"20MB"``, ``"1.5GiB"``, ``"2G"`` as bytes; ConfigError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?)(I?B?)\s*", text.upper())
    if match is None:
        raise ConfigError(f"size {text!r} is not understood; write bytes or e.g. 512MiB, 2GB")
    number, prefix, _ = match.groups()
    scale = 1024 ** "_KMGTP".index(prefix or "_") if prefix else 1
    return int(float(number) * scale)


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``killsafe preflight``."""
    parser.add_argument("--dir", default=".", metavar="DIR", help="the run directory (default .)")
    parser.add_argument("--keep-last", type=int, default=3, metavar="N", help="checkpoints kept")
    parser.add_argument(
        "--state-size", metavar="SIZE", help="one checkpoint's size, e.g. 2GiB (free disk check)"
    )
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="PKG>=VER",
        help="a package that must be importable, optionally at a version (repeatable)",
    )
    parser.add_argument(
        "--data", action="append", default=[], metavar="PATH", help="a data file (repeatable)"
    )
    parser.add_argument(
        "--jsonl", action="append", default=[], metavar="PATH", help="a JSONL file (repeatable)"
    )
    parser.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME",
        help="a field every JSONL record needs (repeatable)",
    )
    parser.add_argument("--min-count", type=int, metavar="N", help="JSONL records needed")
    parser.add_argument("--balance", metavar="FIELD", help="JSONL field whose classes to balance")
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=3.0,
        metavar="R",
        help="largest class over smallest, at most (default 3)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Run ``killsafe preflight``: 0 go, 1 no-go, 2 bad input."""
    try:
        preflight = _from_args(args)
    except ConfigError as exc:
        sys.stderr.write(f"killsafe preflight: error: {exc}\n")
        return 2
    result = preflight.run()
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(result.format_table())
    return 0 if result.ok else 1


def _from_args(args: argparse.Namespace) -> Preflight:
    if args.keep_last is not None and args.keep_last < 0:
        raise ConfigError(f"--keep-last {args.keep_last}: use 0 or more")
    jsonl_options = (args.field, args.min_count, args.balance)
    if not args.jsonl and any(jsonl_options):
        raise ConfigError("--field, --min-count and --balance apply to --jsonl PATH; add one")
    specs: Sequence[Mapping[str, Any]] = [
        {
            "path": path,
            "required": list(args.field),
            "min_count": args.min_count,
            "balance": args.balance,
            "max_ratio": args.max_ratio if args.balance else None,
        }
        for path in args.jsonl
    ]
    return Preflight(
        args.dir,
        keep_last=args.keep_last,
        requires=args.require,
        data=args.data,
        jsonl=specs,
        state_size=parse_size(args.state_size) if args.state_size else None,
    )
