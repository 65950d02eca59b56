"""Random generators a script owns are state: saved as plain data, restored exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import killsafe
from killsafe.errors import StateMismatch, UnsupportedState
from killsafe.state import capture, restore


def _generators() -> dict[str, Any]:
    return {
        "python": random.Random(1),
        "torch": torch.Generator().manual_seed(2),
        "numpy": np.random.default_rng(3),
        "mt19937": np.random.Generator(np.random.MT19937(4)),
        "philox": np.random.Philox(5),
        "legacy": np.random.RandomState(6),
    }


def _draw(gens: dict[str, Any]) -> list[Any]:
    return [
        gens["python"].random(),
        gens["python"].gauss(0.0, 1.0),
        torch.rand(4, generator=gens["torch"]).tolist(),
        gens["numpy"].random(3).tolist(),
        int(gens["numpy"].integers(0, 2**62)),
        gens["mt19937"].standard_normal(2).tolist(),
        int(gens["philox"].random_raw()),
        gens["legacy"].standard_normal(3).tolist(),
    ]


def _warmed() -> dict[str, Any]:
    gens = _generators()
    _draw(gens)  # mid-stream: cached Gaussians and half-used words are part of the state
    return gens


def test_generators_come_back_from_a_store_with_the_same_next_draws(tmp_path: Path) -> None:
    gens = _warmed()
    store = killsafe.CheckpointStore(tmp_path / "checkpoints")
    store.save(gens, step=1)
    expected = [_draw(gens) for _ in range(3)]

    restore(gens, store.load())  # the same objects, rewound
    assert [_draw(gens) for _ in range(3)] == expected

    fresh = {
        "python": random.Random(),
        "torch": torch.Generator(),
        "numpy": np.random.default_rng(),
        "mt19937": np.random.Generator(np.random.MT19937()),
        "philox": np.random.Philox(),
        "legacy": np.random.RandomState(),
    }
    restored = restore(fresh, store.load())
    assert all(restored[name] is fresh[name] for name in fresh)  # restored in place
    assert [_draw(fresh) for _ in range(3)] == expected


def test_generator_states_are_plain_data_without_pickle(tmp_path: Path) -> None:
    tree = capture(_warmed())
    assert tree["torch"]["generator"] == "torch.Generator"
    assert tree["torch"]["state"].dtype == torch.uint8
    assert tree["numpy"] == {"generator": "numpy.Generator", "state": tree["numpy"]["state"]}
    assert tree["numpy"]["state"]["bit_generator"] == "PCG64"
    assert tree["legacy"]["state"]["bit_generator"] == "MT19937"
    version, internal, _ = tree["python"]["state"]
    assert version == 3 and len(internal) == 625

    store = killsafe.CheckpointStore(tmp_path)
    store.save(_warmed(), step=1)
    (manifest_path,) = tmp_path.glob("*/manifest.json")
    manifest = manifest_path.read_bytes()
    assert b"pickle" not in manifest.lower()
    assert b'"numpy.RandomState"' in manifest


def test_a_state_of_another_kind_is_a_state_mismatch() -> None:
    saved = capture({"rng": np.random.default_rng(1)})
    with pytest.raises(StateMismatch, match=r"rng: saved state is numpy.Generator, not a "):
        restore({"rng": torch.Generator()}, saved)
    other_bits = capture({"rng": np.random.Generator(np.random.MT19937(1))})
    with pytest.raises(StateMismatch, match=r"numpy\.Generator state does not fit"):
        restore({"rng": np.random.default_rng(1)}, other_bits)
    with pytest.raises(StateMismatch, match=r"not a random\.Random state"):
        restore({"rng": random.Random()}, {"rng": 3})


def test_system_random_is_refused_with_what_to_use() -> None:
    with pytest.raises(UnsupportedState, match=r"random.Random\(seed\)"):
        capture({"rng": random.SystemRandom()})


def test_generators_tracked_by_a_run_come_back_after_a_stop(tmp_path: Path) -> None:
    def run_once(stop_at: int | None) -> list[Any]:
        gens, drawn = _generators(), []
        if stop_at is None:
            _draw(gens)  # moved on: only the restore can put them back where the stop left them
        with killsafe.Run(tmp_path / "run", total_steps=6, progress=False) as run:
            run.track(**gens)
            for step in run.steps():
                drawn.append(_draw(gens))
                if step == stop_at:
                    run.stop("test")
        return drawn

    first = run_once(stop_at=2)
    rest = run_once(stop_at=None)
    uninterrupted = [_draw(g) for g in [_generators()] for _ in range(6)]
    assert first + rest == uninterrupted


_SCRIPT = """
import json, random, sys, time
import numpy as np, torch
import killsafe

seed = int(sys.argv[3])  # a resumed process seeds differently: only restoring gives equal draws
gens = {"python": random.Random(seed), "torch": torch.Generator().manual_seed(seed),
        "numpy": np.random.default_rng(seed), "legacy": np.random.RandomState(seed)}
with killsafe.Run(sys.argv[1], total_steps=40, save_every_steps=3, progress=False) as run:
    run.track(draws=[], **gens)
    for step in run.steps():
        draw = [gens["python"].random(), torch.rand(1, generator=gens["torch"]).item(),
                gens["numpy"].random(), gens["legacy"].standard_normal()]
        run.state["draws"].append(draw)
        time.sleep(0.02)
with open(sys.argv[2], "w") as f:  # a killed process never gets here
    json.dump({"resumed": run.resumed_from is not None, "draws": run.state["draws"]}, f)
"""


def _run_script(
    tmp_path: Path, run_dir: Path, out: Path, kill_after: float | None, seed: int = 1
) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, str(script), str(run_dir), str(out), str(seed)]
    child = subprocess.Popen(argv, env=env)
    if kill_after is None:
        assert child.wait(timeout=120) == 0
        return
    while not any((run_dir / "checkpoints").glob("step-*")) and child.poll() is None:
        time.sleep(0.01)
    time.sleep(kill_after)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)


def test_generators_resume_exactly_after_sigkill(tmp_path: Path) -> None:
    _run_script(tmp_path, tmp_path / "clean", tmp_path / "clean.json", kill_after=None)
    killed = tmp_path / "killed"
    rng = random.Random()
    _run_script(tmp_path, killed, tmp_path / "killed.json", kill_after=rng.uniform(0.0, 0.3))
    assert not (tmp_path / "killed.json").exists()
    _run_script(tmp_path, killed, tmp_path / "killed.json", kill_after=None, seed=99)
    clean = json.loads((tmp_path / "clean.json").read_text())
    resumed = json.loads((tmp_path / "killed.json").read_text())
    assert resumed["resumed"] and not clean["resumed"]
    assert len(clean["draws"]) == 40 and resumed["draws"] == clean["draws"]


def test_generators_and_stateful_objects_inside_a_tracked_dict_are_restored_in_place(
    tmp_path: Path,
) -> None:
    def build() -> dict[str, Any]:
        return {"rngs": {"numpy": np.random.default_rng(7), "torch": torch.Generator()}, "n": 0}

    state = build()
    state["rngs"]["torch"].manual_seed(8)
    store = killsafe.CheckpointStore(tmp_path)
    state["n"] = 5
    store.save(state, step=1)
    expected = (state["rngs"]["numpy"].random(), torch.rand(1, generator=state["rngs"]["torch"]))

    fresh = build()
    rngs = fresh["rngs"]
    numpy_rng = rngs["numpy"]
    restored = restore(fresh, store.load())
    assert restored["rngs"] is rngs and rngs["numpy"] is numpy_rng  # the user's objects, in place
    assert restored["n"] == 5
    assert (rngs["numpy"].random(), torch.rand(1, generator=rngs["torch"])) == expected

    with pytest.raises(StateMismatch, match=r"rngs\['extra'\] is missing"):
        restore({"rngs": {**build()["rngs"], "extra": random.Random()}}, store.load())
