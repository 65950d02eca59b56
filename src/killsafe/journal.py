"""An append-only journal of small states, compacted into checkpoints.

For state that changes often and must never be lost (a trading bot's
portfolio after every trade), writing a whole checkpoint directory per change
costs several fsyncs. A ``Journal`` makes each save one synchronous write
(``O_DSYNC``: write and fdatasync in one call) of a record appended to a log,
and every ``compact_every`` records folds the state into an ordinary checkpoint
of a ``CheckpointStore``::

    journal = Journal("runs/bot")
    replay = journal.replay()             # latest checkpoint + the records after it
    portfolio = replay.latest() or new_portfolio()
    ...
    journal.append(portfolio)             # durable when it returns
    if journal.compaction_due:
        journal.compact(portfolio)        # a checkpoint; older log segments deleted

Records may be whole states (then ``replay().latest()`` is the state) or
changes you apply yourself to ``replay().state`` in order.

On disk (``directory/``)::

    checkpoints/              a CheckpointStore: step = sequence number of the
                              last record the checkpoint includes
    journal/seg-000000000001.log
                              records from that sequence number on, each
                              ``magic, length, seq, xxh3-64(seq + payload), payload``

A record is valid when its magic, length, checksum and sequence number (one
more than the previous) all agree; replay stops at the first invalid one, so a
record torn by a crash or a power cut is ignored and overwritten by the next
append. Segments are preallocated with zeros in chunks so that an append does
not grow the file: ``fdatasync`` then has no file size to commit, which is
what makes a durable append about as cheap as one SQLite WAL commit.

Payloads are JSON with tagged values for what JSON lacks (bytes, tuples, sets,
dicts with int keys, numpy arrays and scalars, torch tensors): never pickle.
One process writes a journal at a time (a lock file, like the store's).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from killsafe.errors import (
    ConfigError,
    CorruptCheckpoint,
    SaveFailed,
    StoreLocked,
    UnsupportedState,
)
from killsafe.host import fsync_directory
from killsafe.rundir import CHECKPOINTS_DIR

__all__ = ["Journal", "JournalReplay", "decode_record", "encode_record"]

logger = logging.getLogger("killsafe")

MAGIC = b"RJ"
HEADER = struct.Struct("<2sIQQ")  # magic, payload length, sequence number, checksum
MAX_RECORD = 64 * 1024 * 1024
SEGMENT_DIR = "journal"
TAG = "__t"
O_DSYNC = getattr(os, "O_DSYNC", 0)
_datasync = getattr(os, "fdatasync", os.fsync)


# -- encoding ---------------------------------------------------------------


def encode_record(tree: Any) -> bytes:
    """A plain state tree as compact JSON bytes (tagged values for non-JSON types)."""
    try:
        encoded = _to_json(tree)
    except _Unsupported as exc:
        where = "record" + "".join(f"[{key!r}]" for key in reversed(exc.keys))
        raise UnsupportedState(f"{where}: {exc.args[0]}") from None
    return json.dumps(encoded, separators=(",", ":")).encode()


def decode_record(payload: bytes) -> Any:
    """The tree ``encode_record`` encoded (numpy arrays come back as numpy arrays)."""
    return _from_json(json.loads(payload))


class _Unsupported(Exception):
    """Raised inside the encoder; collects the keys on the way out (no cost on success)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.keys: list[Any] = []


_SCALARS = (type(None), bool, int, float, str)


def _to_json(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    key: Any = None
    try:
        if kind is dict:
            if TAG not in value and all(type(k) is str for k in value):
                out = {}
                for key, item in value.items():
                    out[key] = item if type(item) in _SCALARS else _to_json(item)
                return out
            return _dict_json(value)
        if kind is list or kind is tuple:
            items = []
            for key, item in enumerate(value):  # noqa: B007 (key read in except)
                items.append(item if type(item) in _SCALARS else _to_json(item))
            return items if kind is list else {TAG: "tuple", "items": items}
    except _Unsupported as exc:
        exc.keys.append(key)
        raise
    return _other_json(value)


def _dict_json(value: dict[Any, Any]) -> dict[str, Any]:
    items = []
    for k, v in value.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise _Unsupported(f"dict key {k!r} of type {type(k).__name__}; use str or int keys")
        try:
            items.append([k, _to_json(v)])
        except _Unsupported as exc:
            exc.keys.append(k)
            raise
    return {TAG: "dict", "items": items}


def _other_json(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        kind = "set" if isinstance(value, set) else "frozenset"
        return {TAG: kind, "items": sorted((_to_json(v) for v in value), key=repr)}
    if isinstance(value, (bytes, bytearray)):
        return {TAG: "bytes", "b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (dict, list)):  # subclasses
        return _to_json(dict(value) if isinstance(value, dict) else list(value))
    if isinstance(value, (bool, int, float, str)):  # subclasses (IntEnum, ...)
        return value
    if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        return _to_json(value.state_dict())
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return _array_json(value, "ndarray")
        if isinstance(value, numpy.generic):
            return value.item()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return _array_json(value.detach().cpu().numpy(), "tensor")
    raise _Unsupported(
        f"{type(value).__name__} cannot be journaled; use plain values, "
        "numpy arrays, torch tensors or an object with state_dict()"
    )


def _array_json(array: Any, kind: str) -> dict[str, Any]:
    if array.dtype.hasobject:
        raise _Unsupported("array of Python objects; use a numeric dtype")
    import numpy

    data = numpy.ascontiguousarray(array)
    return {
        TAG: kind,
        "dtype": data.dtype.str,
        "shape": list(data.shape),
        "b64": base64.b64encode(data.tobytes()).decode(),
    }


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG)
    if kind is None:
        return {k: _from_json(v) for k, v in value.items()}
    if kind == "dict":
        return {k: _from_json(v) for k, v in value["items"]}
    if kind == "tuple":
        return tuple(_from_json(v) for v in value["items"])
    if kind == "set":
        return {_from_json(v) for v in value["items"]}
    if kind == "frozenset":
        return frozenset(_from_json(v) for v in value["items"])
    if kind == "bytes":
        return base64.b64decode(value["b64"])
    if kind in ("ndarray", "tensor"):
        import numpy

        raw = base64.b64decode(value["b64"])
        array = numpy.frombuffer(raw, dtype=numpy.dtype(value["dtype"])).reshape(value["shape"])
        array = array.copy()
        if kind == "tensor":
            import torch

            return torch.from_numpy(array)
        return array
    raise CorruptCheckpoint(f"journal record: unknown tag {kind!r}; written by a newer version?")


def _checksum(seq: int, payload: bytes) -> int:
    h = xxhash.xxh3_64()
    h.update(seq.to_bytes(8, "little"))
    h.update(payload)
    return h.intdigest()


# -- the journal ------------------------------------------------------------


@dataclass
class JournalReplay:
    """What a journal holds: the compacted ``state`` and the ``records`` after it.

    ``state`` is ``None`` before the first compaction; ``seq`` is the sequence
    number of the last record (0 when empty); ``checkpoint_seq`` the one the
    state includes.
    """

    state: Any
    records: list[Any] = field(default_factory=list)
    seq: int = 0
    checkpoint_seq: int = 0

    def latest(self) -> Any:
        """The newest whole state, when records are whole states: last record, else ``state``."""
        return self.records[-1] if self.records else self.state


class Journal:
    """An append-only, checksummed record log compacted into a ``CheckpointStore``.

    Args:
        directory: where ``journal/`` and ``checkpoints/`` live (created if missing).
        compact_every: ``compaction_due`` turns true after this many records
            since the last checkpoint.
        keep_last: checkpoints the store keeps.
        preallocate: bytes by which a segment grows (zero-filled and synced
            ahead of the appends); 0 appends to a growing file instead.

    ``append`` is durable when it returns (one ``O_DSYNC`` write, or a write and
    an ``fdatasync`` where ``O_DSYNC`` is missing).
    Not thread-safe; one writing process at a time (``StoreLocked`` otherwise).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        compact_every: int = 1000,
        keep_last: int = 2,
        preallocate: int = 1 << 20,
    ) -> None:
        if compact_every < 1:
            raise ConfigError(f"Journal(compact_every={compact_every}): use a number >= 1")
        if preallocate < 0:
            raise ConfigError(f"Journal(preallocate={preallocate}): use a size >= 0")
        from killsafe.store import CheckpointStore

        self.directory = Path(directory)
        self.compact_every = compact_every
        self.preallocate = preallocate
        self.segments_dir = self.directory / SEGMENT_DIR
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock()
        self.store = CheckpointStore(self.directory / CHECKPOINTS_DIR, keep_last=keep_last)
        self._fd = -1
        self._offset = 0
        self._allocated = 0
        self._state: Any = None
        self._payloads: list[bytes] = []
        self._seq = 0
        self._checkpoint_seq = 0
        self._scan()
        self._open_tail()

    # -- public -------------------------------------------------------------

    @property
    def seq(self) -> int:
        """Sequence number of the last record appended (0 when none)."""
        return self._seq

    @property
    def records_since_checkpoint(self) -> int:
        """Records appended since the last checkpoint (replayed ones included)."""
        return self._seq - self._checkpoint_seq

    @property
    def compaction_due(self) -> bool:
        """Whether ``compact_every`` records were appended since the last checkpoint."""
        return self.records_since_checkpoint >= self.compact_every

    def replay(self) -> JournalReplay:
        """The latest checkpoint's state and the records after it, in order."""
        state = decode_record(self._state) if isinstance(self._state, bytes) else self._state
        records = [decode_record(p) for p in self._payloads]
        return JournalReplay(state, records, self._seq, self._checkpoint_seq)

    def append(self, record: Any) -> int:
        """Append ``record`` durably; returns its sequence number.

        Raises ``UnsupportedState`` (nothing written) for a value that cannot be
        encoded and ``SaveFailed`` when the disk refuses the write.
        """
        payload = encode_record(record)
        if len(payload) > MAX_RECORD:
            raise UnsupportedState(
                f"journal record of {len(payload)} bytes is over {MAX_RECORD}; "
                "save large states with CheckpointStore"
            )
        seq = self._seq + 1
        data = HEADER.pack(MAGIC, len(payload), seq, _checksum(seq, payload)) + payload
        try:
            self._ensure_room(len(data))
            written = os.pwrite(self._fd, data, self._offset)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            if not O_DSYNC:  # with O_DSYNC the write itself returned once durable
                _datasync(self._fd)
        except OSError as exc:
            raise SaveFailed(
                f"{self._segment_path(self._segment_start)}: journal append failed ({exc}); "
                "check free space and permissions"
            ) from exc
        self._offset += len(data)
        self._payloads.append(payload)
        self._seq = seq
        return seq

    def compact(self, state: Any) -> Any:
        """Checkpoint ``state`` (which must include every record so far); drop older segments.

        Returns the store's ``CheckpointInfo``. With no record since the last
        checkpoint there is nothing to fold: that checkpoint is returned as is.
        """
        seq = self._seq
        if seq == self._checkpoint_seq and seq > 0:
            return self.store.get(seq)
        info = self.store.save(state, step=seq, reason="compaction", metadata={"journal_seq": seq})
        # The checkpoint is committed before any segment goes: a crash in between
        # replays the checkpoint and skips the records it already includes.
        self._close_fd()
        self._segment_start = seq + 1
        self._offset = 0
        self._allocated = 0
        self._open_segment(self._segment_path(seq + 1))
        for path in self._segment_paths():
            if path != self._segment_path(seq + 1):
                path.unlink()
        fsync_directory(self.segments_dir)
        self._state = encode_record(state)  # a copy the caller cannot mutate
        self._payloads = []
        self._checkpoint_seq = seq
        return info

    def close(self) -> None:
        """Close the segment and the store and release the lock."""
        self._close_fd()
        self.store.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scanning -----------------------------------------------------------

    def _scan(self) -> None:
        info = self.store.latest()
        if info is not None:
            self._seq = self._checkpoint_seq = int(info.metadata.get("journal_seq", info.step))
            self._state = self.store.load(info)
        paths = self._segment_paths()
        self._segment_start = self._seq + 1
        self._tail_offset = 0
        for index, path in enumerate(paths):
            last = index == len(paths) - 1
            end = self._read_segment(path, last=last)
            if last:
                self._segment_start = _segment_seq(path)
                self._tail_offset = end

    def _read_segment(self, path: Path, *, last: bool) -> int:
        data = path.read_bytes()
        offset = 0
        expected = _segment_seq(path)
        while offset + HEADER.size <= len(data):
            magic, length, seq, checksum = HEADER.unpack_from(data, offset)
            start = offset + HEADER.size
            payload = data[start : start + length]
            if (
                magic != MAGIC
                or seq != expected
                or len(payload) != length
                or _checksum(seq, payload) != checksum
            ):
                break
            if seq > self._seq:
                self._payloads.append(payload)
                self._seq = seq
            expected += 1
            offset = start + length
        rest = data[offset:]
        if rest.strip(b"\0"):
            if not last:
                raise CorruptCheckpoint(
                    f"{path}: invalid record at byte {offset} before the last segment; "
                    "the journal was damaged: restore the file or remove it to lose its records"
                )
            logger.warning("%s: torn record at byte %d ignored (a crash mid-append)", path, offset)
        return offset

    # -- files --------------------------------------------------------------

    def _segment_path(self, first_seq: int) -> Path:
        return self.segments_dir / f"seg-{first_seq:012d}.log"

    def _segment_paths(self) -> list[Path]:
        return sorted(self.segments_dir.glob("seg-*.log"), key=_segment_seq)

    def _open_tail(self) -> None:
        path = self._segment_path(self._segment_start)
        self._open_segment(path)
        self._offset = self._tail_offset
        size = os.fstat(self._fd).st_size
        if size > self._offset:
            # Zero what a torn record left, so that a later scan sees clean space.
            os.pwrite(self._fd, bytes(size - self._offset), self._offset)
            _datasync(self._fd)
        self._allocated = size

    def _open_segment(self, path: Path) -> None:
        new = not path.exists()
        # O_DSYNC: each write returns once its data (and the size, if it grew) is
        # on stable storage, like write + fdatasync in one system call.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | O_DSYNC, 0o644)
        if new:
            fsync_directory(self.segments_dir)

    def _ensure_room(self, length: int) -> None:
        if self.preallocate == 0 or self._offset + length <= self._allocated:
            return
        grow = max(self.preallocate, length)
        os.pwrite(self._fd, bytes(grow), self._allocated)
        os.fsync(self._fd)
        self._allocated += grow

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _lock(self) -> int:
        path = self.directory / ".journal.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StoreLocked(
                f"{path}: another process writes this journal; stop it or use another directory"
            ) from exc
        return fd


def _segment_seq(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])
