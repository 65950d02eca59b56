"""One way to show a byte count, shared by the command line, the report and the run.

The dashboard's ``fmtBytes`` (server/static/app.js) is its copy and gives the
same strings.
"""

from __future__ import annotations

__all__ = ["format_size"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_size(nbytes: float | None) -> str:
    """``512 B``, ``907.2 KiB``, ``1.2 GiB`` (binary units, one decimal); ``-`` when unknown."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"
