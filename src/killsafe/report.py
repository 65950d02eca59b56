"""The report of a run: ``report.txt``, ``report.json`` and ``report.png``.

A report is built from the run directory's files alone (``run.json``,
``status.json``, ``history.jsonl``, the checkpoints' manifests), so it works
for a run that finished, one that was interrupted or killed, and one that is
still running in another process; a missing file only leaves its part empty.

``build_report(run_dir)`` returns a JSON-ready dict, ``format_text(report)``
the plain text of ``report.txt`` and ``killsafe report``, and
``write_report(run_dir)`` writes the three files (the plot only when
matplotlib is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from killsafe import storage
from killsafe.errors import CheckpointNotFound, ConfigError, KillsafeError
from killsafe.history import csv_text, read_history, write_csv
from killsafe.progress import format_duration, format_number, format_size, metric_direction
from killsafe.rundir import (
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    REPORT_JSON,
    REPORT_PNG,
    REPORT_TXT,
    RUN_FILE,
    STATUS_INTERVAL,
    RunLayout,
    RunReader,
    is_attached,
    parse_best,
    pid_alive,
    read_json,
    this_host,
    write_bytes_atomic,
    write_json_atomic,
)
from killsafe.rundir.remote import mirrored_run_copy

__all__ = [
    "REPORT_JSON",
    "REPORT_PNG",
    "REPORT_TXT",
    "add_cli_arguments",
    "build_report",
    "draw_report_png",
    "format_text",
    "list_checkpoints",
    "plot_history",
    "run_cli",
    "start_png_child",
    "write_report",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MAX_PLOT_POINTS = 5000
PLOT_MODES = ("inline", "detached")
_NO_MATPLOTLIB = "matplotlib is not installed (pip install matplotlib)"

# -- building -------------------------------------------------------------


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    now: float | None = None,
    checkpoints_at: str | None = None,
) -> dict[str, Any]:
    """Gather what the run directory says about the run into a JSON-ready dict.

    ``checkpoints_at``: where the checkpoints are when not under
    ``run_dir/checkpoints`` (a mirror's URL whose run files are in ``run_dir``).
    Raises ``CheckpointNotFound`` when ``run_dir`` does not exist and
    ``ConfigError`` when it holds none of a run directory's files.
    """
    run_dir = _check_run_dir(Path(run_dir))
    reader = RunReader(run_dir)
    now = time.time() if now is None else now
    run = _read_optional(reader.record) or {}
    status = _read_optional(reader.status)
    history = reader.history()
    checkpoints = list_checkpoints(run_dir, checkpoints_at=checkpoints_at)
    attached = _is_live(status, now)

    sessions = _sessions(run, status, history, attached, now)
    final_step = _final_step(sessions, status, history, checkpoints)
    best_spec = parse_best((run.get("config") or {}).get("best"))
    best = _best_metrics(history, status, best_spec)
    all_duration = sum(s["duration"] or 0.0 for s in sessions)
    this = sessions[-1] if sessions else None
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "run_id": run.get("run_id"),
        "generated": now,
        "status": _status(run, status, attached),
        "attached": attached,
        "status_updated": (status or {}).get("updated"),
        "exit_reason": run.get("exit_reason") or (this or {}).get("exit_reason"),
        "started": sessions[0]["started"] if sessions else None,
        "ended": None if attached else (this or {}).get("ended"),
        "sessions": sessions,
        "duration": {
            "this_session": this["duration"] if this else None,
            "all_sessions": all_duration if sessions else None,
        },
        "steps": {
            "final": final_step,
            "total": run.get("config", {}).get("total_steps") or (status or {}).get("total_steps"),
            "this_session": this["steps"] if this else None,
            "all_sessions": _steps_done(sessions),
        },
        "throughput": _throughput(sessions, status, all_duration),
        "resources": _resources(sessions, status),
        "metrics": {"final": _final_metrics(history), "best": best},
        "checkpoints": checkpoints,
        "latest_checkpoint": checkpoints[-1]["path"] if checkpoints else None,
        "best_checkpoint": _best_checkpoint(checkpoints, best_spec, best),
        "summary": run.get("summary") or {},
        "config": run.get("config") or {},
        "history": _history_facts(history),
    }
    return report


def _is_live(status: Mapping[str, Any] | None, now: float) -> bool:
    """Whether a process is still running the run: attached, or alive on this host.

    A live run rewrites ``status.json`` only between steps, so one long step
    (an evaluation) makes it look stale; on this host its pid settles it, as
    long as that process is older than the status (a pid can be reused).
    """
    if is_attached(dict(status) if status else None, now):
        return True
    if not status or status.get("state") not in ("running", "stopping"):
        return False
    if status.get("host") != this_host():
        return False
    pid = _as_int(status.get("pid"))
    if pid <= 0 or not pid_alive(pid):
        return False
    try:
        import psutil

        created = psutil.Process(pid).create_time()
    except Exception:  # gone meanwhile, or not ours to inspect
        return False
    updated = status.get("updated")
    return isinstance(updated, (int, float)) and created <= updated + 1.0


def list_checkpoints(
    run_dir: str | os.PathLike[str], *, checkpoints_at: str | None = None
) -> list[dict[str, Any]]:
    """The committed checkpoints under ``run_dir/checkpoints`` (or at ``checkpoints_at``),
    ordered by step then time.

    Read through ``CheckpointStore.list()``, which reads manifests only and
    never locks, so it is safe next to a live run. Each entry: step, name,
    reason, created, size (bytes of the checkpoint's files, manifest included), path, metrics.
    """
    from killsafe.store import CheckpointStore

    try:
        reader = RunReader(run_dir, open_catalog=CheckpointStore, checkpoints_at=checkpoints_at)
        infos = reader.checkpoints()
    except KillsafeError as exc:
        logger.warning("%s", exc)
        return []
    return [
        {
            "step": info.step,
            "name": info.name or info.path.name,
            "reason": info.reason,
            "created": info.created,
            "size": info.size,
            "path": info.location,
            "metrics": dict(info.metrics),
        }
        for info in infos
    ]


def _check_run_dir(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise CheckpointNotFound(f"{run_dir}: no such run directory; check the path")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory; pass the run directory (runs/NAME)")
    if RunLayout(run_dir).is_run_dir():
        return run_dir
    if (run_dir / MANIFEST).exists() or any(run_dir.glob(f"*/{MANIFEST}")):
        raise ConfigError(
            f"{run_dir}: a checkpoint or checkpoint folder, not a run directory; "
            f"pass the run directory that holds {CHECKPOINTS_DIR}/ (probably {run_dir.parent})"
        )
    raise ConfigError(
        f"{run_dir}: not a run directory (no {RUN_FILE}, {HISTORY_FILE} or "
        f"{CHECKPOINTS_DIR}/); pass the directory given to Run(...)"
    )


def _read_optional(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except KillsafeError as exc:  # a damaged file leaves its part of the report empty
        logger.warning("%s", exc)
        return None


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _sessions(
    run: Mapping[str, Any],
    status: Mapping[str, Any] | None,
    history: list[dict[str, Any]],
    attached: bool,
    now: float,
) -> list[dict[str, Any]]:
    raw = [s for s in run.get("sessions") or [] if isinstance(s, Mapping)]
    if not raw and (status or history):
        # No run.json (or no sessions in it): one session seen through the other files.
        start = history[0]["time"] if history else None
        raw = [{"started": start, "start_step": 0, "pid": (status or {}).get("pid")}]
    sessions = []
    for index, session in enumerate(raw):
        is_last = index == len(raw) - 1
        started = session.get("started")
        ended = session.get("ended")
        end_step = session.get("end_step")
        if ended is None and is_last:
            # Still running, or killed before it could record its end.
            if attached:
                ended = now
            elif status and status.get("updated"):
                ended = status.get("updated")
        if ended is None:
            ended = _last_history_time(history, started, _next_start(raw, index))
        if end_step is None:
            end_step = _end_step_of(session, status if is_last else None, history, started, ended)
        start_step = session.get("start_step") or 0
        duration = ended - started if started is not None and ended is not None else None
        steps = end_step - start_step if end_step is not None else None
        sessions.append(
            {
                "index": index + 1,
                "pid": session.get("pid"),
                "host": session.get("host"),
                "started": started,
                "ended": ended,
                "duration": max(0.0, duration) if duration is not None else None,
                "start_step": start_step,
                "end_step": end_step,
                "steps": steps,
                "resumed_from": session.get("resumed_from"),
                "status": _session_status(session, attached and is_last),
                "exit_reason": session.get("exit_reason"),
                "peak_rss_bytes": session.get("peak_rss_bytes"),
                "cpu_seconds": session.get("cpu_seconds"),
            }
        )
    return sessions


def _session_status(session: Mapping[str, Any], live: bool) -> str | None:
    if live:
        return "running"
    recorded = session.get("status")
    if recorded in (None, "running", "stopping") and session.get("ended") is None:
        return "interrupted"  # no live process and no recorded end: killed or crashed
    return str(recorded) if recorded is not None else None


def _next_start(raw: list[Mapping[str, Any]], index: int) -> float | None:
    if index + 1 < len(raw):
        value = raw[index + 1].get("started")
        return float(value) if value is not None else None
    return None


def _last_history_time(
    history: list[dict[str, Any]], started: float | None, before: float | None
) -> float | None:
    times = [
        r["time"]
        for r in history
        if isinstance(r.get("time"), (int, float))
        and (started is None or r["time"] >= started)
        and (before is None or r["time"] < before)
    ]
    return max(times) if times else None


def _end_step_of(
    session: Mapping[str, Any],
    status: Mapping[str, Any] | None,
    history: list[dict[str, Any]],
    started: float | None,
    ended: float | None,
) -> int | None:
    if status and status.get("step") is not None and status.get("pid") == session.get("pid"):
        return int(status["step"])
    steps = [
        r["step"]
        for r in history
        if isinstance(r.get("time"), (int, float))
        and (started is None or r["time"] >= started)
        and (ended is None or r["time"] <= ended)
    ]
    return max(steps) if steps else session.get("start_step")


def _final_step(
    sessions: list[dict[str, Any]],
    status: Mapping[str, Any] | None,
    history: list[dict[str, Any]],
    checkpoints: list[dict[str, Any]],
) -> int | None:
    candidates = [s["end_step"] for s in sessions if s["end_step"] is not None]
    if candidates:
        return int(candidates[-1])
    if status and status.get("step") is not None:
        return int(status["step"])
    if history:
        return int(history[-1]["step"])
    if checkpoints:
        return _as_int(checkpoints[-1]["step"])
    return None


def _steps_done(sessions: list[dict[str, Any]]) -> int | None:
    steps = [s["steps"] for s in sessions if s["steps"] is not None]
    return sum(steps) if steps else None


def _status(run: Mapping[str, Any], status: Mapping[str, Any] | None, attached: bool) -> str:
    if attached:
        return "running"
    recorded = run.get("status") or (status or {}).get("state")
    if recorded in ("running", "stopping"):
        # The files say running but no live process answers: it was killed or crashed.
        return "interrupted"
    return str(recorded) if recorded else "unknown"


def _throughput(
    sessions: list[dict[str, Any]], status: Mapping[str, Any] | None, all_duration: float
) -> dict[str, Any]:
    this = sessions[-1] if sessions else None
    steps_all = _steps_done(sessions)
    result: dict[str, Any] = {
        "steps_per_second": _per_second(this["steps"], this["duration"]) if this else None,
        "steps_per_second_all_sessions": _per_second(steps_all, all_duration),
        "counters": {},
    }
    for name, counter in ((status or {}).get("counters") or {}).items():
        if not isinstance(counter, Mapping):
            continue
        value = counter.get("value")
        result["counters"][name] = {
            "value": value,
            "total": counter.get("total"),
            "per_second": counter.get("rate"),
            "per_second_all_sessions": _per_second(value, all_duration),
        }
    return result


def _per_second(amount: Any, seconds: Any) -> float | None:
    if not isinstance(amount, (int, float)) or not isinstance(seconds, (int, float)):
        return None
    return amount / seconds if seconds > 0 else None


def _resources(sessions: list[dict[str, Any]], status: Mapping[str, Any] | None) -> dict[str, Any]:
    resources = (status or {}).get("resources") or {}
    this = sessions[-1] if sessions else None
    cpu_seconds = resources.get("cpu_seconds")
    if this is not None and this.get("cpu_seconds") is not None:
        cpu_seconds = this["cpu_seconds"]
    duration = this["duration"] if this else None
    peaks = [s["peak_rss_bytes"] for s in sessions if s.get("peak_rss_bytes")]
    peaks += [resources[k] for k in ("peak_rss_bytes", "rss_bytes") if resources.get(k)]
    cpu_average = None
    if isinstance(cpu_seconds, (int, float)) and duration:
        cpu_average = 100.0 * cpu_seconds / duration
    return {
        "cpu_percent_average": cpu_average,
        "cpu_percent_last": resources.get("cpu_percent"),
        "cpu_seconds": cpu_seconds,
        "peak_rss_bytes": max(peaks) if peaks else None,
        "gpu_memory_bytes": resources.get("gpu_memory_bytes"),
    }


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _best_metrics(
    history: list[dict[str, Any]],
    status: Mapping[str, Any] | None,
    spec: tuple[str, str] | None,
) -> dict[str, dict[str, Any]]:
    """The best value of each metric whose direction is known, with its step."""
    modes: dict[str, str] = {}
    if spec is not None:
        modes[spec[0]] = spec[1]
    for name in _metric_names(history):
        if name not in modes:
            direction = metric_direction(name)
            if direction is not None:
                modes[name] = direction
    best: dict[str, dict[str, Any]] = {}
    for record in history:
        for name, mode in modes.items():
            value = record.get(name)
            if not _is_number(value):
                continue
            current = best.get(name)
            better = current is None or (
                value < current["value"] if mode == "min" else value > current["value"]
            )
            if better:
                best[name] = {"value": value, "step": record["step"], "mode": mode}
    # What the run itself tracked wins when the history does not hold the metric.
    for name, tracked in ((status or {}).get("best") or {}).items():
        if name not in best and isinstance(tracked, Mapping):
            best[name] = {
                "value": tracked.get("value"),
                "step": tracked.get("step"),
                "mode": modes.get(name),
            }
    return best


def _metric_names(history: Iterable[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for record in history:
        for key in record:
            if key not in ("step", "time"):
                names[key] = None
    return list(names)


def _final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for record in history:
        for key, value in record.items():
            if key not in ("step", "time"):
                final[key] = value
    return final


def _best_checkpoint(
    checkpoints: list[dict[str, Any]],
    spec: tuple[str, str] | None,
    best: Mapping[str, Mapping[str, Any]],
) -> str | None:
    named = [c for c in checkpoints if c["name"] == "best" or c["reason"] == "best"]
    if spec is None and len(best) == 1:
        name, entry = next(iter(best.items()))
        spec = (name, str(entry.get("mode") or "min"))
    if spec is not None:
        metric, mode = spec
        scored = [c for c in checkpoints if _is_number(c["metrics"].get(metric))]
        if scored:
            pick = min if mode == "min" else max
            return str(pick(scored, key=lambda c: c["metrics"][metric])["path"])
    return str(named[-1]["path"]) if named else None


def _history_facts(history: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r["step"] for r in history]
    return {
        "records": len(history),
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "metrics": _metric_names(history),
        "continuous": all(a <= b for a, b in itertools.pairwise(steps)),
    }


# -- text -----------------------------------------------------------------


def format_text(report: Mapping[str, Any]) -> str:
    """The plain-text report: ``key: value`` lines, greppable, no decoration."""
    lines = [f"killsafe report: {report['run_dir']}"]

    def row(key: str, value: Any) -> None:
        lines.append(f"{key + ':':<19}{value}")

    status = report["status"]
    if report.get("exit_reason") not in (None, "", status):  # "finished (finished)" says it twice
        status += f" ({report['exit_reason']})"
    row("status", status)
    if report.get("run_id"):
        row("run id", report["run_id"])
    row("started", _when(report.get("started")))
    row("ended", _ended_text(report))
    duration = report["duration"]
    row(
        "duration",
        f"this session {format_duration(duration['this_session'])}, "
        f"all sessions {format_duration(duration['all_sessions'])}",
    )
    steps = report["steps"]
    done = f"{steps['final']}" + (f"/{steps['total']}" if steps.get("total") else "")
    row(
        "steps",
        f"{done} (this session {_or_dash(steps['this_session'])}, "
        f"all sessions {_or_dash(steps['all_sessions'])})",
    )
    throughput = report["throughput"]
    parts = [
        f"{_rate(throughput['steps_per_second'])} steps/s this session",
        f"{_rate(throughput['steps_per_second_all_sessions'])} steps/s overall",
    ]
    for name, counter in throughput["counters"].items():
        parts.append(f"{name} {_rate(counter['per_second'])}/s")
    row("throughput", ", ".join(parts))
    resources = report["resources"]
    cpu = resources.get("cpu_percent_average")
    row("cpu", f"{cpu:.0f}% average of one core this session" if cpu is not None else "-")
    row("peak memory", format_size(resources.get("peak_rss_bytes")))
    if resources.get("gpu_memory_bytes") is not None:
        row("gpu memory", format_size(resources["gpu_memory_bytes"]))
    counters = throughput["counters"]
    if counters:
        row(
            "counters",
            " ".join(
                f"{n}={format_number(c['value'])}"
                + (f"/{format_number(c['total'])}" if c.get("total") is not None else "")
                for n, c in counters.items()
            ),
        )
    final = report["metrics"]["final"]
    row("final metrics", " ".join(f"{k}={format_number(v)}" for k, v in final.items()) or "-")
    best = report["metrics"]["best"]
    row(
        "best metrics",
        " ".join(
            f"{k}={format_number(b['value'])}@{b['step']}"
            + (f"({b['mode']})" if b.get("mode") else "")
            for k, b in best.items()
        )
        or "-",
    )
    row("sessions", str(len(report["sessions"])))
    for session in report["sessions"]:
        lines.append("  " + _session_line(session))
    checkpoints = report["checkpoints"]
    row("checkpoints", f"{len(checkpoints)} kept")
    for checkpoint in checkpoints:
        lines.append(
            f"  {checkpoint['name']}  step={checkpoint['step']}  "
            f"reason={checkpoint['reason'] or '-'}  size={format_size(checkpoint['size'])}  "
            f"created={_when(checkpoint['created'])}"
        )
    row("latest checkpoint", report.get("latest_checkpoint") or "-")
    row("best checkpoint", report.get("best_checkpoint") or "-")
    summary = report.get("summary") or {}
    if summary:
        row("summary", "")
        for key, value in summary.items():
            lines.append(f"  {key}: {format_number(value) if _is_number(value) else value}")
    history = report["history"]
    row(
        "history",
        f"{history['records']} records, steps {_or_dash(history['first_step'])}.."
        f"{_or_dash(history['last_step'])}"
        + ("" if history["continuous"] else " (NOT continuous)"),
    )
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _ended_text(report: Mapping[str, Any]) -> str:
    if not report.get("attached"):
        return _when(report.get("ended"))
    updated, generated = report.get("status_updated"), report.get("generated")
    if isinstance(updated, (int, float)) and isinstance(generated, (int, float)):
        age = generated - updated
        if age > 3 * STATUS_INTERVAL + 1.0:
            return f"still running (in a long step: no status update for {format_duration(age)})"
    return "still running"


def _session_line(session: Mapping[str, Any]) -> str:
    resumed = session.get("resumed_from")
    parts = [
        f"#{session['index']}",
        f"{_when(session.get('started'))} -> {_when(session.get('ended'))}",
        format_duration(session.get("duration")),
        f"steps {_or_dash(session.get('start_step'))}->{_or_dash(session.get('end_step'))}",
        session.get("status") or "-",
    ]
    if session.get("exit_reason") not in (None, "", session.get("status")):
        parts.append(str(session["exit_reason"]))
    if resumed:
        parts.append(f"resumed from {resumed}")
    return "  ".join(parts)


def _when(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _rate(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


# -- writing --------------------------------------------------------------


def write_report(run_dir: str | os.PathLike[str], *, plot: str = "inline") -> dict[str, Any]:
    """Write ``report.json``, ``report.txt`` and ``report.png`` into ``run_dir``.

    Returns the report, with ``files`` naming what was written. The plot is
    skipped (with a warning in the log) when matplotlib is missing or fails;
    the text and JSON are always written.

    ``plot``: ``"inline"`` draws ``report.png`` before returning;
    ``"detached"`` writes the text and JSON, then leaves the plot to a child
    process that outlives this one (``killsafe report DIR --png-only``), so a
    run's exit does not wait the second matplotlib takes. ``files["png"]``
    then names the plot to come.
    """
    if plot not in PLOT_MODES:
        raise ConfigError(f"write_report(plot={plot!r}): use one of {', '.join(PLOT_MODES)}")
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    png = run_dir / REPORT_PNG
    files = {"json": str(run_dir / REPORT_JSON), "txt": str(run_dir / REPORT_TXT), "png": None}
    report["files"] = files
    if plot == "detached":
        if _matplotlib_installed():
            files["png"] = str(png)
        _write_text_and_json(run_dir, report)
        if files["png"] is not None and not start_png_child(run_dir):
            files["png"] = None
            _write_text_and_json(run_dir, report)
        return report
    try:
        plot_history(run_dir, png, report=report)
        files["png"] = str(png)
    except ImportError:
        logger.warning("report.png skipped: %s", _NO_MATPLOTLIB)
    except Exception as exc:  # a plot must never cost the text report
        logger.warning("report.png skipped: %s: %s", type(exc).__name__, exc)
    _write_text_and_json(run_dir, report)
    return report


def _write_text_and_json(run_dir: Path, report: Mapping[str, Any]) -> None:
    write_json_atomic(run_dir / REPORT_JSON, report)
    write_bytes_atomic(run_dir / REPORT_TXT, format_text(report).encode())


def _matplotlib_installed() -> bool:
    """Whether matplotlib can be imported, found without importing it (a few ms)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    logger.warning("report.png skipped: %s", _NO_MATPLOTLIB)
    return False


# ``killsafe report DIR --png-only`` at a lower priority, after the run's
# process ended (or 2 s passed, for a run inside a longer-lived process): the
# second of CPU the plot takes must not slow the run's exit, nor the start of
# the next session, on a machine with few cores.
# argv: the run directory, the run's pid, where this package was imported from.
_PLOT_CHILD = """
import os, sys, time
os.nice(10)
parent, deadline = int(sys.argv[2]), time.monotonic() + 2.0
while os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.02)
if sys.argv[3] not in sys.path:
    sys.path.append(sys.argv[3])
from killsafe.cli import main
sys.exit(main(["report", sys.argv[1], "--png-only"]))
"""
# Its own process group keeps signals to the run's group (Ctrl+C, a
# supervisor's killpg) away from it; staying in the run's session keeps it
# in the same scheduler autogroup, where its nice value counts against the run.
_OWN_PROCESS_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
)
_PLOT_CHILDREN: list[subprocess.Popen[bytes]] = []
"""Plot children still running; polled at the next start, so none stays a zombie."""


def start_png_child(run_dir: str | os.PathLike[str]) -> bool:
    """Start ``killsafe report DIR --png-only`` detached; returns whether it started.

    The child waits for this process to end (at most 2 s), then draws at a
    lower priority (nice 10), in its own process group (a signal to the
    run's group, a supervisor's included, leaves it be), with no stdin,
    stdout or stderr (it holds no pipe a caller waits on) and no inherited
    descriptors (no store lock). It imports this package from where this
    process did when its own path lacks that place.
    """
    _PLOT_CHILDREN[:] = [child for child in _PLOT_CHILDREN if child.poll() is None]
    if not sys.executable:
        logger.warning("report.png skipped: no Python executable to draw it with")
        return False
    package_root = str(Path(__file__).resolve().parent.parent)
    argv = [str(Path(run_dir).resolve()), str(os.getpid()), package_root]
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _PLOT_CHILD, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **_OWN_PROCESS_GROUP,
        )
    except OSError as exc:
        logger.warning(
            "report.png skipped: its drawing could not start (%s); draw it with "
            "`killsafe report %s --write`",
            exc,
            run_dir,
        )
        return False
    _PLOT_CHILDREN.append(child)
    return True


def draw_report_png(run_dir: str | os.PathLike[str]) -> Path | None:
    """Draw ``report.png`` from the ``report.json`` beside it (built afresh when missing).

    Returns the path, or ``None`` when a newer ``report.json`` was written
    while drawing: that report's own plot replaces this one, and a late
    older plot must not replace it. Raises ImportError without matplotlib.
    """
    run_dir = _check_run_dir(Path(run_dir))
    try:
        saved = read_json(run_dir / REPORT_JSON)
    except KillsafeError:  # a damaged report.json: draw from the run's own files
        saved = None
    report = saved if isinstance(saved, dict) else build_report(run_dir)
    payload = _plot_bytes(run_dir, report)
    if saved is not None and _generated(run_dir) != report.get("generated"):
        return None
    path = run_dir / REPORT_PNG
    write_bytes_atomic(path, payload)
    return path


def _generated(run_dir: Path) -> Any:
    with contextlib.suppress(KillsafeError, OSError):
        saved = read_json(run_dir / REPORT_JSON)
        return saved.get("generated") if isinstance(saved, dict) else None
    return None


def plot_history(
    run_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    report: Mapping[str, Any] | None = None,
) -> Path:
    """Draw the logged numeric metrics over steps into a PNG at ``path``.

    One panel per metric (at most 12), a dashed vertical line at each step
    where a later session resumed. Uses matplotlib's Agg canvas directly, so
    the process's pyplot backend is left alone. Raises ImportError without
    matplotlib.
    """
    run_dir = Path(run_dir)
    payload = _plot_bytes(run_dir, report if report is not None else build_report(run_dir))
    path = Path(path)
    write_bytes_atomic(path, payload)
    return path


def _plot_bytes(run_dir: Path, report: Mapping[str, Any]) -> bytes:
    """The PNG of ``plot_history``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = read_history(run_dir)
    series = _numeric_series(history)[:12]
    resumes = [
        s["start_step"] for s in report.get("sessions", [])[1:] if s.get("start_step") is not None
    ]
    columns = 2 if len(series) > 3 else 1
    rows = max(1, math.ceil(len(series) / columns))
    figure = Figure(figsize=(6 * columns, 2.6 * rows + 0.6), dpi=100)
    FigureCanvasAgg(figure)
    title = f"{run_dir.name}: {report.get('status')}"
    figure.suptitle(title)
    if not series:
        axes = figure.add_subplot(1, 1, 1)
        axes.text(0.5, 0.5, "no metrics logged", ha="center", va="center")
        axes.set_axis_off()
    for index, (name, steps, values) in enumerate(series):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.plot(steps, values, linewidth=1.2)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        for number, step in enumerate(resumes):
            axes.axvline(
                step,
                color="tab:red",
                linestyle="--",
                linewidth=0.9,
                label="resumed" if number == 0 else None,
            )
        if resumes and index == 0:
            axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _numeric_series(history: list[dict[str, Any]]) -> list[tuple[str, list[int], list[float]]]:
    series = []
    for name in _metric_names(history):
        points = [(r["step"], float(r[name])) for r in history if _is_number(r.get(name))]
        if len(points) > MAX_PLOT_POINTS:  # keep the drawing fast; the last point stays
            stride = math.ceil(len(points) / MAX_PLOT_POINTS)
            points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
        if points:
            series.append((name, [p[0] for p in points], [p[1] for p in points]))
    return series


# -- command line -----------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``killsafe report DIR``."""
    parser.add_argument(
        "directory",
        metavar="DIR|URL",
        help="the run directory, or its mirror's URL (s3://bucket/exp: run files under run/)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--csv", metavar="PATH", help="also export history.jsonl as CSV to PATH ('-' for stdout)"
    )
    writes = parser.add_mutually_exclusive_group()
    writes.add_argument(
        "--write",
        action="store_true",
        help="also (re)write report.txt, report.json and report.png in DIR",
    )
    writes.add_argument(
        "--png-only",
        action="store_true",
        help="only (re)draw report.png in DIR from its report.json; print nothing "
        "(what a run starts at its exit)",
    )
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Print the report of ``args.directory`` (a run directory or a mirror's URL);
    0 on success, 2 on bad input."""
    url = args.directory.rstrip("/") if storage.is_url(args.directory) else None
    if url is not None and (args.write or args.png_only):
        flag = "--write" if args.write else "--png-only"
        sys.stderr.write(
            f"killsafe report: error: {flag} writes into a run directory; {url} is a mirror, "
            "read-only here (drop the flag, or give the run directory)\n"
        )
        return 2
    if args.png_only:
        return _draw_png_cli(args.directory)
    try:
        if url is not None:
            with mirrored_run_copy(url) as copy:
                report = build_report(copy, checkpoints_at=url)
                report["run_dir"] = url
                _export_csv(args, copy)
        else:
            report = write_report(args.directory) if args.write else build_report(args.directory)
            _export_csv(args, args.directory)
    except (KillsafeError, OSError) as exc:
        sys.stderr.write(f"killsafe report: error: {exc}\n")
        return 2
    if args.csv == "-":
        return 0
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(format_text(report))
    return 0


def _export_csv(args: argparse.Namespace, run_dir: str | os.PathLike[str]) -> None:
    """``--csv PATH``: the history of ``run_dir`` as CSV, to PATH or stdout (``-``)."""
    if not args.csv:
        return
    records = read_history(run_dir)
    if args.csv == "-":
        sys.stdout.write(csv_text(records))
    else:
        write_csv(records, args.csv)


def _draw_png_cli(directory: str) -> int:
    try:
        draw_report_png(directory)
    except ImportError:
        sys.stderr.write(f"killsafe report: error: report.png not drawn: {_NO_MATPLOTLIB}\n")
        return 2
    except (KillsafeError, OSError) as exc:
        sys.stderr.write(f"killsafe report: error: {exc}\n")
        return 2
    return 0
