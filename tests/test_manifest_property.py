"""Random mutations of a valid manifest: a typed error or a correct load, never worse.

Each example copies a real store (two checkpoints), changes one place of the
newest manifest (a value of another type, size or number, a deleted key, an
extra level of nesting), sometimes recomputes the manifest's checksum as a
hostile writer would, and reads it through the format, the store and the
command line's tree walker. Nothing may be deleted; a hang fails the example
(an alarm, not a speed assertion); the process's peak memory stays bounded.
"""

from __future__ import annotations

import collections
import copy
import json
import resource
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import killsafe
from killsafe import format as fmt
from killsafe.errors import KillsafeError
from killsafe.format import walk as treewalk

HANG_SECONDS = 60
PEAK_GROWTH_BYTES = 1 << 30

STATE = {
    "w": torch.arange(12, dtype=torch.float32).view(3, 4),
    "t": torch.arange(6, dtype=torch.int64)[::2],
    "a": np.arange(6, dtype=np.float64).reshape(2, 3).T,
    "n": 3,
    "big": 2**100,
    "f": float("nan"),
    "s": "text",
    "small": b"xy",
    "blob": b"z" * 200,
    "seq": (1, [2.5, None], {True}),
    "keys": {1: "one", 2: frozenset({3})},
    "scalar": np.float32(1.5),
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "store"
    with killsafe.CheckpointStore(root) as store:
        store.save({**STATE, "n": 1}, step=1)
        store.save(STATE, step=2)
    return root


def _manifest(store: Path, step: int) -> dict[str, Any]:
    return json.loads((store / f"step-{step:06d}" / fmt.MANIFEST_NAME).read_text())


NAMES = [
    "type", "value", "items", "entries", "shape", "stride", "entry", "offset",
    "dtype", "hex", "bits", "base64", "size", "raw_size", "codec", "offsets", "xxh3",
]  # fmt: skip
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, 2**62, 2**63, 2**64, -(2**63) - 1, -1, 0, 2**53])
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["zz", "00", "", "-", "float32", "tensor", "dict", "F32", "x" * 5000])
)
VALUES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
PATHS: list[tuple[Any, ...]] = []
OUTCOMES: collections.Counter[str] = collections.Counter()


def _mutate(manifest: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    if not path:
        return value if action == "replace" else [manifest] if action == "nest" else manifest
    parent = manifest
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "nest":
        parent[last] = [parent[last]]
    elif action == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):  # "add": an extra key
        parent[last][str(value)[:8] or "x"] = value
    return manifest


@st.composite
def mutations(draw: Any) -> tuple[tuple[Any, ...], str, Any, bool]:
    path = draw(st.sampled_from(PATHS))
    action = draw(st.sampled_from(["replace", "replace", "nest", "delete", "add"]))
    return path, action, draw(VALUES), draw(st.booleans())


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"a read took over {HANG_SECONDS} s")


def test_random_manifest_mutations_fail_typed_or_load(pristine: Path) -> None:
    PATHS[:] = sorted(_paths(_manifest(pristine, 2)), key=repr)
    OUTCOMES.clear()
    before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        check_mutations(pristine)
    finally:
        signal.signal(signal.SIGALRM, previous)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak - before_peak < PEAK_GROWTH_BYTES
    assert OUTCOMES["typed error"] > 0 and OUTCOMES["loaded"] > 0, OUTCOMES


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=mutations())
def check_mutations(pristine: Path, mutation: tuple[tuple[Any, ...], str, Any, bool]) -> None:
    path, action, value, reseal = mutation
    with tempfile.TemporaryDirectory() as scratch:
        store_dir = Path(scratch) / "store"
        shutil.copytree(pristine, store_dir)
        bad, good = store_dir / "step-000002", store_dir / "step-000001"
        original = _manifest(store_dir, 2)
        try:
            mutated = _mutate(copy.deepcopy(original), path, action, value)
        except (KeyError, IndexError, TypeError):
            return  # the path does not fit this action
        if reseal and isinstance(mutated, dict):
            mutated[fmt.CHECKSUM_FIELD] = fmt.manifest_digest(mutated)
        (bad / fmt.MANIFEST_NAME).write_text(json.dumps(mutated))
        before = snapshot(store_dir)
        signal.alarm(HANG_SECONDS)
        try:
            read_everything(store_dir, bad, good, unchanged=mutated == original, reseal=reseal)
        finally:
            signal.alarm(0)
        assert snapshot(store_dir) == before


def read_everything(
    store_dir: Path, bad: Path, good: Path, *, unchanged: bool, reseal: bool
) -> None:
    try:
        manifest = fmt.read_manifest(bad)
        tree = fmt.read_tree(bad, manifest)
        fmt.verify_checkpoint(bad, manifest)
        for leaf in treewalk.walk(manifest["tree"]):
            json.dumps(leaf.describe(), default=str)
    except KillsafeError as exc:
        assert "\n" not in str(exc)
        assert not unchanged, exc
        loaded_bad = False
        OUTCOMES["typed error"] += 1
    else:
        # A change the checksum was not recomputed for is always caught.
        assert unchanged or reseal
        loaded_bad = True
        OUTCOMES["loaded"] += 1
        assert isinstance(tree, dict)
    store = killsafe.CheckpointStore(store_dir)
    latest = store.latest()
    assert latest is not None
    assert latest.path in ((bad, good) if loaded_bad else (good,))
    state = store.load("latest")
    if latest.path == good:
        assert state["n"] == 1
    if not loaded_bad:
        with pytest.raises(KillsafeError):
            store.load(bad)
