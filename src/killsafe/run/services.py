"""What a session starts beside the loop: history, progress, the keyboard watch, the dashboard."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

from killsafe.history import History
from killsafe.interrupt import KeyboardMonitor, StopRequests
from killsafe.progress import Progress
from killsafe.run.config import RunConfig

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo

__all__ = ["Services"]

logger = logging.getLogger("killsafe")


class Services:
    """The history files, the progress display, the keyboard monitor and the dashboard child.

    None of them may stop a run: a dashboard that fails to start is a warning.
    """

    def __init__(self, config: RunConfig) -> None:
        self._config = config
        self.history: History | None = None
        self.progress: Progress | None = None
        self.keyboard: KeyboardMonitor | None = None
        self.server: Any = None

    def open_display(self, step: int, total: int | None) -> Progress:
        """The history and the progress display; ``cut_history`` before the first record."""
        config = self._config
        self.history = History(
            config.directory, csv=config.save_metrics, tensorboard=config.tensorboard
        )
        self.progress = Progress(
            total=total,
            start_step=step,
            every=config.progress_every,
            enabled=config.progress,
        )
        return self.progress

    def cut_history(self, step: int | None) -> None:
        """Drop the history after ``step``, the checkpoint resumed from (all of it: None)."""
        assert self.history is not None
        self.history.truncate_after(-1 if step is None else step)

    def open_quiet(self, step: int, total: int | None) -> Progress:
        """For a run found finished: a history that is not rewritten, no display."""
        self.history = History(self._config.directory)
        self.progress = Progress(total=total, start_step=step, enabled=False)
        return self.progress

    def start_keyboard(self, interrupts: StopRequests) -> bool:
        """Watch for ``q`` + Enter (on an interactive terminal); returns whether it does."""
        if self._config.keyboard is False:
            return False
        monitor = KeyboardMonitor(lambda: interrupts.request("keyboard"))
        if monitor.start():
            self.keyboard = monitor
        return self.keyboard is not None

    def start_server(self) -> None:
        serve = self._config.serve
        if serve is None or serve is False:
            return
        port = 0 if serve is True else int(serve)
        try:
            launcher = importlib.import_module("killsafe.server.launcher")
            self.server = launcher.start_child_server(
                self._config.directory,
                host="127.0.0.1",
                port=port,
                limits=self._config.serve_limits,
            )
        except Exception as exc:  # the dashboard must never stop a run from starting
            logger.warning("dashboard not started: %s", exc)
            return
        # The server logs its address; show it on the display when nobody logs.
        self.show(f"dashboard at {self.server.url}")

    def show(self, text: str) -> None:
        """Show ``text`` on the progress display when nobody configured logging."""
        if self._config.progress and self.progress is not None and not logger.hasHandlers():
            self.progress.message(text)

    def announce(self, text: str) -> None:
        """Log ``text``, and show it on the display when nobody configured logging."""
        logger.info(text)
        self.show(text)

    def flush_history(self) -> None:
        if self.history is not None:
            self.history.flush()  # mirrors hold every step the checkpoint holds

    def checkpoint_shown(self, info: CheckpointInfo) -> None:
        assert self.progress is not None
        self.progress.checkpoint_saved(info.step, info.path)

    def say(self, text: str) -> None:
        """One line that must be seen even when nobody logs and there is no display."""
        logger.info(text)
        if self._config.progress and not logger.hasHandlers():
            sys.stderr.write(text + "\n")

    def stop_keyboard(self) -> None:
        if self.keyboard is not None:
            self.keyboard.stop()

    def close_display(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.history is not None:
            self.history.close()

    def close_server(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.close()

    def resources(self) -> dict[str, Any]:
        """Peak memory and CPU time so far, for ``run.json`` (empty when unknown)."""
        if self.progress is None:
            return {}
        with contextlib.suppress(Exception):  # figures only; never spoil the exit
            return dict(self.progress.resources.sample())
        return {}
