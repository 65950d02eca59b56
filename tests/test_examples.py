"""Every example, stopped by SIGINT, SIGTERM or SIGKILL and resumed, ends as an uninterrupted run.

Each example runs at its small size in a subprocess. The reference is an
uninterrupted run; an interrupted run is signalled once a checkpoint exists
(mid-run), started again with the same ``--dir`` and must print the very same
``result:`` line.
"""

from __future__ import annotations

import collections
import hashlib
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

import resumable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(resumable, "Run"), reason="resumable.Run has not landed"),
]


def start(example: str, run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, RESUMABLE_EXAMPLE_SMALL="1")
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / f"{example}.py"), "--dir", str(run_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
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
    proc: subprocess.Popen[str], sig: signal.Signals, ready: Callable[[], bool]
) -> tuple[int, str, str]:
    wait_for(proc, ready)
    os.kill(proc.pid, sig)
    code, out, err = finish(proc)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 0, err[-3000:]
        assert "result: " not in out, "the run finished before the signal arrived"
    return code, out, err


_references: dict[tuple[str, ...], str] = {}


def reference(example: str, tmp_path_factory: pytest.TempPathFactory, *extra: str) -> str:
    key = (example, *extra)
    if key not in _references:
        _references[key] = run_to_end(example, tmp_path_factory.mktemp(f"ref-{example}"), *extra)
    return _references[key]


# -- train_torch --------------------------------------------------------------


def test_train_torch_resumes_mid_epoch_after_sigkill(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # One signal here (torch makes each process slow to start); SIGINT and
    # SIGTERM are covered by the other examples, which share the same Run path.
    expected = reference("train_torch", tmp_path_factory)
    proc = start("train_torch", tmp_path)

    def mid_epoch_checkpoint() -> bool:
        # Saves come every half epoch (64 batches an epoch at the small size).
        ckpt = tmp_path / "checkpoints"
        steps = [int(p.name.split("-")[1]) for p in ckpt.glob("step-*")] if ckpt.is_dir() else []
        return any(step % 64 for step in steps)

    interrupt(proc, signal.SIGKILL, mid_epoch_checkpoint)
    assert run_to_end("train_torch", tmp_path) == expected


# -- rl_episodes --------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_rl_episodes_resume_from_the_next_episode(
    sig: signal.Signals, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference("rl_episodes", tmp_path_factory)
    proc = start("rl_episodes", tmp_path)
    interrupt(proc, sig, lambda: has_checkpoint(tmp_path))
    # The result line carries digests of the Q weights and the whole replay buffer.
    assert run_to_end("rl_episodes", tmp_path) == expected


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
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name
)
def test_evolution_resumes_generations_and_leaves_no_workers(
    sig: signal.Signals, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected = reference("evolution", tmp_path_factory)
    proc = start("evolution", tmp_path)
    workers: list[psutil.Process] = []

    def ready() -> bool:
        workers[:] = workers_of(proc.pid)
        return has_checkpoint(tmp_path) and len(workers) == 2

    interrupt(proc, sig, ready)
    assert_all_gone(workers)
    exported = sorted((tmp_path / "best").glob("gen-*.json"))
    assert exported and all(json.loads(p.read_text())["genome"]["conns"] for p in exported)
    assert not list((tmp_path / "best").glob(".tmp-*")) or sig == signal.SIGKILL
    assert run_to_end("evolution", tmp_path) == expected
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
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


@pytest.mark.parametrize(
    ("sig", "storage"),
    [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGKILL", "SIGINT-sqlite"],
)
def test_optuna_search_reaches_exactly_n_trials(
    sig: signal.Signals, storage: bool, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("optuna")
    expected = reference("optuna_search", tmp_path_factory)
    assert "states=COMPLETE " in expected
    extra = ("--storage", f"sqlite:///{tmp_path / 'study.db'}") if storage else ()
    proc = start("optuna_search", tmp_path, *extra)
    interrupt(proc, sig, lambda: has_checkpoint(tmp_path))
    # Same trials, same sampler proposals, all COMPLETE: none lost, none repeated.
    assert run_to_end("optuna_search", tmp_path, *extra) == expected


# -- paper_trading ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
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
