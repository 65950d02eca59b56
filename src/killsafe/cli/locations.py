"""Command-line arguments that name a place: a local path, or an object-store URL.

``path_or_url`` is the argparse type (a URL stays text: ``Path`` would fold
its ``//``). ``open_checkpoint`` reads one checkpoint's manifest from either
medium and returns how to read its values, so ``inspect`` and ``diff`` do
not ask which medium they have.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from killsafe import storage
from killsafe.errors import ConfigError, InvalidKey

Place = Path | str
"""A local path, or a URL (``s3://bucket/prefix``, ``memory://…``)."""


def path_or_url(text: str) -> Place:
    """The argparse type of a place: a URL as given, a ``file://`` URL or a path as a
    path; a URL of another scheme (``gcs://``) is bad input, not a directory ``gcs:``."""
    if storage.is_url(text):
        return text.rstrip("/")
    try:
        return storage.local_directory(text)
    except InvalidKey as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def is_url(place: Place) -> bool:
    return isinstance(place, str)


@dataclass
class Checkpoint:
    """One checkpoint opened for reading: where it is, its checked manifest, its values."""

    where: str
    manifest: dict[str, Any]
    read: Callable[[dict[str, Any]], Any]  # the tree a (narrowed) manifest describes


def split_url(url: str) -> tuple[str, str]:
    """``s3://b/p/step-000005`` -> (``s3://b/p``, ``step-000005``)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name.startswith("step-") or "://" not in parent:
        raise ConfigError(
            f"{url} is not a checkpoint URL; give one such as s3://bucket/prefix/step-000100 "
            "(`killsafe list URL` shows them)"
        )
    return parent, name


def open_url_checkpoint(url: str) -> Checkpoint:
    """The checkpoint at ``url`` (``.../step-000100``) on an object store."""
    from killsafe.format.keyed import read_manifest_at, read_tree_at

    parent, name = split_url(url)
    backend = storage.open(parent)
    where = f"{backend.url}{name}"
    manifest = read_manifest_at(backend, f"{name}/manifest.json", where)
    return Checkpoint(where, manifest, lambda m: read_tree_at(backend, name, m, where))


def open_local_checkpoint(path: Path, manifest: dict[str, Any]) -> Checkpoint:
    from killsafe.format import read_tree

    return Checkpoint(str(path), manifest, lambda m: read_tree(path, m, mmap=True))
