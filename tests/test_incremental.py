"""Incremental checkpoints: pieces shared between saves, sweeps, hostile pieces, SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from mirror_helpers import wait_for_upload

import killsafe
from killsafe import format as fmt
from killsafe.errors import ConfigError, CorruptCheckpoint
from killsafe.format.pieces import PIECE_SIZE, cut

PIECE = PIECE_SIZE


def pieces_on_disk(store_dir: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in (store_dir / fmt.PIECES_DIR).glob("*/*.safetensors")
    }


def referenced(info: killsafe.CheckpointInfo) -> set[str]:
    return set(fmt.read_manifest(info.path)["pieces"])


def test_a_tensor_is_cut_into_fixed_pieces_and_small_ones_are_packed() -> None:
    encoded = fmt.encode({"big": np.zeros(PIECE * 2 + 10, np.uint8), "a": b"x" * 100, "b": b"y"})
    pieces, spans = cut(encoded.entries)
    big = next(e.key for e in encoded.entries if e.nbytes > PIECE)
    assert [length for _, _, length in spans[big]] == [PIECE, PIECE, 10]
    small = [span for key, span in spans.items() if key != big]
    assert len({s[0][0] for s in small}) == 1  # both small entries share one piece
    assert sum(p.size for p in pieces) == encoded.nbytes


def test_a_change_in_one_region_writes_one_piece(tmp_path: Path) -> None:
    store = killsafe.CheckpointStore(tmp_path, incremental=True)
    weights = np.arange(PIECE, dtype=np.int32)  # four pieces
    first = store.save({"w": weights}, step=1)
    before = pieces_on_disk(tmp_path)
    weights[PIECE // 2] = -1  # inside the third piece
    second = store.save({"w": weights}, step=2)
    after = pieces_on_disk(tmp_path)
    assert len(after) == len(before) + 1
    assert second.added is not None and PIECE < second.added < PIECE + 64 * 1024
    assert len(referenced(first) & referenced(second)) == 3
    assert np.array_equal(store.load(2)["w"], weights)
    assert store.load(1)["w"][PIECE // 2] == PIECE // 2


def test_a_tensor_grown_at_its_end_writes_only_its_tail(tmp_path: Path) -> None:
    store = killsafe.CheckpointStore(tmp_path, incremental=True)
    buffer = np.random.default_rng(0).integers(0, 255, PIECE * 3 + 100, dtype=np.uint8)
    store.save({"buffer": buffer}, step=1)
    grown = np.concatenate([buffer, np.ones(PIECE // 4, np.uint8)])
    info = store.save({"buffer": grown}, step=2)
    tail = len(grown) - 3 * PIECE
    assert info.added is not None and tail <= info.added < tail + 64 * 1024
    assert np.array_equal(store.load(2)["buffer"], grown)
    assert np.array_equal(store.load(1)["buffer"], buffer)


def test_each_checkpoint_loads_alone_after_others_are_deleted(tmp_path: Path) -> None:
    store = killsafe.CheckpointStore(tmp_path, incremental=True, keep_last=2)
    frozen = np.random.default_rng(1).random(PIECE // 4)  # two pieces, never changed
    saved = {}
    for step in range(5):
        state = {"frozen": frozen, "adapter": np.full(1000, step, np.float32), "step": step}
        store.save(state, step=step)
        saved[step] = state
    assert [info.step for info in store.list()] == [3, 4]
    used = referenced(store.get(3)) | referenced(store.get(4))
    assert set(name.removesuffix(".safetensors") for name in pieces_on_disk(tmp_path)) == used
    store.delete(4, force=True)
    store.verify(3)
    loaded = store.load(3)
    assert np.array_equal(loaded["frozen"], frozen) and loaded["adapter"][0] == 3
    store.delete(3, force=True)
    assert pieces_on_disk(tmp_path) == {}


def test_the_saver_writes_incremental_checkpoints(tmp_path: Path) -> None:
    for snapshot in ("copy", "fork"):
        directory = tmp_path / snapshot
        store = killsafe.CheckpointStore(
            directory, incremental=True, snapshot=snapshot, keep_last=1
        )
        frozen = np.random.default_rng(2).random(PIECE // 8)
        for step in range(3):
            pending = store.save_async({"frozen": frozen, "x": np.full(10, step)}, step)
            assert pending is not None
            pending.wait()
        store.close()
        assert store.load()["x"][0] == 2 and np.array_equal(store.load()["frozen"], frozen)
        assert len(pieces_on_disk(directory)) == 2  # the frozen piece, the small pack


def test_incremental_is_refused_where_it_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="compression"):
        killsafe.CheckpointStore(tmp_path, incremental=True, compression="zstd")
    with pytest.raises(ConfigError, match="compression"):
        killsafe.CheckpointStore("memory://refused", incremental=True, compression="zstd")


@pytest.mark.parametrize("damage", ["flip", "missing", "truncated"])
def test_a_damaged_piece_makes_its_checkpoint_corrupt_and_the_previous_one_is_used(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = killsafe.CheckpointStore(tmp_path, incremental=True)
    shared = np.random.default_rng(3).random(PIECE // 8)
    store.save({"shared": shared, "own": np.zeros(PIECE // 8)}, step=1)
    store.save({"shared": shared, "own": np.ones(PIECE // 8)}, step=2)
    own = referenced(store.get(2)) - referenced(store.get(1))
    assert len(own) == 1
    piece = fmt.piece_path(tmp_path / fmt.PIECES_DIR, own.pop())
    others = {name: data for name, data in pieces_on_disk(tmp_path).items() if name != piece.name}
    if damage == "flip":
        data = bytearray(piece.read_bytes())
        data[-5] ^= 0xFF
        piece.write_bytes(bytes(data))
    elif damage == "missing":
        piece.unlink()
    else:
        piece.write_bytes(piece.read_bytes()[:-1])
    with pytest.raises(CorruptCheckpoint) as caught:
        store.verify(tmp_path / "step-000002")  # by path: a missing piece is not listed
    assert "\n" not in str(caught.value)
    with caplog.at_level(logging.WARNING, "killsafe"):
        latest = store.latest()
        loaded = store.load("latest")
    assert latest is not None and latest.step == 1
    assert np.array_equal(loaded["shared"], shared) and loaded["own"][0] == 0
    store.save({"shared": shared}, step=3)  # a later save and its sweep leave others alone
    store.prune()
    assert {n: d for n, d in pieces_on_disk(tmp_path).items() if n in others} == others


def test_a_flipped_byte_in_a_packed_piece_is_found_by_its_name(tmp_path: Path) -> None:
    store = killsafe.CheckpointStore(tmp_path, incremental=True)
    small = {f"bias{i}": np.full(1000, i, np.float32) for i in range(8)}  # one packed piece
    info = store.save(small, step=1)
    manifest = fmt.read_manifest(info.path)
    assert all("xxh3" not in row for row in manifest["tensors"]["entries"].values())
    (digest,) = manifest["pieces"]
    piece = fmt.piece_path(tmp_path / fmt.PIECES_DIR, digest)
    data = bytearray(piece.read_bytes())
    data[-1] ^= 0x01  # in the last entry's bytes: loading only the first still reads it all
    piece.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        store.verify(info)
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        store.load(info, subtree="bias0")
    assert store.load(info, verify=False)["bias0"][0] == 0


def _rewrite_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((path / fmt.MANIFEST_NAME).read_text())
    change(manifest)
    manifest[fmt.CHECKSUM_FIELD] = fmt.manifest_digest(manifest)
    (path / fmt.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def test_entry_checksums_of_earlier_manifests_are_still_checked(tmp_path: Path) -> None:
    store = killsafe.CheckpointStore(tmp_path, incremental=True)
    values = np.arange(PIECE // 4, dtype=np.float32)
    info = store.save({"values": values}, step=1)

    def add_sums(manifest: dict[str, Any]) -> None:  # as releases before hash-once wrote them
        for row in manifest["tensors"]["entries"].values():
            row["xxh3"] = xxhash.xxh3_64_hexdigest(values.tobytes())

    _rewrite_manifest(info.path, add_sums)
    store.verify(info)
    assert np.array_equal(store.load(info)["values"], values)

    def spoil(manifest: dict[str, Any]) -> None:
        for row in manifest["tensors"]["entries"].values():
            row["xxh3"] = "0" * 16

    _rewrite_manifest(info.path, spoil)
    with pytest.raises(CorruptCheckpoint, match="'values' fails its checksum"):
        store.verify(info)


def test_the_saved_pieces_are_safetensors_files(tmp_path: Path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    store = killsafe.CheckpointStore(tmp_path, incremental=True)
    data = np.random.default_rng(4).integers(0, 255, PIECE + 7, dtype=np.uint8)
    store.save({"data": data}, step=1)
    found = [
        safetensors_numpy.load_file(str(path))["data"]
        for path in (tmp_path / fmt.PIECES_DIR).glob("*/*.safetensors")
    ]
    assert sorted(map(len, found)) == [7, PIECE]
    assert np.array_equal(np.concatenate(sorted(found, key=len, reverse=True)), data)


WRITER = r"""
import sys, numpy as np, killsafe
store = killsafe.CheckpointStore(sys.argv[1], incremental=True, keep_last=2)
frozen = np.random.default_rng(0).random(1 << 19)  # 4 MiB, shared by every checkpoint
step = max((info.step for info in store.list()), default=-1) + 1
print("ready", flush=True)
while True:
    store.save({"frozen": frozen, "grown": np.arange(step * 100_000), "step": step}, step=step)
    step += 1
"""


def _check_every_listed_checkpoint(store_dir: Path) -> int:
    store = killsafe.CheckpointStore(store_dir)
    infos = store.list()
    for info in infos:
        store.verify(info)
        state = store.load(info)
        assert state["step"] == info.step and len(state["grown"]) == info.step * 100_000
    return len(infos)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_during_saves_and_prunes_never_loses_a_piece(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store_dir = tmp_path / "store"
    checked = 0
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(store_dir)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        checked += _check_every_listed_checkpoint(store_dir)
    assert checked > 0
    store = killsafe.CheckpointStore(store_dir, incremental=True, keep_last=2)
    step = store.list()[-1].step + 1 if store.list() else 0
    store.save({"step": step, "grown": np.arange(step * 100_000)}, step=step)  # sweeps at start
    store.close()  # waits for the pieces retention dropped to be unlinked
    used = set().union(*(referenced(info) for info in store.list()))
    on_disk = {name.removesuffix(".safetensors") for name in pieces_on_disk(store_dir)}
    assert on_disk == used
    assert not [p for p in (store_dir / fmt.PIECES_DIR).glob("*/.tmp-*")]
    assert not [p for p in os.listdir(store_dir) if p.startswith(".tmp-")]


def test_export_writes_one_safetensors_file_and_list_shows_the_bytes_added(tmp_path: Path) -> None:
    from cli_helpers import cli, cli_json

    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    store = killsafe.CheckpointStore(tmp_path / "store", incremental=True)
    frozen = np.random.default_rng(5).random(PIECE // 4)
    store.save({"frozen": frozen, "head": np.zeros(10)}, step=1)
    second = store.save({"frozen": frozen, "head": np.ones(10)}, step=2)
    listed = {row["step"]: row for row in cli_json("list", tmp_path / "store")["checkpoints"]}
    assert listed[2]["size"] == second.size and listed[2]["added"] == second.added
    assert listed[2]["added"] < listed[1]["added"] and listed[1]["added"] >= frozen.nbytes
    out = tmp_path / "out.safetensors"
    done = cli("export", second.path, out)
    assert done.returncode == 0, done.stderr
    exported = safetensors_numpy.load_file(str(out))
    assert sorted(v.nbytes for v in exported.values()) == [80, frozen.nbytes]
    assert any(np.array_equal(v.view(np.float64), frozen) for v in exported.values())


def test_a_run_saves_incrementally_when_asked(tmp_path: Path) -> None:
    weights = {"frozen": np.arange(1 << 20, dtype=np.float32), "step": np.zeros(4)}
    with killsafe.Run(
        tmp_path, total_steps=4, save_every_steps=1, incremental=True, progress=False, report=False
    ) as run:
        run.track(weights=weights)
        for step in run.steps():
            weights["step"] += step
    infos = killsafe.CheckpointStore(tmp_path / "checkpoints").list()
    assert [info.step for info in infos] == [2, 3, 4]
    assert all(info.added is not None and info.added < info.size // 2 for info in infos)


def test_a_run_mirrors_incrementally_and_a_fresh_directory_resumes_from_it(
    tmp_path: Path,
) -> None:
    url = f"memory://incremental-mirror-{uuid.uuid4().hex[:8]}/exp"
    frozen = np.random.default_rng(5).random(PIECE // 4)  # two pieces, never changed

    def train(directory: Path, total: int) -> tuple[killsafe.Run, dict[str, Any]]:
        state = {"frozen": frozen.copy(), "counter": np.zeros(8)}
        with killsafe.Run(
            directory, total_steps=total, save_every_steps=1, incremental=True,
            mirror=url, mirror_keep_last=None, progress=False, report=False,
            async_save=False,
        ) as run:  # fmt: skip
            run.track(state=state)
            for step in run.steps():
                if step:  # each upload before the next save, so none is superseded
                    wait_for_upload(url, step)
                state["counter"] += 1
        return run, state

    train(tmp_path / "first", 3)
    remote = killsafe.CheckpointStore(url, incremental=True)
    infos = remote.list()
    assert [info.step for info in infos] == [1, 2, 3]
    assert infos[0].added is not None and infos[0].added > frozen.nbytes  # the frozen part, once
    assert all(info.added is not None and info.added < info.size // 100 for info in infos[1:])
    run, state = train(tmp_path / "fresh-machine", 5)
    assert run.finished and run.resumed_from is not None and run.resumed_from.step == 3
    assert state["counter"][0] == 5 and np.array_equal(state["frozen"], frozen)


def test_import_copies_only_the_pieces_the_target_lacks(tmp_path: Path) -> None:
    source = killsafe.CheckpointStore(tmp_path / "source", incremental=True)
    frozen = np.random.default_rng(6).random(PIECE // 4)
    for step in (1, 2):
        source.save({"frozen": frozen, "step": np.full(10, step)}, step=step)
    remote = killsafe.CheckpointStore(f"memory://import-{uuid.uuid4().hex[:8]}", incremental=True)
    first, second = remote.import_from(source, 1), remote.import_from(source, 2)
    assert first.added is not None and first.added > frozen.nbytes
    assert second.added is not None and second.added < 10_000
    back = killsafe.CheckpointStore(tmp_path / "back", incremental=True)
    copied = back.import_from(remote, 2)
    assert copied.added is not None and copied.added > frozen.nbytes
    assert back.load(2)["step"][0] == 2 and np.array_equal(back.load(2)["frozen"], frozen)
    back.verify(2)
    with pytest.raises(ConfigError, match="incremental=True"):
        killsafe.CheckpointStore(tmp_path / "full").import_from(source, 1)
    for store in (source, remote, back):
        store.close()


def test_an_import_of_a_damaged_piece_commits_nothing(tmp_path: Path) -> None:
    source = killsafe.CheckpointStore(tmp_path / "source", incremental=True)
    info = source.save({"data": np.random.default_rng(7).random(PIECE // 8)}, step=1)
    (digest,) = referenced(info)
    piece = fmt.piece_path(tmp_path / "source" / fmt.PIECES_DIR, digest)
    data = bytearray(piece.read_bytes())
    data[-3] ^= 0x10
    piece.write_bytes(bytes(data))
    target = killsafe.CheckpointStore(tmp_path / "target", incremental=True)
    with pytest.raises(CorruptCheckpoint, match="does not match its name"):
        target.import_from(source, tmp_path / "source" / "step-000001")
    assert target.list() == []
    target.close()
    assert not list((tmp_path / "target" / fmt.PIECES_DIR).glob("*/*"))
