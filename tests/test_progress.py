"""Progress: figures, plain lines off a terminal, the live display on a terminal."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from killsafe.errors import ConfigError
from killsafe.progress import (
    PlainRenderer,
    Progress,
    Renderer,
    ResourceMonitor,
    RichRenderer,
    format_duration,
    format_line,
    format_size,
)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tokens(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def make(clock: FakeClock, **kwargs: Any) -> tuple[Progress, io.StringIO]:
    stream = io.StringIO()
    progress = Progress(stream=stream, clock=clock, wall=lambda: clock.now + 1e9, **kwargs)
    return progress, stream


def test_off_a_terminal_one_plain_line_every_interval() -> None:
    clock = FakeClock()
    progress, stream = make(clock, total=10_000, every=30.0)
    progress.start()
    progress.set_phase("training")
    for step in range(1, 801):  # 8 steps/s for 100 s
        clock.advance(0.125)
        progress.update(step)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # at 30 s, 60 s and 90 s
    assert all(line.startswith("progress step=") for line in lines)
    first = tokens(lines[0])
    assert first["step"] == "240/10000"
    assert "2.4%" in lines[0].split()
    assert first["rate"] == "8.0/s"
    assert first["elapsed"] == "30s"
    assert first["eta"] == "20m20s"  # 9760 steps at 8/s
    assert first["phase"] == "training"
    assert "rss" in first and first["rss"].endswith("B")
    assert [tokens(line)["step"] for line in lines] == ["240/10000", "480/10000", "720/10000"]

    progress.close()
    last = stream.getvalue().splitlines()[-1]
    assert tokens(last)["step"] == "800/10000"
    assert tokens(last)["elapsed"] == "1m40s"


def test_the_line_carries_metrics_best_counters_and_checkpoint_age() -> None:
    clock = FakeClock()
    progress, stream = make(clock, total=10_000, start_step=1000, every=30.0)
    progress.start()
    progress.set_phase("self-play")
    for step in range(1001, 1201):
        clock.advance(0.1)
        progress.update(step)
        if step == 1100:
            progress.checkpoint_saved(step, "/runs/a/checkpoints/step-001100")
        progress.count("games", step - 1000, total=400)
        progress.log(step, {"loss": 0.4123}, best={"val_loss": {"value": 0.3901, "step": 1100}})
    progress.close()
    last = stream.getvalue().splitlines()[-1]
    fields = tokens(last)
    assert fields["step"] == "1200/10000"
    assert fields["phase"] == "self-play"
    assert fields["games"] == "200/400"
    assert fields["loss"] == "0.4123"
    assert fields["best_val_loss"] == "0.3901@1100"
    assert fields["ckpt_age"] == "10s"
    assert fields["rate"] == "10.0/s"


def test_a_run_without_total_has_no_percent_and_no_eta() -> None:
    clock = FakeClock()
    progress, stream = make(clock, every=5.0)
    progress.start()
    for step in range(1, 101):
        clock.advance(0.1)
        progress.update(step)
    progress.close()
    line = stream.getvalue().splitlines()[0]
    assert tokens(line)["step"] == "50"
    assert "eta" not in tokens(line)
    assert "%" not in line.split()[1]


def test_disabled_progress_writes_nothing_but_keeps_figures(capsys: Any) -> None:
    clock = FakeClock()
    progress, stream = make(clock, total=100, every=1.0, enabled=False)
    progress.start()
    for step in range(1, 101):
        clock.advance(1.0)
        progress.update(step)
    progress.message("not shown")
    progress.close()
    assert stream.getvalue() == ""
    assert capsys.readouterr() == ("", "")
    snapshot = progress.snapshot()
    assert snapshot["step"] == 100 and snapshot["percent"] == 100.0 and snapshot["eta"] == 0.0


def test_snapshot_has_the_status_fields() -> None:
    clock = FakeClock()
    progress, _ = make(clock, total=200, start_step=50)
    progress.start()
    for step in range(51, 101):
        clock.advance(0.5)
        progress.update(step)
    progress.checkpoint_saved(100, Path("/r/checkpoints/step-000100"))
    clock.advance(3.0)
    snapshot = progress.snapshot()
    for key in (
        "step",
        "total_steps",
        "percent",
        "phase",
        "rate",
        "elapsed",
        "eta",
        "metrics",
        "best",
        "counters",
        "last_checkpoint",
        "resources",
    ):
        assert key in snapshot
    assert snapshot["step"] == 100 and snapshot["total_steps"] == 200
    assert snapshot["percent"] == 50.0
    assert snapshot["rate"] == pytest.approx(2.0)
    assert snapshot["eta"] == pytest.approx(50.0)
    assert snapshot["elapsed"] == pytest.approx(28.0)
    checkpoint = snapshot["last_checkpoint"]
    assert checkpoint["step"] == 100 and checkpoint["path"] == "/r/checkpoints/step-000100"
    assert checkpoint["age"] == pytest.approx(3.0)
    assert checkpoint["time"] == pytest.approx(clock.now - 3.0 + 1e9)
    assert set(snapshot["resources"]) >= {"cpu_percent", "rss_bytes", "gpu_memory_bytes"}


def test_rate_is_smoothed_and_follows_a_change_of_speed() -> None:
    clock = FakeClock()
    progress, _ = make(clock, rate_window=10.0)
    progress.start()
    step = 0
    for _ in range(60):  # 10 steps/s for a minute
        clock.advance(1.0)
        step += 10
        progress.update(step)
    assert progress.rate == pytest.approx(10.0)
    clock.advance(1.0)
    step += 100  # one burst does not swing the figure
    progress.update(step)
    assert progress.rate is not None and 10.0 < progress.rate < 20.0
    for _ in range(120):  # then 2 steps/s
        clock.advance(1.0)
        step += 2
        progress.update(step)
    assert progress.rate == pytest.approx(2.0, abs=0.01)


def test_update_between_samples_does_not_sample() -> None:
    clock = FakeClock()
    calls: list[str] = []
    progress, _ = make(clock, every=30.0, renderer=RecordingRenderer(calls, interval=30.0))
    progress.start()
    for step in range(1, 10_001):
        progress.update(step)  # the clock does not move: no sample, no render
    assert progress.rate is None
    assert calls == ["start"]


class RecordingRenderer:
    def __init__(self, calls: list[str], interval: float = 10.0) -> None:
        self.calls = calls
        self.interval = interval
        self.snapshots: list[dict[str, Any]] = []

    def start(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.calls.append("start")
        self.snapshots.append(snapshot())

    def render(self, snapshot: dict[str, Any]) -> None:
        self.calls.append(f"render:{snapshot['step']}")

    def message(self, text: str) -> None:
        self.calls.append(f"message:{text}")

    def close(self, snapshot: dict[str, Any]) -> None:
        self.calls.append(f"close:{snapshot['step']}")


def test_a_custom_renderer_gets_start_render_message_close() -> None:
    clock = FakeClock()
    calls: list[str] = []
    renderer = RecordingRenderer(calls, interval=10.0)
    assert isinstance(renderer, Renderer)
    progress = Progress(total=100, renderer=renderer, clock=clock)
    progress.start()
    for step in range(1, 26):
        clock.advance(1.0)
        progress.update(step)
    progress.message("saved checkpoint")
    progress.close()
    progress.close()
    assert calls == [
        "start",
        "render:10",
        "render:20",
        "message:saved checkpoint",
        "close:25",
    ]


def test_plain_renderer_messages_go_to_the_stream() -> None:
    clock = FakeClock()
    progress, stream = make(clock, total=10)
    progress.start()
    progress.message("exit: stopped by signal:SIGTERM at step 7")
    assert stream.getvalue() == "exit: stopped by signal:SIGTERM at step 7\n"


def test_a_stream_that_is_not_a_terminal_gets_plain_lines() -> None:
    progress = Progress(stream=io.StringIO())
    assert isinstance(progress._renderer, PlainRenderer)
    with open(os.devnull, "w") as devnull:
        assert isinstance(Progress(stream=devnull)._renderer, PlainRenderer)


def test_bad_intervals_are_refused() -> None:
    with pytest.raises(ConfigError, match="every=-1"):
        Progress(every=-1)


def test_format_line_of_a_bare_snapshot() -> None:
    assert format_line({"step": 3}) == "progress step=3 rate=? elapsed=?"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "?"),
        (0, "0s"),
        (34.4, "34s"),
        (250, "4m10s"),
        (7500, "2h05m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(None, "-"), (512, "512 B"), (3 * 1024 + 400, "3.4 KiB"), (int(1.2 * 2**30), "1.2 GiB")],
)
def test_format_size(nbytes: int | None, text: str) -> None:
    assert format_size(nbytes) == text


def test_resource_monitor_reads_this_process() -> None:
    monitor = ResourceMonitor(max_age=0.0, cpu_window=0.0)
    first = monitor.sample()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn a little CPU
        pass
    second = monitor.sample()
    assert second["rss_bytes"] > 1_000_000
    assert second["peak_rss_bytes"] >= second["rss_bytes"]
    assert second["cpu_seconds"] > first["cpu_seconds"]
    assert second["cpu_percent"] is not None and second["cpu_percent"] > 0
    assert second["gpu_memory_bytes"] is None or second["gpu_memory_bytes"] >= 0


LIVE_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
from killsafe.progress import Progress
progress = Progress(total=40)
assert type(progress._renderer).__name__ == "RichRenderer", progress._renderer
progress.start()
for step in range(1, 41):
    progress.update(step)
    if step % 10 == 0:
        print(f"user print at {step}")
        logging.info("user log at %d", step)
        progress.log(step, {"loss": 1.0 / step})
        progress._renderer.render(progress.snapshot())
progress.message("summary line")
progress.close()
print("after close", type(sys.stdout).__name__)
logging.info("log after close")
"""


def run_in_terminal(script: str, timeout: float = 60.0) -> bytes:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a real terminal on stdin/stdout/stderr
        os.execvp(sys.executable, [sys.executable, "-c", script])
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    return output


def test_on_a_terminal_prints_and_logging_appear_whole_above_the_live_display() -> None:
    output = run_in_terminal(LIVE_SCRIPT)
    text = output.decode(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    lines = re.split(r"\r\n|\r|\n", plain)
    for step in (10, 20, 30, 40):
        # Each user line arrives whole, on a line of its own, after the display was cleared.
        assert f"user print at {step}" in lines
        assert f"LOG user log at {step}" in lines
        line_start = r"(?:\x1b\[2K|\x1b\[\?25l|\r\n)"
        assert re.search(rf"{line_start}user print at {step}\r\n", text)
        assert re.search(rf"{line_start}LOG user log at {step}\r\n", text)
    assert "summary line" in lines
    assert "after close TextIOWrapper" in lines
    assert "LOG log after close" in lines
    assert "40/40" in plain  # the final display was drawn


def test_rich_renderer_draws_the_figures_into_a_console() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    clock = FakeClock()
    progress = Progress(total=50, renderer=RichRenderer(console=console), clock=clock)
    progress.start()
    progress.set_phase("evaluation")
    for step in range(1, 51):
        clock.advance(0.5)
        progress.update(step)
    progress.log(50, {"val_loss": 0.25})
    progress.close()
    out = buffer.getvalue()
    assert "50/50" in out and "100.0%" in out
    assert "phase=evaluation" in out and "val_loss=0.25" in out


def test_closing_the_stream_does_not_break_the_run() -> None:
    stream = io.StringIO()
    renderer = PlainRenderer(stream, interval=1.0)
    stream.close()
    renderer.render({"step": 1})
    renderer.message("ignored")


def test_subprocess_off_a_terminal_writes_plain_lines_to_stderr(tmp_path: Path) -> None:
    code = (
        "from killsafe.progress import Progress\n"
        "p = Progress(total=5, every=30)\n"
        "p.start()\n"
        "for s in range(1, 6): p.update(s)\n"
        "p.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == ""
    assert out.stderr.startswith("progress step=5/5 100.0% ")


@pytest.mark.gpu
def test_gpu_memory_is_reported_when_torch_uses_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    sample = ResourceMonitor(max_age=0.0).sample()
    assert sample["gpu_memory_bytes"] is not None
    assert sample["gpu_memory_bytes"] >= block.numel()


def test_tensor_and_array_scalars_are_shown_as_numbers() -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    clock = FakeClock()
    progress, stream = make(clock, total=10)
    progress.start()
    metrics = {"loss": torch.tensor(0.25), "acc": np.float64(0.5)}
    progress.log(1, metrics, best={"loss": np.float32(0.25)})
    progress.close()
    fields = tokens(stream.getvalue().splitlines()[-1])
    assert fields["loss"] == "0.25" and fields["acc"] == "0.5" and fields["best_loss"] == "0.25@1"
    assert type(progress.snapshot()["metrics"]["loss"]) is float


def test_a_counter_that_starts_again_from_zero_keeps_a_positive_rate() -> None:
    clock = FakeClock()
    progress, _ = make(clock, total=100)
    progress.start()
    progress.count("evaluations", 0, total=50)
    for generation in range(3):  # 50 evaluations a generation, 1 per second
        progress.count("generation", generation, total=10)
        for done in range(1, 51):
            clock.advance(1.0)
            progress.count("evaluations", done)
        progress.count("evaluations", 0)
    counters = progress.snapshot()["counters"]
    assert counters["evaluations"] == {"value": 0, "total": 50, "rate": pytest.approx(1.0)}
    assert counters["generation"]["value"] == 2 and counters["generation"]["total"] == 10


def test_the_live_display_shows_every_figure_on_its_own_lines() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    clock = FakeClock()
    progress = Progress(total=400, renderer=RichRenderer(console=console), clock=clock)
    progress.start()
    progress.set_phase("self-play")
    for step in range(1, 101):
        clock.advance(0.1)
        progress.update(step)
    progress.count("games", 120, total=1000)
    progress.count("generation", 3, total=20)
    progress.log(100, {"loss": 0.4123}, best={"val_loss": {"value": 0.39, "step": 90}})
    progress.checkpoint_saved(90, "/r/checkpoints/step-000090")
    clock.advance(12.0)
    progress.close()
    final = buffer.getvalue().split("100/400")[-1]  # the last frame drawn
    lines = [line.strip() for line in final.splitlines() if line.strip()]
    assert lines[1] == "phase=self-play games=120/1000 generation=3/20"
    assert lines[2] == "loss=0.4123"
    assert lines[3] == "best_val_loss=0.39@90"
    machine = tokens(lines[4])
    assert machine["ckpt_age"] == "12s"
    assert machine["cpu"].endswith("%") and machine["rss"].endswith("B")


RUN_LIVE_SCRIPT = """
import logging
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
import killsafe
with killsafe.Run({run_dir!r}, total_steps=30, save_every_steps=10, keyboard=False,
                   best=("loss", "min")) as run:
    assert type(run._progress._renderer).__name__ == "RichRenderer"
    run.set_phase("self-play")
    for step in run.steps():
        run.count("games", 2 * (step + 1), total=60)
        run.log(loss=1.0 / (step + 1))
        if (step + 1) % 10 == 0:
            print(f"user print at {{step + 1}}")
            logging.getLogger("user").info("user log at %d", step + 1)
print("after the run")
"""


def test_a_run_on_a_terminal_keeps_user_output_whole_and_shows_its_figures(
    tmp_path: Path,
) -> None:
    output = run_in_terminal(RUN_LIVE_SCRIPT.format(run_dir=str(tmp_path / "run")))
    text = output.decode(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    lines = [line.strip() for line in re.split(r"\r\n|\r|\n", plain)]
    for step in (10, 20, 30):
        assert f"user print at {step}" in lines
        assert f"LOG user user log at {step}" in lines
    # The run's own summary, logged through the user's handler: whole, if wrapped to the width.
    unwrapped = re.sub(r" ?\r\n", " ", plain)
    assert "LOG killsafe killsafe: finished at step 30 of 30 (finished); 30 steps" in unwrapped
    assert "after the run" in lines
    final = plain.split("30/30")[-1]  # the last frame of the live display
    assert "phase=self-play games=60/60" in final
    assert "loss=0.03333" in final and "best_loss=0.03333@30" in final
    assert "ckpt_age=" in final and "cpu=" in final and "rss=" in final


def test_a_long_message_stays_one_line_above_the_display() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=40, color_system=None)
    progress = Progress(total=10, renderer=RichRenderer(console=console), clock=FakeClock())
    progress.start()
    text = "killsafe: stopped at step 7 of 10 (keyboard); checkpoint runs/a/checkpoints/step-7"
    progress.message(text)
    progress.close()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    assert text in re.split(r"\r\n|\r|\n", plain)


class LockedStream(io.StringIO):
    """A StringIO that the watch thread and the test can share."""

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_inside_a_long_step_plain_lines_still_come_every_interval() -> None:
    stream = LockedStream()
    progress = Progress(total=100, every=0.05, stream=stream)
    progress.start()
    for step in range(1, 6):
        progress.update(step)
    # Step 6 is a long evaluation: the loop calls nothing but set_phase and count.
    progress.set_phase("evaluation")
    for done in range(1, 4):
        progress.count("evaluations", done, total=50)
        count = len(stream.lines())
        wait_until(lambda count=count: len(stream.lines()) > count)
    progress.close()
    lines = stream.lines()
    assert len(lines) >= 4 and all(line.startswith("progress step=5/100 ") for line in lines[-4:])
    watched = [tokens(line) for line in lines[:-1]]
    assert [w["evaluations"] for w in watched[-3:]] == ["1/50", "2/50", "3/50"]
    assert all(w["phase"] == "evaluation" for w in watched[-3:])
    assert tokens(lines[-1])["evaluations"] == "3/50"  # the last line comes from close


def test_the_watch_thread_stops_at_close_and_can_be_left_out() -> None:
    renderer = PlainRenderer(LockedStream(), interval=0.05)
    progress = Progress(total=10, renderer=renderer)
    progress.start()
    thread = renderer._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    progress.close()
    assert not thread.is_alive()
    quiet = PlainRenderer(LockedStream(), interval=0.05, watch=False)
    quiet.start(lambda: {"step": 1})
    assert quiet._thread is None


def test_a_live_display_shows_a_message_said_before_it_starts() -> None:
    stream = io.StringIO()
    renderer = RichRenderer(stream)
    renderer.message("dashboard at http://127.0.0.1:8000")  # said while the run opens
    assert stream.getvalue() == "dashboard at http://127.0.0.1:8000\n"
