"""The dashboard in a real browser: Debian's chromium driven by Playwright.

A training-like loop in a thread plays the live run. It talks to the server
only through the run directory, as a real run does: it writes ``status.json``
and ``history.jsonl``, reads the requests in ``control/`` at step boundaries,
saves with the checkpoint store and answers through ``events.jsonl``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import killsafe

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
try:
    from playwright import sync_api
except ImportError as exc:  # the test extra installs it: its absence is a broken set-up
    raise ImportError(
        "playwright is missing: run scripts/test-setup.sh, "
        "or pip install -c constraints.txt -e '.[test]'"
    ) from exc
store_module = pytest.importorskip("killsafe.store")
np = pytest.importorskip("numpy")

from killsafe import rundir  # noqa: E402
from killsafe.history import History  # noqa: E402
from killsafe.server import ServerHandle, serve_in_thread  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 15_000


class SimulatedRun(threading.Thread):
    """A small loop that behaves like ``killsafe.Run`` towards the run directory."""

    def __init__(self, run_dir: Path, total_steps: int = 100_000):
        super().__init__(name="simulated-run", daemon=True)
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.store = store_module.CheckpointStore(run_dir / "checkpoints")
        self.history = History(run_dir)
        self.step = 0
        self.started = time.time()
        self.finish = threading.Event()
        self.ended = threading.Event()

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.store.close()
            self.history.close()
            self.ended.set()

    def _loop(self) -> None:
        last_status = 0.0
        while not self.finish.is_set():
            self.step += 1
            time.sleep(0.01)  # the "training step"
            if self.step % 5 == 0:
                loss = 1.0 / (1 + 0.05 * self.step)
                self.history.append(self.step, {"loss": loss, "accuracy": 1 - loss / 2})
            if time.monotonic() - last_status > 0.2:
                self._write_status("running")
                last_status = time.monotonic()
            for path, request in rundir.pending_requests(self.run_dir):
                path.unlink()
                if request.action == "save":
                    self._save(request)
                else:
                    rundir.append_event(self.run_dir, "stop-requested", self.step)
                    info = self._checkpoint(reason="stop")
                    self._write_status("stopped")
                    rundir.append_event(
                        self.run_dir, "stopped", self.step, reason="stop", path=str(info.path)
                    )
                    return

    def _save(self, request: rundir.ControlRequest) -> None:
        rundir.append_event(self.run_dir, "save-requested", self.step, request_id=request.id)
        info = self._checkpoint(reason="request", name=request.name, note=request.note)
        rundir.append_event(
            self.run_dir,
            "saved",
            self.step,
            name=info.name,
            path=str(info.path),
            reason="request",
            request_id=request.id,
        )

    def _checkpoint(self, *, reason: str, name: str | None = None, note: str | None = None) -> Any:
        return self.store.save(
            {"weights": np.full((64, 64), self.step, dtype=np.float32), "step": self.step},
            self.step,
            metrics={"loss": 1.0 / (1 + 0.05 * self.step)},
            name=name,
            reason=reason,
            metadata={"note": note} if note else None,
        )

    def _write_status(self, state: str) -> None:
        elapsed = time.time() - self.started
        rate = self.step / elapsed if elapsed > 0 else None
        rundir.write_json_atomic(
            self.run_dir / rundir.STATUS_FILE,
            {
                "pid": os.getpid(),
                "host": rundir.this_host(),
                "updated": time.time(),
                "state": state,
                "step": self.step,
                "total_steps": self.total_steps,
                "percent": 100.0 * self.step / self.total_steps,
                "phase": "training",
                "rate": rate,
                "elapsed": elapsed,
                "eta": (self.total_steps - self.step) / rate if rate else None,
                "metrics": {"loss": 1.0 / (1 + 0.05 * self.step)},
                "best": None,
                "counters": {},
                "last_checkpoint": None,
                "resources": {"cpu_percent": 42.0, "rss_bytes": 300 << 20},
                "control": True,
            },
        )


def find_chromium() -> str | None:
    """$KILLSAFE_CHROMIUM, else Debian's chromium (scripts/test-setup.sh installs it as root)."""
    given = os.environ.get("KILLSAFE_CHROMIUM")
    if given:
        return given
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture
def browser_page() -> Iterator[Any]:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "chromium is not installed: apt-get install chromium (scripts/test-setup.sh does it "
            "as root), or point KILLSAFE_CHROMIUM at a chromium binary"
        )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            yield page
        finally:
            browser.close()


def record_requests(page: Any) -> list[str]:
    """Every URL the page asks for: it must never leave its own server."""
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    return urls


def foreign(urls: list[str], base: str) -> list[str]:
    return [url for url in urls if not url.startswith(base)]


@pytest.fixture
def live_run(tmp_path: Path) -> Iterator[tuple[SimulatedRun, ServerHandle]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = SimulatedRun(run_dir)
    run.start()
    handle = serve_in_thread(run_dir, token="browser-test-token")
    try:
        yield run, handle
    finally:
        handle.close()
        run.finish.set()
        run.join(10)


def screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """Keep a screenshot next to the test's files (and in $KILLSAFE_SCREENSHOTS if set)."""
    folder = Path(os.environ.get("KILLSAFE_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_save_then_stop_from_the_page(
    browser_page: Any, live_run: tuple[SimulatedRun, ServerHandle], tmp_path: Path
) -> None:
    expect = sync_api.expect
    page = browser_page
    run, handle = live_run
    store = run.store
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    requests = record_requests(page)

    page.goto(handle.page_url)  # the token travels in the fragment
    expect(page.locator("#state")).to_have_text("live", timeout=WAIT_MS)
    save_button = page.get_by_role("button", name="Save checkpoint")
    stop_button = page.get_by_role("button", name="Stop")
    expect(save_button).to_be_enabled()
    expect(stop_button).to_be_enabled()
    assert "token" not in page.url  # taken out of the address bar
    expect(page.locator("#plots svg").first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#step")).not_to_have_text("-")
    screenshot(page, tmp_path, "dashboard-live")

    # Save: the prompt defaults to the step; type a name and a note.
    save_button.click()
    name_field = page.locator("#save-name")
    expect(name_field).to_be_visible()
    assert name_field.input_value().startswith("step-")
    name_field.fill("looks-good")
    page.locator("#save-note").fill("validation plateau")
    page.locator("#save-confirm").click()

    expect(page.locator(".toast.ok", has_text="Saved checkpoint looks-good")).to_be_visible(
        timeout=WAIT_MS
    )
    row = page.locator("#checkpoints tbody tr", has_text="looks-good")
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row).to_contain_text("request")
    expect(row).to_contain_text("validation plateau")
    [saved] = [info for info in store.list() if info.name == "looks-good"]
    assert saved.path.is_dir() and saved.metadata == {"note": "validation plateau"}
    expect(row.locator("td").first).to_have_text(f"{saved.step:,}")
    screenshot(page, tmp_path, "dashboard-saved")

    # Stop, after the confirmation: the run ends with an emergency checkpoint.
    stop_button.click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.locator("#confirm-ok").click()
    expect(page.locator(".toast", has_text="The run stopped")).to_be_visible(timeout=WAIT_MS)
    assert run.ended.wait(10)
    emergency = store.list()[-1]
    assert emergency.reason == "stop" and emergency.step == run.step
    expect(page.locator("#checkpoints tbody tr").first).to_contain_text("stop", timeout=WAIT_MS)
    expect(save_button).to_be_disabled(timeout=WAIT_MS)
    expect(stop_button).to_be_disabled()

    # Delete, after the confirmation (allowed now that no run holds the store).
    row.get_by_role("button", name="Delete").click()
    expect(page.locator("#confirm-text")).to_contain_text("looks-good")
    page.locator("#confirm-ok").click()
    expect(page.locator(".toast.ok", has_text="Deleted looks-good")).to_be_visible(timeout=WAIT_MS)
    expect(row).to_have_count(0, timeout=WAIT_MS)
    assert not saved.path.exists()
    assert [info.reason for info in store.list()] == ["stop"]
    screenshot(page, tmp_path, "dashboard-stopped")
    assert errors == []
    assert requests and foreign(requests, handle.url) == []  # works offline


def test_a_wrong_token_is_asked_for_again(
    browser_page: Any, live_run: tuple[SimulatedRun, ServerHandle]
) -> None:
    page = browser_page
    _, handle = live_run
    prompts: list[str] = []

    def answer(dialog: Any) -> None:
        prompts.append(dialog.message)
        dialog.accept(handle.token)

    page.on("dialog", answer)
    page.goto(handle.url + "#token=wrong")
    sync_api.expect(page.locator("#state")).to_have_text("live", timeout=WAIT_MS)
    assert prompts and "token" in prompts[0]


TRAIN_SCRIPT = """
import sys, time
import killsafe

run_dir, port = sys.argv[1], int(sys.argv[2])
with killsafe.Run(run_dir, total_steps=1_000_000, serve=port, keyboard=False,
                   progress=False, report=False) as run:
    run.track(weights=[0.0] * 16)
    for step in run.steps():
        time.sleep(0.005)  # the training step
        run.state["weights"][step % 16] += 1.0
        if step % 10 == 0:
            run.log(loss=1.0 / (1 + step), accuracy=1.0 - 1.0 / (2 + step))
print("exit", run.exit_reason, run.step, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_save_and_stop_a_real_run_from_the_page(browser_page: Any, tmp_path: Path) -> None:
    if not hasattr(killsafe, "Run"):
        pytest.skip("killsafe.Run has not landed in this tree yet")
    expect = sync_api.expect
    page = browser_page
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run's dashboard did not come up"
            try:
                page.goto(url)
                break
            except sync_api.Error:
                time.sleep(0.1)
        expect(page.locator("#state")).to_have_text("live", timeout=WAIT_MS)
        page.get_by_role("button", name="Save checkpoint").click()
        page.locator("#save-name").fill("from-the-page")
        page.locator("#save-note").fill("best so far")
        page.locator("#save-confirm").click()
        expect(page.locator(".toast.ok", has_text="Saved checkpoint from-the-page")).to_be_visible(
            timeout=WAIT_MS
        )
        row = page.locator("#checkpoints tbody tr", has_text="from-the-page")
        expect(row).to_be_visible(timeout=WAIT_MS)
        expect(row).to_contain_text("best so far")
        [saved] = [
            i
            for i in store_module.CheckpointStore(run_dir / "checkpoints").list()
            if i.name == "from-the-page"
        ]
        assert saved.reason == "request" and saved.path.is_dir()
        assert saved.metadata["note"] == "best so far"
        expect(row.locator("td").first).to_have_text(f"{saved.step:,}")
        screenshot(page, tmp_path, "dashboard-real-run")

        # The same name again: the run cannot save it and the page says why.
        page.get_by_role("button", name="Save checkpoint").click()
        page.locator("#save-name").fill("from-the-page")
        page.locator("#save-confirm").click()
        failed = page.locator(".toast.error", has_text="Save failed")
        expect(failed).to_be_visible(timeout=WAIT_MS)
        expect(failed).to_contain_text("from-the-page")
        assert proc.poll() is None  # a failed save does not stop the run

        page.get_by_role("button", name="Stop").click()
        page.locator("#confirm-ok").click()
        expect(page.locator(".toast", has_text="The run stopped")).to_be_visible(timeout=WAIT_MS)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert "exit request" in output
    emergency = store_module.CheckpointStore(run_dir / "checkpoints").latest()
    assert emergency is not None and emergency.reason == "request"
    assert emergency.step > saved.step, output
    expect(page.locator(".toast", has_text=f"stopped at step {emergency.step:,}")).to_be_visible()
    expect(page.get_by_role("button", name="Save checkpoint")).to_be_disabled(timeout=WAIT_MS)


AXIS_LABELS = """
() => [...document.querySelectorAll("#plots figure")].map((figure) => {
  const svg = figure.querySelector("svg");
  const width = svg.viewBox.baseVal.width;
  return {
    name: figure.querySelector("figcaption").textContent,
    labels: [...svg.querySelectorAll("text")].map((t) => {
      const box = t.getBBox();
      return { text: t.textContent, left: box.x, right: box.x + box.width, width };
    }),
  };
})
"""


def test_chart_axis_labels_fit_and_read_as_numbers(browser_page: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    history = History(run_dir)
    for step in range(1, 301):
        epoch = (step - 1) // 60
        history.append(
            step,
            {
                "lr": 0.001416 * 0.7**epoch,  # StepLR: 1.416e-3 down to 3.4e-4
                "loss": 2.302585 / (1 + 0.01 * step),
                "tokens": 1_234_567.0 * step,
                "delta": -0.00123 + 1e-6 * step,
            },
        )
    history.close()
    handle = serve_in_thread(run_dir, token="axis-test-token")
    try:
        page = browser_page
        page.goto(handle.page_url)
        sync_api.expect(page.locator("#plots svg")).to_have_count(4, timeout=WAIT_MS)
        charts = {chart["name"]: chart["labels"] for chart in page.evaluate(AXIS_LABELS)}
        shot = screenshot(page, tmp_path, "dashboard-axes")
    finally:
        handle.close()
    assert set(charts) == {"lr", "loss", "tokens", "delta"}, charts
    for name, labels in charts.items():
        for label in labels:
            assert label["left"] >= 0 and label["right"] <= label["width"], (name, label, shot)
            assert len(label["text"]) <= 8, (name, label)  # compact: no 0.0009912 or 3.322e-4
        values = [float(label["text"].replace(",", "")) for label in labels[:-2]]  # the y ticks
        assert values == sorted(values) and len(set(values)) == len(values) >= 2, (name, labels)
    lr = [float(label["text"]) for label in charts["lr"][:-2]]
    assert min(lr) >= 0.000336 and max(lr) <= 0.001416, lr  # ticks inside the data's range
