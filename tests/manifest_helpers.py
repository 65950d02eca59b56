"""Edit a checkpoint's manifest the way a hostile writer would: valid checksum, bad content."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from killsafe import format as fmt


def edit_manifest(directory: Path, change: Any, *, reseal: bool = True) -> None:
    """Apply ``change(manifest)`` in place; ``reseal`` recomputes the manifest's checksum."""
    path = directory / fmt.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    if reseal and isinstance(manifest, dict):
        manifest[fmt.CHECKSUM_FIELD] = fmt.manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def each_hostile_manifest(directory: Path, changes: Iterable[Any]) -> Iterator[Any]:
    """For each change: the original manifest with that change alone, resealed (yields
    the change); the original is back afterwards."""
    path = directory / fmt.MANIFEST_NAME
    original = path.read_bytes()
    try:
        for change in changes:
            path.write_bytes(original)
            edit_manifest(directory, change)
            yield change
    finally:
        path.write_bytes(original)
