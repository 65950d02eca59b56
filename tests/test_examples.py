"""Every example, stopped by SIGINT, SIGTERM or SIGKILL and resumed, ends as an uninterrupted run.

Each example runs at its small size in a subprocess. The reference is an
uninterrupted run; an interrupted run is signalled once a checkpoint exists
(mid-run), started again with the same ``--dir`` and must print the very same
``result:`` line.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

import killsafe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(killsafe, "Run"), reason="killsafe.Run has not landed"),
]


def start(
    example: str, run_dir: Path, *extra: str, new_session: bool = False
) -> subprocess.Popen[str]:
    env = dict(os.environ, KILLSAFE_EXAMPLE_SMALL="1")
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / f"{example}.py"), "--dir", str(run_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=new_session,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def result_line(out: str, err: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("result: ")]
    assert len(lines) == 1, f"no single result line; stdout:\n{out}\nstderr:\n{err[-3000:]}"
    return lines[0]


def run_to_end(example: str, run_dir: Path, *extra: str) -> str:
    code, out, err = finish(start(example, run_dir, *extra))
    assert code == 0, err[-3000:]
    return result_line(out, err)


def has_checkpoint(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(p.name.startswith("step-") for p in ckpt.iterdir())


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"the example ended before it could be interrupted:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the example never reached the point to interrupt it")
        time.sleep(0.01)


def interrupt(
    proc: subprocess.Popen[str],
    sig: signal.Signals,
    ready: Callable[[], bool],
    *,
    group: bool = False,
) -> tuple[int, str, str]:
    """Signal ``proc`` once ``ready()``; ``group``: its whole process group, as a terminal does."""
    wait_for(proc, ready)
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    code, out, err = finish(proc)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 0, err[-3000:]
        assert "result: " not in out, "the run finished before the signal arrived"
    return code, out, err


ALL_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
_references: dict[tuple[str, ...], str] = {}
_reference_dirs: dict[tuple[str, ...], Path] = {}
_reference_outputs: dict[tuple[str, ...], str] = {}


def reference(example: str, tmp_path_factory: pytest.TempPathFactory, *extra: str) -> str:
    """The result line of an uninterrupted run (one per example and flags, shared by tests)."""
    key = (example, *extra)
    if key not in _references:
        run_dir = tmp_path_factory.mktemp(f"ref-{example}")
        code, out, err = finish(start(example, run_dir, *extra))
        assert code == 0, err[-3000:]
        _references[key] = result_line(out, err)
        _reference_dirs[key] = run_dir
        _reference_outputs[key] = out
    return _references[key]


def sessions(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text())["sessions"]


def assert_nothing_ran_twice(run_dir: Path, sig: signal.Signals) -> None:
    """After a graceful stop the resumed session starts at the step the stopped one ended."""
    if sig != signal.SIGKILL:
        stopped, resumed = sessions(run_dir)[-2:]
        assert stopped["exit_reason"] in ("keyboard", "signal:SIGTERM"), stopped
        assert resumed["start_step"] == stopped["end_step"] > 0


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


STANDARD_FLAGS = (
    "--dir",
    "--resume",
    "--clear",
    "--save-every",
    "--save-every-seconds",
    "--save-every-epochs",
    "--keep-last",
    "--stop-after",
    "--progress-every",
    "--serve",
)


# optuna_search drives no Run: Optuna's study.optimize owns its loop, and its
# flags are the search's own (--dir, --trials, --storage).
RUN_EXAMPLES = sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "optuna_search")


@pytest.mark.parametrize("example", RUN_EXAMPLES)
def test_every_example_takes_the_standard_flags(example: str) -> None:
    help_text = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{example}.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [flag for flag in STANDARD_FLAGS if f"{flag} " not in help_text] == []


# -- train_torch --------------------------------------------------------------

TORCH_BATCHES_PER_EPOCH = 64  # 2048 samples in batches of 32 at the small size


# SIGINT takes the path SIGTERM takes inside a Run (tests/test_epochs_kill.py
# sends all three to the nested loop); here the two ends: graceful and killed.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_train_torch_resumes_mid_epoch(
    sig: signal.Signals, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference("train_torch", tmp_path_factory)
    proc = start("train_torch", tmp_path)

    def mid_epoch_checkpoint() -> bool:
        # Saves come every half epoch: wait for one in the middle of an epoch.
        ckpt = tmp_path / "checkpoints"
        steps = [int(p.name.split("-")[1]) for p in ckpt.glob("step-*")] if ckpt.is_dir() else []
        return any(step % TORCH_BATCHES_PER_EPOCH for step in steps)

    interrupt(proc, sig, mid_epoch_checkpoint)
    stopped_at = max(checkpoint_steps(tmp_path))
    assert run_to_end("train_torch", tmp_path) == expected
    resumed = sessions(tmp_path)[-1]
    assert resumed["start_step"] == stopped_at > 0  # resumed at the very next batch
    assert_nothing_ran_twice(tmp_path, sig)


def test_train_torch_model_rebuilds_from_a_checkpoint_alone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    torch = pytest.importorskip("torch")
    expected = reference("train_torch", tmp_path_factory)
    run_dir = _reference_dirs[("train_torch",)]
    spec = importlib.util.spec_from_file_location(
        "train_torch_example", EXAMPLES / "train_torch.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    store = killsafe.CheckpointStore(run_dir / "checkpoints", best=("val_loss", "min"))
    latest, best = store.latest(), store.best()
    assert latest is not None and best is not None
    # The best checkpoint is kept (besides the newest ones): the best validation.
    assert best.step in [info.step for info in store.list()]
    best_val_loss = float(expected.split("best_val_loss=")[1].split()[0])
    assert round(best.metrics["val_loss"], 6) == best_val_loss
    best_epoch = int(expected.split("best_epoch=")[1].split()[0])
    assert best.step == best_epoch * TORCH_BATCHES_PER_EPOCH
    # Validation ran at the end of every epoch.
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "val_loss" in r] == [
        TORCH_BATCHES_PER_EPOCH * (e + 1) for e in range(3)
    ]

    # The whole model, rebuilt from the configuration stored in the checkpoint.
    config = store.load(latest, subtree="config")
    encoder, decoder = example.build_encoder(config), example.build_decoder(config)
    encoder.load_state_dict(store.load(latest, subtree="encoder"))
    decoder.load_state_dict(store.load(latest, subtree="decoder"))
    assert example.params_sha(encoder, decoder) == expected.split("params_sha=")[1].split()[0]

    # The encoder alone, from the best checkpoint: only its subtree is read.
    best_config = store.load(best, subtree="config")
    alone = example.build_encoder(best_config)
    alone.load_state_dict(store.load(best, subtree="encoder"))
    full = store.load(best)
    for name, tensor in alone.state_dict().items():
        assert torch.equal(tensor, full["encoder"][name])
    assert set(store.load(best, subtree="encoder")) == set(alone.state_dict())

    # Two optimizers and two schedulers, each saved under its own name.
    final = store.load(latest)
    assert final["enc_opt"]["param_groups"][0]["weight_decay"] == 1e-4  # AdamW
    assert final["dec_opt"]["param_groups"][0]["momentum"] == 0.9  # SGD
    assert final["enc_sched"]["last_epoch"] == final["dec_sched"]["last_epoch"] == latest.step
    assert "T_max" in final["dec_sched"] and "step_size" in final["enc_sched"]


# -- rl_episodes --------------------------------------------------------------


@pytest.mark.parametrize("sig", ALL_SIGNALS, ids=lambda s: s.name)
def test_rl_episodes_resume_from_the_next_episode(
    sig: signal.Signals, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference("rl_episodes", tmp_path_factory)
    proc = start("rl_episodes", tmp_path)
    interrupt(proc, sig, lambda: has_checkpoint(tmp_path))
    saved = max(checkpoint_steps(tmp_path))
    # The result line carries digests of the Q weights and the whole replay buffer.
    assert run_to_end("rl_episodes", tmp_path) == expected
    # The resumed session started with the episode after the last checkpoint.
    assert sessions(tmp_path)[-1]["start_step"] == saved > 0
    assert_nothing_ran_twice(tmp_path, sig)


def test_rl_replay_buffer_is_restored_exactly(tmp_path_factory: pytest.TempPathFactory) -> None:
    np = pytest.importorskip("numpy")
    reference("rl_episodes", tmp_path_factory)
    store = killsafe.CheckpointStore(_reference_dirs[("rl_episodes",)] / "checkpoints")
    buffer = store.load("latest", subtree="buffer")
    assert buffer["obs"].dtype == np.float32 and buffer["dones"].dtype == np.bool_
    assert buffer["actions"].dtype == np.int64 and buffer["obs"].shape == (2000, 24)
    assert 0 < buffer["size"] <= 2000 and buffer["obs"][: buffer["size"]].any()


# -- evolution ----------------------------------------------------------------


def workers_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_all_gone(processes: list[psutil.Process], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.02)
    assert not alive, f"worker processes left behind: {[p.pid for p in alive]}"


@pytest.mark.parametrize(
    ("sig", "group"),
    [(sig, False) for sig in ALL_SIGNALS] + [(signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "SIGKILL", "SIGINT-terminal"],
)
def test_evolution_resumes_generations_and_leaves_no_workers(
    sig: signal.Signals, group: bool, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # SIGINT-terminal: Ctrl+C on a terminal signals the whole foreground process
    # group, workers included; they leave the stop to the parent.
    expected = reference("evolution", tmp_path_factory)
    proc = start("evolution", tmp_path, new_session=group)
    workers: list[psutil.Process] = []

    def ready() -> bool:
        workers[:] = workers_of(proc.pid)
        return has_checkpoint(tmp_path) and len(workers) == 2

    _code, _out, err = interrupt(proc, sig, ready, group=group)
    assert "Traceback" not in err  # no worker died of the signal mid-task
    assert_all_gone(workers)
    exported = sorted((tmp_path / "best").glob("gen-*.json"))
    assert exported and all(json.loads(p.read_text())["genome"]["conns"] for p in exported)
    assert not list((tmp_path / "best").glob(".tmp-*")) or sig == signal.SIGKILL
    assert run_to_end("evolution", tmp_path) == expected
    assert_nothing_ran_twice(tmp_path, sig)
    generations = int(expected.split("generations=")[1].split()[0])
    assert len(list((tmp_path / "best").glob("gen-*.json"))) == generations


# -- downloads ----------------------------------------------------------------


def item_body(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest() * 512  # 16 KiB, different per item


class ItemServer:
    """A local HTTP server that counts requests per item and can cut one response short."""

    def __init__(self, cut_short: str | None = None, delay: float = 0.02) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.cut_short = cut_short
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.strip("/")
                server.counts[name] += 1
                body = item_body(name)
                time.sleep(delay)  # the network's latency, so a stop lands mid-batch
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name == server.cut_short and server.counts[name] == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def item_server() -> Iterator[ItemServer]:
    server = ItemServer()
    yield server
    server.close()


def downloads_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    if "downloads" not in _references:
        server = ItemServer(delay=0)
        try:
            ref_dir = tmp_path_factory.mktemp("ref-dl")
            _references["downloads"] = run_to_end("downloads", ref_dir, "--base-url", server.url)
        finally:
            server.close()
    return _references["downloads"]


@pytest.mark.parametrize("sig", ALL_SIGNALS, ids=lambda s: s.name)
def test_downloads_resume_fetches_only_missing_items(
    sig: signal.Signals,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    item_server: ItemServer,
) -> None:
    expected = downloads_reference(tmp_path_factory)
    proc = start("downloads", tmp_path, "--base-url", item_server.url)
    interrupt(proc, sig, lambda: has_checkpoint(tmp_path) and sum(item_server.counts.values()) > 8)
    fetched_before = dict(item_server.counts)
    assert run_to_end("downloads", tmp_path, "--base-url", item_server.url) == expected
    n_items = int(expected.split("items=")[1].split()[0])
    assert set(item_server.counts) == {f"item-{i:05d}" for i in range(n_items)}
    twice = [name for name, n in item_server.counts.items() if n > 1]
    if sig == signal.SIGKILL:
        # At most the item in flight when the process died is fetched again.
        assert len(twice) <= 1 and all(item_server.counts[n] == 2 for n in twice)
    else:
        assert twice == []
    assert len(fetched_before) < n_items
    assert_nothing_ran_twice(tmp_path, sig)
    assert not list((tmp_path / "files").glob(".part-*"))


def test_downloads_never_count_a_file_cut_short(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = downloads_reference(tmp_path_factory)
    server = ItemServer(cut_short="item-00007", delay=0)
    try:
        code, _out, err = finish(start("downloads", tmp_path, "--base-url", server.url))
        assert code != 0 and "item-00007" in err  # the run failed on the cut response
        assert not (tmp_path / "files" / "item-00007").exists()
        assert run_to_end("downloads", tmp_path, "--base-url", server.url) == expected
        assert server.counts["item-00007"] == 2
        assert all(n == 1 for name, n in server.counts.items() if name != "item-00007")
    finally:
        server.close()


# -- optuna_search ------------------------------------------------------------


def trial_counts(out: str) -> dict[str, int]:
    lines = [line for line in out.splitlines() if line.startswith("trials: ")]
    assert len(lines) == 1, out
    return {k: int(v) for k, v in (kv.split("=") for kv in lines[0].split()[1:])}


def completed_in(database: Path) -> int:
    """COMPLETE trials in an Optuna SQLite storage, 0 before its tables exist."""
    import sqlite3

    if not database.exists():
        return 0
    with contextlib.closing(sqlite3.connect(database, timeout=5)) as connection:
        try:
            query = "SELECT count(*) FROM trials WHERE state = 'COMPLETE'"
            return int(connection.execute(query).fetchone()[0])
        except sqlite3.OperationalError:  # tables not created yet
            return 0


@pytest.mark.parametrize(
    ("sig", "storage"),
    [(sig, False) for sig in ALL_SIGNALS] + [(signal.SIGKILL, True)],
    ids=["SIGINT", "SIGTERM", "SIGKILL", "SIGKILL-sqlite"],
)
def test_optuna_search_resumes_to_the_uninterrupted_result(
    sig: signal.Signals, storage: bool, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("optuna")
    expected = reference("optuna_search", tmp_path_factory)
    expected_counts = trial_counts(_reference_outputs[("optuna_search",)])
    database = tmp_path / "study.db"
    extra = ("--storage", f"sqlite:///{database}") if storage else ()
    proc = start("optuna_search", tmp_path, *extra)
    ready = (lambda: completed_in(database) >= 3) if storage else (lambda: has_checkpoint(tmp_path))
    wait_for(proc, ready)
    os.kill(proc.pid, sig)
    code, out, err = finish(proc)
    # A stop lets the running trial finish and exits 75 ("run me again").
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 75), err[-3000:]
    assert "result: " not in out, "the search finished before the signal arrived"
    code, out, err = finish(start("optuna_search", tmp_path, *extra))
    assert code == 0, err[-3000:]
    # Same trials, same sampler proposals, same pruning: none lost, none repeated.
    assert result_line(out, err) == expected
    counts = trial_counts(out)
    if storage:  # a trial the kill cut short stays in the storage as one FAIL
        assert counts.pop("FAIL", 0) <= 1
    assert counts == expected_counts


# -- paper_trading ------------------------------------------------------------


@pytest.mark.parametrize("sig", ALL_SIGNALS, ids=lambda s: s.name)
def test_paper_trading_restores_the_portfolio_exactly(
    sig: signal.Signals, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference("paper_trading", tmp_path_factory)
    proc = start("paper_trading", tmp_path)
    # Interrupt once the journal was compacted at least once and holds records after that.
    interrupt(proc, sig, lambda: has_checkpoint(tmp_path))
    segments = list((tmp_path / "journal").glob("seg-*.log"))
    assert segments, "no journal segment"
    assert run_to_end("paper_trading", tmp_path) == expected


def test_paper_trading_takes_the_standard_flags(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference("paper_trading", tmp_path_factory)
    code, out, err = finish(start("paper_trading", tmp_path, "--stop-after", "0.01s"))
    assert code == 0 and "result: " not in out and "stopped (time-limit)" in err, err
    assert run_to_end("paper_trading", tmp_path, "--keep-last", "1") == expected
    assert len(checkpoint_steps(tmp_path)) == 1

    code, _out, err = finish(start("paper_trading", tmp_path, "--resume", "never"))
    assert code == 2 and "--clear" in err
    code, out, err = finish(start("paper_trading", tmp_path, "--resume", "never", "--clear"))
    assert code == 0 and "resumed" not in err  # started over from the first tick
    assert result_line(out, err) == expected
