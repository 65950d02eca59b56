"""One writer per object-store store: the lease (``killsafe.lease``) behind the lock's seam.

Taken at the store's first mutating call, renewed in the background while
held, checked just before every commit (a writer whose lease expired or
was taken over commits nothing), given back at ``close``.
"""

from __future__ import annotations

from killsafe.lease import Lease
from killsafe.storage import Backend

__all__ = ["LEASE_PREFIX", "LeaseLock"]

LEASE_PREFIX = "lease/"


class LeaseLock:
    """The write lease of the store at ``backend``; same methods as ``StoreLock``."""

    fd: int | None = None  # no descriptor: a forked child holds nothing to drop

    def __init__(self, backend: Backend, ttl: float, owner: str = "") -> None:
        self.lease = Lease(backend, LEASE_PREFIX, ttl=ttl, owner=owner)

    @property
    def held(self) -> bool:
        return self.lease.held is not None

    def acquire(self) -> bool:
        """Take the lease unless held; True when it was taken now. Raises ``StoreLocked``."""
        if self.held:
            return False
        self.lease.acquire()
        self.lease.start_renewing()
        return True

    def check(self) -> None:
        """Raise ``StoreLocked`` unless the lease is still ours and unexpired."""
        self.lease.check()

    def release(self) -> None:
        """Give the lease back (it can be taken at once)."""
        self.lease.release()
