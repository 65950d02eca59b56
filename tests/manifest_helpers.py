"""Edit a checkpoint's manifest the way a hostile writer would: valid checksum, bad content."""

from __future__ import annotations

import json
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
