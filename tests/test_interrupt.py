"""Signal handlers that only set a flag, chaining, restoring, and the ``q`` keyboard monitor."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

from killsafe.errors import ConfigError
from killsafe.interrupt import KeyboardMonitor, StopRequests, parse_signal, signal_reason


@pytest.fixture
def requests() -> Iterator[StopRequests]:
    stops = StopRequests(["SIGUSR1"])
    assert stops.install()
    try:
        yield stops
    finally:
        stops.restore()


def _deliver(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    # The Python-level handler runs between bytecodes of the main thread.
    for _ in range(1000):
        time.sleep(0)


@pytest.mark.parametrize(
    ("sig", "reason"),
    [
        (signal.SIGINT, "keyboard"),
        (signal.SIGTERM, "signal:SIGTERM"),
        (signal.SIGUSR1, "signal:SIGUSR1"),
    ],
)
def test_a_signal_only_records_a_stop(
    requests: StopRequests, sig: signal.Signals, reason: str
) -> None:
    _deliver(sig)
    assert requests.reason == reason
    assert requests.requested


def test_the_first_reason_wins_and_repeats_are_counted(requests: StopRequests) -> None:
    _deliver(signal.SIGTERM)
    _deliver(signal.SIGTERM)
    _deliver(signal.SIGUSR1)
    assert requests.reason == "signal:SIGTERM"
    assert requests.count == 3


def test_a_second_ctrl_c_raises_keyboard_interrupt(requests: StopRequests) -> None:
    _deliver(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)


def test_ctrl_c_after_sigterm_is_still_graceful(requests: StopRequests) -> None:
    _deliver(signal.SIGTERM)
    _deliver(signal.SIGINT)
    assert requests.reason == "signal:SIGTERM"


def test_the_previous_handler_is_chained_and_restored() -> None:
    seen: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    original = signal.signal(signal.SIGUSR2, previous)
    try:
        stops = StopRequests(["USR2"])
        stops.install()
        assert signal.getsignal(signal.SIGUSR2) != previous
        _deliver(signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
        assert stops.reason == "signal:SIGUSR2"
        stops.restore()
        assert signal.getsignal(signal.SIGUSR2) is previous
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGUSR2, original)


def test_handlers_are_not_installed_off_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGTERM)
    results: list[bool] = []
    stops = StopRequests()
    thread = threading.Thread(target=lambda: results.append(stops.install()))
    thread.start()
    thread.join()
    assert results == [False]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SIGUSR1", signal.SIGUSR1),
        ("usr2", signal.SIGUSR2),
        (15, signal.SIGTERM),
        (signal.SIGHUP, signal.SIGHUP),
    ],
)
def test_parse_signal(value: str | int, expected: signal.Signals) -> None:
    assert parse_signal(value) == expected


@pytest.mark.parametrize("value", ["SIGNOPE", 999, "twelve"])
def test_parse_signal_refuses_unknown(value: str | int) -> None:
    with pytest.raises(ConfigError):
        parse_signal(value)


def test_signal_reason() -> None:
    assert signal_reason(signal.SIGINT) == "keyboard"
    assert signal_reason(signal.SIGUSR2) == "signal:SIGUSR2"


def test_keyboard_monitor_ignores_a_stream_that_is_not_a_terminal() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as stream:
        monitor = KeyboardMonitor(lambda: None, stream)
        assert monitor.start() is False
        assert not monitor.running
        monitor.stop()
    os.close(write_end)


def test_keyboard_monitor_stops_on_q_and_restores_the_terminal() -> None:
    import termios

    master, slave = os.openpty()
    quit_event = threading.Event()
    try:
        with os.fdopen(os.dup(slave)) as stream:
            settings = termios.tcgetattr(slave)
            monitor = KeyboardMonitor(quit_event.set, stream, poll=0.05)
            assert monitor.start()
            os.write(master, b"hello\n")
            assert not quit_event.wait(0.2)
            os.write(master, b"q\n")
            assert quit_event.wait(5)
            # Someone else changes the settings meanwhile: they are put back.
            changed = termios.tcgetattr(slave)
            changed[3] &= ~termios.ECHO
            termios.tcsetattr(slave, termios.TCSANOW, changed)
            monitor.stop()
            assert not monitor.running
            assert termios.tcgetattr(slave) == settings
            assert not [t for t in threading.enumerate() if t.name == "killsafe-keyboard"]
    finally:
        os.close(master)
        os.close(slave)


def test_keyboard_monitor_thread_ends_without_input() -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave)) as stream:
            monitor = KeyboardMonitor(lambda: None, stream, poll=10.0)
            assert monitor.start()
            monitor.stop()  # the wake-up pipe ends it long before the 10 s poll
            assert not monitor.running
    finally:
        os.close(master)
        os.close(slave)
