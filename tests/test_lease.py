"""One writer per store through a lease object: races, expiry, takeover, killed holders.

Time is a fake clock where expiry matters, so no test waits for a lease to
run out. Killed holders are real processes killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from killsafe import storage
from killsafe.errors import StoreLocked
from killsafe.lease import Lease, LeaseRecord
from killsafe.storage import Backend, write_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        opened = storage.open(f"memory://lease-{uuid.uuid4().hex}")
    elif request.param == "local":
        opened = storage.open(tmp_path / "store")
    else:
        opened = storage.open(request.getfixturevalue("s3_url"))
    yield opened
    opened.close()


def _lease(backend: Backend, clock: FakeClock, host: str, pid: int = 4242) -> Lease:
    return Lease(backend, ttl=30.0, clock=clock, host=host, pid=pid)


def test_a_second_writer_is_refused_with_the_holders_host_and_pid(
    backend: Backend, clock: FakeClock
) -> None:
    first = _lease(backend, clock, "node-a", pid=111)
    held = first.acquire()
    assert held.generation == 0 and first.holder() == held
    with pytest.raises(StoreLocked) as caught:
        _lease(backend, clock, "node-b", pid=222).acquire()
    message = str(caught.value)
    assert "pid 111 on node-a" in message and "\n" not in message
    first.check()


def test_an_expired_lease_is_taken_over_and_the_old_holder_learns_it(
    backend: Backend, clock: FakeClock
) -> None:
    old = _lease(backend, clock, "node-a", pid=111)
    old.acquire()
    clock.now += 20
    old.renew()  # extends to now + 30
    clock.now += 29
    with pytest.raises(StoreLocked):
        _lease(backend, clock, "node-b", pid=222).acquire()
    clock.now += 2
    new = _lease(backend, clock, "node-b", pid=222)
    assert new.acquire().generation == 1
    with pytest.raises(StoreLocked, match="pid 222 on node-b"):
        old.renew()
    with pytest.raises(StoreLocked, match="pid 222 on node-b"):
        old.check()
    new.check()
    keys = [info.key for info in backend.list("lease/")]
    assert keys == ["lease/000000000001.json"]


def test_the_same_owner_started_on_another_host_takes_over_a_live_lease(
    backend: Backend, clock: FakeClock
) -> None:
    lost = Lease(backend, ttl=30.0, clock=clock, host="node-a", pid=111, owner="/runs/exp")
    lost.acquire()
    other_run = Lease(backend, ttl=30.0, clock=clock, host="node-b", pid=222, owner="/runs/b")
    with pytest.raises(StoreLocked, match="pid 111 on node-a"):
        other_run.acquire()
    with pytest.raises(StoreLocked, match="pid 111 on node-a"):
        Lease(backend, ttl=30.0, clock=clock, host="node-b", pid=222).acquire()  # no owner said
    resumed = Lease(backend, ttl=30.0, clock=clock, host="node-b", pid=333, owner="/runs/exp")
    taken = resumed.acquire()  # the lost node's lease has not expired: taken over at once
    assert taken.generation == 1 and taken.owner == "/runs/exp"
    with pytest.raises(StoreLocked, match="pid 333 on node-b"):
        lost.check()  # were node-a still alive, it would commit nothing more


def test_the_same_owner_on_the_holders_own_host_waits_for_its_pid(
    backend: Backend, clock: FakeClock
) -> None:
    live = Lease(backend, ttl=30.0, clock=clock, host="node-a", pid=os.getpid(), owner="/r")
    live.acquire()
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()} on node-a"):
        Lease(backend, ttl=30.0, clock=clock, host="node-a", pid=1, owner="/r").acquire()


def test_a_holder_that_could_not_renew_in_time_stops_itself(
    backend: Backend, clock: FakeClock
) -> None:
    lease = _lease(backend, clock, "node-a")
    lease.acquire()
    clock.now += 31
    with pytest.raises(StoreLocked, match="lease expired"):
        lease.check()


def test_a_released_lease_is_free_at_once_and_generations_only_grow(
    backend: Backend, clock: FakeClock
) -> None:
    for expected in range(3):
        lease = _lease(backend, clock, f"node-{expected}")
        assert lease.acquire().generation == expected
        lease.release()
        lease.release()
    assert [info.key for info in backend.list("lease/")] == ["lease/000000000002.json"]


def test_a_malformed_lease_object_does_not_block_the_store(
    backend: Backend, clock: FakeClock
) -> None:
    write_bytes(backend, "lease/000000000007.json", b"not json")
    assert _lease(backend, clock, "node-a").acquire().generation == 8


def test_racing_writers_have_exactly_one_winner(backend: Backend, clock: FakeClock) -> None:
    results: list[str] = []
    barrier = threading.Barrier(5)

    def contend(n: int) -> None:
        lease = _lease(backend, clock, f"node-{n}", pid=1000 + n)
        barrier.wait()
        try:
            lease.acquire()
            results.append("won")
        except StoreLocked:
            results.append("locked")

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["locked"] * 4 + ["won"]
    holder = _lease(backend, clock, "observer").holder()
    assert holder is not None and holder.host.startswith("node-")


def test_the_context_manager_renews_in_the_background_and_releases(backend: Backend) -> None:
    before = set(threading.enumerate())  # other tests' stores may still hold leases
    with Lease(backend, ttl=0.3) as lease:
        assert lease.held is not None
        first_expiry = lease.held.expires
        # renew() is what the thread calls; calling it here too is safe.
        assert lease.renew().expires >= first_expiry
        (renewer,) = [t for t in set(threading.enumerate()) - before if t.name == "killsafe-lease"]
    assert not renewer.is_alive()
    record = Lease(backend).holder()
    assert isinstance(record, LeaseRecord) and record.released


def test_a_lease_taken_again_after_it_lapsed_is_renewed_again(
    backend: Backend, clock: FakeClock
) -> None:
    before = set(threading.enumerate())
    lease = Lease(backend, ttl=0.3, clock=clock, host="node-a", pid=111)
    lease.acquire()
    lease.start_renewing()
    clock.now += 1  # renewals missed: the lease lapsed, and its renewer stops
    with pytest.raises(StoreLocked, match="lease expired"):
        lease.check()
    renewers = [t for t in set(threading.enumerate()) - before if t.name == "killsafe-lease"]
    for renewer in renewers:
        renewer.join(timeout=5)
    taken = lease.acquire()  # nobody took it meanwhile: this writer takes it again
    lease.start_renewing()
    clock.now += 0.1
    try:
        for _ in range(100):  # the renewer rewrites the record every ttl / 3 s
            holder = lease.holder()
            if holder is not None and holder.expires > taken.expires:
                break
            threading.Event().wait(0.05)
        assert holder is not None and holder.expires > taken.expires
    finally:
        lease.release()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from killsafe import storage
    from killsafe.lease import Lease
    lease = Lease(storage.open(sys.argv[1]), ttl=3600)
    lease.acquire()
    print("holding", flush=True)
    time.sleep(600)
    """
)


def test_a_writer_killed_while_holding_the_lease_is_taken_over_at_once(
    backend: Backend,
) -> None:
    if isinstance(backend, storage.MemoryBackend):
        pytest.skip("a memory area lives in one process")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, backend.url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid} on "):
            Lease(backend, ttl=3600).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # The lease had an hour left, but its holder is gone from this host.
    successor = Lease(backend, ttl=3600)
    assert successor.acquire().generation == 1
    successor.release()


def _container_record(generation: int, pid: int, owner: str, clock: FakeClock) -> LeaseRecord:
    """A live lease of this host name written from another pid namespace (another
    container of the pod, or this one's killed predecessor)."""
    return LeaseRecord(
        generation=generation,
        host=socket.gethostname(),
        pid=pid,
        token=uuid.uuid4().hex,
        expires=clock() + 3600,
        owner=owner,
        pidns="pid:[1]",
    )


@pytest.mark.parametrize("pid", [1, os.getpid(), 2**22 + 7])  # ours, or none here
def test_a_live_lease_of_another_container_of_the_pod_is_not_judged_by_its_pid(
    backend: Backend, clock: FakeClock, pid: int
) -> None:
    # A sidecar's `killsafe prune` beside the training container: the same host
    # name, pids of its own. Whether its pid lives here says nothing.
    record = _container_record(4, pid, "runs/exp", clock)
    write_bytes(backend, "lease/000000000004.json", record.to_bytes())
    with pytest.raises(StoreLocked, match=f"pid {pid} on .*another container"):
        Lease(backend, ttl=60, clock=clock).acquire()


def test_the_same_run_restarted_in_its_container_takes_its_lease_over_at_once(
    backend: Backend, clock: FakeClock
) -> None:
    # The container restarted in its pod: same host name, a new pid namespace,
    # often the same pid (1); the run it writes for says it is the same writer.
    record = _container_record(2, 1, "runs/exp", clock)
    write_bytes(backend, "lease/000000000002.json", record.to_bytes())
    lease = Lease(backend, ttl=60, clock=clock, owner="runs/exp")
    assert lease.acquire().generation == 3
    lease.release()
