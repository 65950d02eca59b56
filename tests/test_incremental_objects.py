"""Incremental checkpoints on object media: pieces as objects, sweeps, SIGKILL on a real S3.

The same layout as on disk (``pieces/<xx>/<digest>.safetensors``, each a
valid safetensors object), shared by the checkpoints of one store prefix;
a save puts only the pieces the prefix lacks, and the sweep deletes a
piece only when no committed manifest names it.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import killsafe
from killsafe import format as fmt
from killsafe import storage
from killsafe.errors import CorruptCheckpoint
from killsafe.format.pieces import PIECE_SIZE, piece_digest, piece_header
from killsafe.storage.testserver import LocalS3Server

PIECE = PIECE_SIZE


def piece_objects(store: killsafe.CheckpointStore) -> dict[str, int]:
    assert store.backend is not None
    return {info.key: info.size for info in store.backend.list(f"{fmt.PIECES_DIR}/")}


def referenced(store: killsafe.CheckpointStore) -> set[str]:
    names: set[str] = set()
    for info in store.list():
        names |= {fmt.piece_key(d) for d in store._catalog.manifest_of(info.path)["pieces"]}
    return names


def _shares_pieces_and_prunes(url: str) -> None:
    store = killsafe.CheckpointStore(url, incremental=True, keep_last=2)
    frozen = np.random.default_rng(0).random(PIECE // 4)  # two pieces, never changed
    for step in range(4):
        info = store.save({"frozen": frozen, "step": np.full(1000, step)}, step=step)
        assert info.added is not None
        assert (info.added < 100_000) == (step > 0), "only the first save writes the frozen part"
    assert [info.step for info in store.list()] == [2, 3]
    assert set(piece_objects(store)) == referenced(store)  # pruned pieces are gone
    for info in store.list():
        store.verify(info)
        loaded = store.load(info)
        assert np.array_equal(loaded["frozen"], frozen) and loaded["step"][0] == info.step
    store.delete(3, force=True)
    assert set(piece_objects(store)) == referenced(store)
    assert np.array_equal(store.load(2)["frozen"], frozen)  # the other one still loads alone
    store.close()


def test_memory_store_shares_pieces_and_sweeps_unreferenced_ones() -> None:
    _shares_pieces_and_prunes(f"memory://incremental-{uuid.uuid4().hex}")


def test_s3_store_shares_pieces_and_sweeps_unreferenced_ones(s3_url: str) -> None:
    _shares_pieces_and_prunes(s3_url)


def test_a_store_opened_without_the_keyword_prunes_pieces_too() -> None:
    url = f"memory://plain-prune-{uuid.uuid4().hex}"
    with killsafe.CheckpointStore(url, incremental=True) as store:
        for step in range(3):
            store.save({"own": np.full(PIECE // 8, step, dtype=np.float64)}, step=step)
        assert len(piece_objects(store)) == 3
    with killsafe.CheckpointStore(url, keep_last=1) as plain:  # as `killsafe prune` opens it
        plain.prune()
        assert [info.step for info in plain.list()] == [2]
        assert set(piece_objects(plain)) == referenced(plain) and len(referenced(plain)) == 1


def test_a_reopened_s3_store_puts_only_what_changed(s3_url: str) -> None:
    frozen = np.random.default_rng(1).random(PIECE // 8)
    with killsafe.CheckpointStore(s3_url, incremental=True) as store:
        store.save({"frozen": frozen, "step": 0}, step=0)
    with killsafe.CheckpointStore(s3_url, incremental=True) as store:  # another process's view
        info = store.save({"frozen": frozen, "step": 1}, step=1)
    assert info.added is not None and info.added < 10_000
    assert info.size > PIECE


def test_list_and_inspect_of_an_s3_store_show_the_bytes_added(s3_url: str) -> None:
    from cli_helpers import cli, cli_json

    frozen = np.random.default_rng(4).random(PIECE // 4)
    with killsafe.CheckpointStore(s3_url, incremental=True) as store:
        store.save({"frozen": frozen, "head": np.zeros(10)}, step=1)
        second = store.save({"frozen": frozen, "head": np.ones(10)}, step=2)
    listed = {row["step"]: row for row in cli_json("list", s3_url)["checkpoints"]}
    assert listed[2]["size"] == second.size and listed[2]["added"] == second.added
    assert listed[2]["added"] < 10_000 < frozen.nbytes <= listed[1]["added"]
    inspected = cli("inspect", f"{s3_url}/step-000002")
    assert inspected.returncode == 0, inspected.stderr
    assert "added" in inspected.stdout


def test_piece_objects_are_safetensors_named_by_their_bytes() -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    store = killsafe.CheckpointStore(f"memory://pieces-{uuid.uuid4().hex}", incremental=True)
    data = np.random.default_rng(2).integers(0, 255, PIECE + 7, dtype=np.uint8)
    store.save({"data": data}, step=1)
    assert store.backend is not None
    found = []
    for key in piece_objects(store):
        raw = bytes(storage.read_bytes(store.backend, key))
        payload = safetensors_numpy.load(raw)["data"]
        assert key == fmt.piece_key(piece_digest(payload.tobytes()))
        found.append(payload)
    assert np.array_equal(np.concatenate(sorted(found, key=len, reverse=True)), data)
    store.close()


@pytest.mark.parametrize("damage", ["flip", "missing", "truncated"])
def test_a_damaged_piece_object_is_caught(damage: str) -> None:
    store = killsafe.CheckpointStore(f"memory://damaged-{uuid.uuid4().hex}", incremental=True)
    shared = np.random.default_rng(3).random(PIECE // 8)
    store.save({"shared": shared, "own": np.zeros(PIECE // 8)}, step=1)
    store.save({"shared": shared, "own": np.ones(PIECE // 8)}, step=2)
    assert store.backend is not None
    manifests = [store._catalog.manifest_of(info.path) for info in store.list()]
    (own,) = set(manifests[1]["pieces"]) - set(manifests[0]["pieces"])
    key = fmt.piece_key(own)
    raw = bytearray(storage.read_bytes(store.backend, key))
    store.backend.delete(key)
    if damage == "flip":
        raw[len(piece_header(PIECE)) + 5] ^= 0xFF
        storage.write_bytes(store.backend, key, bytes(raw))
    elif damage == "truncated":
        storage.write_bytes(store.backend, key, bytes(raw[:-1]))
    with pytest.raises(CorruptCheckpoint) as caught:
        store.verify(f"{store.location}step-000002")  # by URL: a missing piece is not listed
    assert "\n" not in str(caught.value)
    latest = store.latest()
    assert latest is not None and latest.step == 1
    assert np.array_equal(store.load("latest")["shared"], shared)
    store.close()


# ---------------------------------------------------------------- SIGKILL on a real S3

KILLS = 12


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _wait_for_ready(path: Path, child: Any) -> None:
    deadline = time.monotonic() + 60
    while not _lines(path):
        assert child.is_alive(), "the writer died"
        assert time.monotonic() < deadline, "the writer never answered"
        time.sleep(0.005)


def test_sigkill_during_saves_and_prunes_on_s3_never_loses_a_piece(
    s3_server: LocalS3Server, s3_url: str, tmp_path: Path
) -> None:
    import object_writers

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["object_writers", "killsafe", "numpy", "obstore"])
    rng = random.Random(20)
    reader = killsafe.CheckpointStore(s3_url, incremental=True)
    committed = -1
    for kill in range(KILLS):
        report = tmp_path / f"writer-{kill}"
        child = context.Process(
            target=object_writers.save_incrementally_forever,
            args=(s3_url, s3_server.environment(), str(report)),
        )
        child.start()
        _wait_for_ready(report, child)
        child.join(rng.uniform(0.05, 0.8))
        child.kill()
        child.join()
        steps = [int(line) for line in _lines(report) if line.isdigit()]
        committed = max([committed, *steps])
        for info in reader.list():  # every listed checkpoint has all its pieces
            reader.verify(info)
            state = reader.load(info)
            assert state["own"][0] == info.step == state["step"]
        latest = reader.latest()
        if committed >= 0:
            assert latest is not None and latest.step >= committed, f"kill {kill}"
    assert committed > 0
    # The next writer takes the lease over and sweeps what the killed ones left.
    newest = reader.latest()
    assert newest is not None
    with killsafe.CheckpointStore(s3_url, incremental=True, keep_last=2) as store:
        store.save({"step": newest.step + 1}, step=newest.step + 1)  # may follow an unreported one
        assert set(piece_objects(store)) == referenced(store)


@pytest.fixture(autouse=True)
def _no_stray_children() -> Any:
    yield
    for child in multiprocessing.active_children():
        child.kill()
