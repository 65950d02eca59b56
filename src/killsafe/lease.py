"""One writer per store, on any medium: a lease object made with a create-only put.

Object stores have no ``flock``. A writer instead holds a *lease*: a small
JSON object at ``<prefix><generation>.json`` naming its host, pid, a random
token and when it expires. Generations only grow, and each one is taken
with ``create_if_absent``, so of any writers racing for the same generation
exactly one wins; the holder is the writer of the highest generation.

- ``acquire()`` reads the highest generation. If its holder is alive (not
  released, not expired, and, on this host, its pid still running), it
  raises ``StoreLocked`` naming that host and pid, unless the holder names
  the same ``owner`` from another host: the same writer started again on a
  new machine (a run resumed after its node was lost) takes over at once
  instead of waiting for the lost node's lease to expire (the lost node,
  should it still run, never takes it back that way). Otherwise it
  creates the next generation, and then deletes the older ones.
- ``renew()`` (every ``ttl / 3`` seconds from a background thread after
  ``start_renewing()``) rewrites the holder's own object with a new expiry,
  after checking that no higher generation exists. A holder that finds one
  has lost the lease: ``check()`` then raises ``StoreLocked``.
- ``release()`` marks the object released instead of deleting it, so the
  generation count never goes back and a stale holder can never mistake a
  newer lease for its own.

Expiry is judged by the reader's clock against the holder's written
expiry, so hosts' clocks must agree to well within ``ttl`` (NTP does).
A writer killed on this host is taken over at once (its pid is gone);
one on another host, once its lease has expired. "This host" is the host
name and the pid namespace: another container of the pod (the same host
name, pids of its own) is another host.

This module uses only the ``Backend`` protocol and knows nothing of
checkpoints beyond the ``StoreLocked`` error it raises.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from types import TracebackType

from killsafe.errors import (
    ConfigError,
    KeyExists,
    KeyNotFound,
    KillsafeError,
    StoreLocked,
)
from killsafe.host import pid_alive, pid_namespace
from killsafe.storage import Backend, read_bytes, validate_key, write_bytes

__all__ = ["Lease", "LeaseRecord"]

log = logging.getLogger("killsafe.lease")

_GENERATION_DIGITS = 12
_KEY_PATTERN = re.compile(rf"(\d{{{_GENERATION_DIGITS}}})\.json$")


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease object holds: who holds it, until when (epoch seconds), and whether
    it was given back."""

    generation: int
    host: str
    pid: int
    token: str
    expires: float
    released: bool = False
    owner: str = ""  # what the writer writes for (a run directory); "" when unsaid
    pidns: str = ""  # the holder's pid namespace (host.pid_namespace); "" when unknown

    def to_bytes(self) -> bytes:
        """The object's bytes: one JSON document."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        """Parse an object written by ``to_bytes``; raises ``ValueError`` when malformed."""
        raw = json.loads(data)
        return cls(
            generation=int(raw["generation"]),
            host=str(raw["host"]),
            pid=int(raw["pid"]),
            token=str(raw["token"]),
            expires=float(raw["expires"]),
            released=bool(raw.get("released", False)),
            owner=str(raw.get("owner", "")),
            pidns=str(raw.get("pidns", "")),
        )


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """The write lease of the store at ``backend`` (objects under ``prefix``).

    ``ttl`` is how long a lease lasts without renewal; ``owner`` names what
    the writer writes for (see the module doc: the same owner on another
    host takes over); ``clock`` (epoch seconds) and ``host``/``pid`` may be
    replaced in tests. Use as a context manager (acquire, renew in the
    background, release), or call the methods. Thread-safe.

    Example::

        with Lease(storage.open("memory://demo")) as lease:
            ...              # write; call lease.check() before each commit
    """

    def __init__(
        self,
        backend: Backend,
        prefix: str = "lease/",
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
        pid: int | None = None,
        owner: str = "",
    ) -> None:
        if ttl <= 0:
            raise ConfigError(f"lease ttl must be positive seconds, got {ttl!r}")
        if not prefix.endswith("/"):
            raise ConfigError(f"lease prefix {prefix!r} must end with '/'")
        validate_key(prefix[:-1])
        self.backend = backend
        self.prefix = prefix
        self.ttl = ttl
        self.clock = clock
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.pidns = pid_namespace()
        self.owner = owner
        self.held: LeaseRecord | None = None
        self._lost: LeaseRecord | None = None
        self._taken_over = False  # another writer took this one's lease: it is the lost node
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _key(self, generation: int) -> str:
        return f"{self.prefix}{generation:0{_GENERATION_DIGITS}d}.json"

    def _generations(self) -> list[int]:
        found = (_KEY_PATTERN.search(info.key) for info in self.backend.list(self.prefix))
        return sorted(int(match.group(1)) for match in found if match)

    def _read(self, generation: int) -> LeaseRecord | None:
        try:
            return LeaseRecord.from_bytes(read_bytes(self.backend, self._key(generation)))
        except KeyNotFound:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed lease object %s", self._key(generation))
            return None

    def is_live(self, record: LeaseRecord) -> bool:
        """True when ``record``'s holder may still write."""
        if record.released or self.clock() >= record.expires:
            return False
        return not self._here(record) or pid_alive(record.pid)

    def _here(self, record: LeaseRecord) -> bool:
        """Whether ``record``'s holder ran on this host, in this pid namespace: only
        then does its pid say whether it lives."""
        return record.host == self.host and record.pidns == self.pidns

    def _resumes(self, record: LeaseRecord) -> bool:
        """Whether this writer is ``record``'s owner started again on another host.

        On the holder's own host its pid says whether it lives; elsewhere a
        live lease of the same owner is that owner's lost node. A writer whose
        lease was taken over is that lost node, still running: it never takes
        the lease back this way (the two would take it from each other).
        """
        return (
            bool(self.owner)
            and not self._taken_over
            and record.owner == self.owner
            and not self._here(record)
        )

    def _locked(self, record: LeaseRecord) -> StoreLocked:
        where = record.host
        if record.host == self.host and not self._here(record):
            where += " (another container: pids of its own)"
        return StoreLocked(
            f"{self.backend.url} is locked by pid {record.pid} on {where} "
            f"(lease until {_when(record.expires)}); stop that process, or wait for "
            "its lease to expire"
        )

    def holder(self) -> LeaseRecord | None:
        """The record of the highest generation (live or not), or None when there is none."""
        generations = self._generations()
        return self._read(generations[-1]) if generations else None

    def acquire(self) -> LeaseRecord:
        """Take the lease, or raise ``StoreLocked`` naming the live holder."""
        with self._lock:
            generations = self._generations()
            newest = self._read(generations[-1]) if generations else None
            if newest is not None and self.is_live(newest):
                if not self._resumes(newest):
                    raise self._locked(newest)
                log.warning(
                    "taking over the lease on %s from pid %d on %s: the same %s, started here",
                    self.backend.url,
                    newest.pid,
                    newest.host,
                    self.owner,
                )
            generation = generations[-1] + 1 if generations else 0
            record = LeaseRecord(
                generation=generation,
                host=self.host,
                pid=self.pid,
                pidns=self.pidns,
                token=uuid.uuid4().hex,
                expires=self.clock() + self.ttl,
                owner=self.owner,
            )
            try:
                self.backend.create_if_absent(self._key(generation), record.to_bytes())
            except KeyExists:
                winner = self._read(generation)
                if winner is None:
                    raise StoreLocked(
                        f"{self.backend.url}: another writer took the lease at the same "
                        "moment; try again"
                    ) from None
                raise self._locked(winner) from None
            self.held, self._lost = record, None
            self._delete_older(generation)
            log.info("lease %s taken (generation %d)", self._key(generation), generation)
            return record

    def _delete_older(self, generation: int) -> None:
        for older in self._generations():
            if older < generation:
                self.backend.delete(self._key(older))

    def renew(self) -> LeaseRecord:
        """Extend the held lease by ``ttl``; raises ``StoreLocked`` if it was taken over."""
        with self._lock:
            held = self._require_held()
            newest = self._generations()
            if newest and newest[-1] > held.generation:
                self._lose(newest[-1])
                raise self._lost_error()
            renewed = replace(held, expires=self.clock() + self.ttl)
            write_bytes(self.backend, self._key(held.generation), renewed.to_bytes())
            self.held = renewed
            return renewed

    def _require_held(self) -> LeaseRecord:
        if self._lost is not None:
            raise self._lost_error()
        if self.held is None:
            raise StoreLocked(f"{self.backend.url}: the lease is not held; acquire it first")
        return self.held

    def _lose(self, generation: int) -> None:
        held = self.held
        self._lost = self._read(generation) or held
        self._taken_over = True
        self.held = None
        log.warning("lease on %s was taken over (generation %d)", self.backend.url, generation)

    def _lost_error(self) -> StoreLocked:
        lost = self._lost
        assert lost is not None
        if lost.pid == self.pid and self._here(lost):
            return StoreLocked(f"{self.backend.url}: this writer's lease expired; start again")
        return self._locked(lost)

    def check(self) -> None:
        """Raise ``StoreLocked`` unless this writer still holds an unexpired lease.

        Call it just before a commit: it reads the storage, so a takeover by
        another writer is seen.
        """
        with self._lock:
            held = self._require_held()
            if self.clock() >= held.expires:
                self._lost, self.held = held, None
                raise self._lost_error()
            newest = self._generations()
            if not newest or newest[-1] != held.generation:
                self._lose(newest[-1] if newest else held.generation)
                raise self._lost_error()

    def release(self) -> None:
        """Stop renewing and give the lease back (it can be taken at once)."""
        self.stop_renewing()
        with self._lock:
            held, self.held = self.held, None
            if held is None:
                return
            try:
                newest = self._generations()
                if newest and newest[-1] == held.generation:
                    released = replace(held, released=True)
                    write_bytes(self.backend, self._key(held.generation), released.to_bytes())
            except KillsafeError as exc:
                log.warning("could not release lease on %s: %s", self.backend.url, exc)

    def start_renewing(self) -> None:
        """Renew every ``ttl / 3`` seconds in a daemon thread until released."""
        if self._renewer is not None:
            return
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew_loop, name="killsafe-lease", daemon=True
        )
        self._renewer.start()

    def stop_renewing(self) -> None:
        """Stop the renewing thread, if any."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            self._stop.set()
            renewer.join()

    def _renew_loop(self) -> None:
        # Runs until stop_renewing(): a writer that lost its lease may take it
        # again (acquire), and is renewed again then.
        while not self._stop.wait(self.ttl / 3):
            if self.held is None:
                continue
            try:
                self.renew()
            except StoreLocked as exc:
                log.warning("%s", exc)
            except KillsafeError as exc:  # transient: try again next period
                log.warning("could not renew lease on %s: %s", self.backend.url, exc)

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
