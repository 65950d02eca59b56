"""The journal: durable appends, torn tails ignored, compaction into checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from killsafe.errors import ConfigError, CorruptCheckpoint, StoreLocked, UnsupportedState
from killsafe.journal import Journal, decode_record, encode_record


def segment_files(directory: Path) -> list[Path]:
    return sorted((directory / "journal").glob("seg-*.log"))


def test_records_round_trip_every_plain_type() -> None:
    tree = {
        "cash": 1.5,
        "n": 3,
        "none": None,
        "flag": True,
        "name": "x",
        "raw": b"\x00\xff",
        "pair": (1, "a"),
        "tags": {"b", "a"},
        "frozen": frozenset({1}),
        "by_id": {1: "one", 2: [1, 2]},
        "has_tag_key": {"__t": "user value"},
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "scalar": np.float32(0.25),
        "nested": [{"a": (1, 2)}],
    }
    back = decode_record(encode_record(tree))
    array = back.pop("array")
    expected = dict(tree)
    expected_array = expected.pop("array")
    assert array.dtype == np.int16 and np.array_equal(array, expected_array)
    assert back == expected
    assert type(back["pair"]) is tuple and type(back["by_id"]) is dict


def test_unsupported_value_names_its_path() -> None:
    with pytest.raises(UnsupportedState, match=r"record\['a'\]\[1\]: object cannot"):
        encode_record({"a": [1, object()]})
    with pytest.raises(UnsupportedState, match="dict key"):
        encode_record({(1, 2): 3})


def test_append_replay_and_compaction(tmp_path: Path) -> None:
    with Journal(tmp_path, compact_every=3, preallocate=4096) as journal:
        assert journal.replay().latest() is None
        for i in range(1, 5):
            assert journal.append({"i": i}) == i
        assert journal.compaction_due
        info = journal.compact({"i": 4, "compacted": True})
        assert info.step == 4 and journal.compact({"i": 4}).path == info.path
        assert not journal.compaction_due
        journal.append({"i": 5})
    with Journal(tmp_path, compact_every=3) as journal:
        replay = journal.replay()
        assert replay.state == {"i": 4, "compacted": True}
        assert replay.records == [{"i": 5}]
        assert replay.seq == 5 and replay.checkpoint_seq == 4
        assert journal.append({"i": 6}) == 6
    assert [p.name for p in segment_files(tmp_path)] == ["seg-000000000005.log"]
    with Journal(tmp_path) as journal:
        assert journal.replay().latest() == {"i": 6}


def test_torn_tail_record_is_ignored_and_overwritten(tmp_path: Path) -> None:
    with Journal(tmp_path, preallocate=0) as journal:
        for i in range(3):
            journal.append({"i": i, "pad": "x" * 100})
    segment = segment_files(tmp_path)[0]
    data = segment.read_bytes()
    segment.write_bytes(data[:-40])  # the last record loses its end
    with Journal(tmp_path, preallocate=0) as journal:
        assert journal.replay().records == [{"i": 0, "pad": "x" * 100}, {"i": 1, "pad": "x" * 100}]
        assert journal.append({"i": "new"}) == 3
    with Journal(tmp_path) as journal:
        assert journal.replay().latest() == {"i": "new"} and journal.seq == 3


def test_flipped_byte_in_the_last_record_is_not_used(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.append({"v": 1})
        journal.append({"v": 2})
    segment = segment_files(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    index = data.rindex(b'"v":2') + 4
    data[index] = ord("9")
    segment.write_bytes(bytes(data))
    with Journal(tmp_path) as journal:
        assert journal.replay().records == [{"v": 1}]


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path), pytest.raises(StoreLocked):
        Journal(tmp_path)


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Journal(tmp_path, compact_every=0)


def test_sigkill_mid_appends_loses_nothing_acknowledged(tmp_path: Path) -> None:
    # The child prints each sequence number once append returned; after a
    # SIGKILL, every acknowledged record must replay, in order, intact.
    script = textwrap.dedent(
        f"""
        import sys
        from killsafe.journal import Journal
        j = Journal({str(tmp_path)!r}, compact_every=50)
        state = {{"n": j.replay().latest()["n"] if j.seq else 0}}
        while True:
            state["n"] += 1
            state["blob"] = "y" * 2000
            seq = j.append(state)
            if j.compaction_due:
                j.compact(state)
            print(seq, flush=True)
        """
    )
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        acknowledged = 0
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged % 137 == 0 or acknowledged > 400:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with Journal(tmp_path) as journal:
            replay = journal.replay()
            assert journal.seq >= acknowledged
            latest = replay.latest()
            assert latest["n"] == journal.seq and latest["blob"] == "y" * 2000
            assert [r["n"] for r in replay.records] == list(
                range(replay.checkpoint_seq + 1, journal.seq + 1)
            )


def test_damage_before_the_last_segment_is_an_error(tmp_path: Path) -> None:
    with Journal(tmp_path, preallocate=0) as journal:
        journal.append({"v": 1})
        journal.append({"v": 2})
    first = segment_files(tmp_path)[0]
    (tmp_path / "journal" / "seg-000000000003.log").write_bytes(b"")
    data = bytearray(first.read_bytes())
    data[data.index(b'"v":1') + 4] = ord("7")
    first.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=r"seg-000000000001\.log"):
        Journal(tmp_path)
