"""The medium under the store: bytes at keys on a local disk, in memory, or in a bucket.

``open(location)`` picks the backend from a path or URL::

    runs/exp/checkpoints, file:///abs/dir   LocalBackend (POSIX files)
    memory://NAME/prefix                    MemoryBackend (this process, shared by NAME)
    s3://bucket/prefix, gs://…, az://…       ObjectBackend (pip install 'killsafe[s3]')

Every backend implements ``Backend`` (see ``killsafe.storage.base``). The
object-store client is imported only when an object-store URL is opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from killsafe.errors import InvalidKey, KeyExists, KeyNotFound, StorageError
from killsafe.storage.base import (
    Backend,
    BytesLike,
    Capabilities,
    ObjectInfo,
    Sink,
    Source,
    read_bytes,
    validate_key,
    write_bytes,
)
from killsafe.storage.local import LocalBackend
from killsafe.storage.memory import MemoryBackend

__all__ = [
    "Backend",
    "BytesLike",
    "Capabilities",
    "InvalidKey",
    "KeyExists",
    "KeyNotFound",
    "LocalBackend",
    "MemoryBackend",
    "ObjectInfo",
    "Sink",
    "Source",
    "StorageError",
    "is_url",
    "local_directory",
    "open",
    "read_bytes",
    "validate_key",
    "write_bytes",
]

OBJECT_SCHEMES = ("s3", "gs", "az")


def is_url(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` names a non-local medium (``memory://``, ``s3://``, ...)."""
    scheme = urlsplit(os.fspath(location)).scheme
    return scheme in ("memory", *OBJECT_SCHEMES)


def local_directory(location: str | os.PathLike[str]) -> Path:
    """The directory a path or a ``file://`` URL names (for a path, as given).

    Raises ``InvalidKey`` for a URL of an unknown scheme (``gcs://``, ``s3a://``),
    which would otherwise become a local directory named ``gcs:``. Call it for
    what ``is_url`` says is not a URL.
    """
    text = os.fspath(location)
    scheme = urlsplit(text).scheme
    if scheme == "file" or (len(scheme) > 1 and "://" in text):
        backend = open(text)  # InvalidKey unless a file:// URL
        assert isinstance(backend, LocalBackend)
        return backend.root
    return Path(text)


def open(location: str | os.PathLike[str], **options: Any) -> Backend:
    """The backend for a path, ``file://``, ``memory://``, ``s3://``, ``gs://`` or ``az://`` URL.

    ``options`` go to the object-store backend (``part_size``,
    ``concurrency``, ``max_retries``, ``backoff``, ``retry_timeout``).
    Raises ``InvalidKey`` for an unknown scheme or a malformed URL.
    """
    text = os.fspath(location)
    parts = urlsplit(text)
    if parts.scheme in OBJECT_SCHEMES:
        from killsafe.storage.objects import ObjectBackend

        return ObjectBackend(text, **options)
    if options:
        raise InvalidKey(f"options {sorted(options)} apply to object-store URLs only, not {text}")
    if parts.scheme == "memory":
        if not parts.netloc:
            raise InvalidKey(f"{text!r} names no memory area; use memory://NAME/prefix")
        return MemoryBackend(parts.netloc, parts.path)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidKey(f"{text!r} names a remote host; file:// URLs must be local")
        return LocalBackend(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive, a path
        raise InvalidKey(
            f"unknown storage scheme {parts.scheme!r} in {text!r}; use a path, "
            "file://, memory://, s3://, gs:// or az://"
        )
    return LocalBackend(text)
