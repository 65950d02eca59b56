"""``RunConfig``: every keyword of ``Run``, validated once, when the run is made."""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from killsafe.environment import getenv
from killsafe.errors import ConfigError
from killsafe.history import require_tensorboard
from killsafe.interrupt import StopRequests
from killsafe.policy import (
    AnyOf,
    EveryEpochOrNSeconds,
    EveryNEpochs,
    EveryNSeconds,
    EveryNSteps,
    OnExit,
    OnImprovement,
    OnRequest,
    SavePolicy,
    StopPolicy,
    TimeLimit,
    parse_duration,
)
from killsafe.rundir import CHECKPOINTS_DIR
from killsafe.saver import check_if_busy

if TYPE_CHECKING:
    import argparse

__all__ = ["CALLBACKS", "DEFAULT_SAVE_SECONDS", "Callback", "RunConfig", "keywords_from_args"]

DEFAULT_SAVE_SECONDS = 600.0
"""With no save policy given, a run saves every epoch of ``run.epochs()``, else every
10 minutes of wall time, and on exit."""

DEFAULT_MIRROR_GRACE = 25.0
"""Seconds a stopping run waits for its uploads to the mirror (within the 30 s that
Kubernetes and spot notices allow)."""

Callback = Callable[..., Any]
CALLBACKS = ("on_save", "on_stop", "on_finish", "on_error")

StopPolicies = StopPolicy | list[StopPolicy] | tuple[StopPolicy, ...] | None


@dataclass(frozen=True)
class RunConfig:
    """What a ``Run`` was asked to do; see ``Run`` for the meaning of each field.

    Built by ``RunConfig.build`` from ``Run``'s keywords: the shortcuts become
    policies (``save_every_steps`` -> ``EveryNSteps``, ``stop_after`` ->
    ``TimeLimit``), and a bad value raises ``ConfigError`` there, before
    anything touches the disk.
    """

    directory: Path
    total_steps: int | None
    save_policy: AnyOf
    stop_policies: tuple[StopPolicy, ...]
    best: tuple[str, str] | None
    keep_last: int | None
    keep_best: int | None
    resume: str | int | os.PathLike[str]
    clear: bool
    signals: tuple[signal.Signals, ...]
    keyboard: bool | None
    progress: bool
    progress_every: float
    serve: bool | int | None
    serve_limits: Any
    compression: str | None
    async_save: bool
    if_busy: str
    snapshot: str
    user: Mapping[str, Any]
    save_metrics: bool
    tensorboard: bool
    report: bool
    callbacks: Mapping[str, Callback | None] = field(default_factory=dict)
    mirror: str | None = None
    mirror_keep_last: int | None = 3
    mirror_grace: float = DEFAULT_MIRROR_GRACE
    incremental: bool = False
    requeue: bool = False

    @classmethod
    def build(
        cls,
        directory: str | os.PathLike[str],
        *,
        total_steps: int | None = None,
        save_every_steps: int | None = None,
        save_every_seconds: float | str | None = None,
        save_every_epochs: int | None = None,
        keep_last: int | None = 3,
        keep_best: int | None = None,
        best: tuple[str, str] | str | None = None,
        resume: str | int | os.PathLike[str] = "auto",
        clear: bool = False,
        save: SavePolicy | None = None,
        stop_policy: StopPolicies = None,
        stop_after: float | str | None = None,
        save_on_exit: bool = True,
        signals: tuple[str | int, ...] | list[str | int] = (),
        keyboard: bool | None = None,
        progress: bool = True,
        progress_every: float = 30.0,
        serve: bool | int | None = None,
        serve_limits: Any = None,
        compression: str | None = None,
        async_save: bool = True,
        if_busy: str = "wait",
        snapshot: str = "auto",
        config: Mapping[str, Any] | None = None,
        save_metrics: bool = False,
        tensorboard: bool = False,
        report: bool = True,
        callbacks: Mapping[str, Callback | None] | None = None,
        mirror: str | os.PathLike[str] | None = None,
        mirror_keep_last: int | None = 3,
        mirror_grace: float = DEFAULT_MIRROR_GRACE,
        incremental: bool = False,
        requeue: bool = False,
    ) -> RunConfig:
        """Validate ``Run``'s keywords (same names, same defaults) into one config."""
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 0):
            raise ConfigError(f"total_steps={total_steps!r}: use a whole number >= 0 or None")
        best_spec = _best_spec(best)
        save_policy = _build_save_policy(
            save,
            _Periodic(save_every_steps, save_every_seconds, save_every_epochs),
            on_exit=save_on_exit,
        )
        stop_policies = _build_stop_policies(stop_policy, stop_after)
        caught = StopRequests(signals).signals
        checked_serve = _checked_serve(serve)
        if serve_limits is not None:  # checked now, not when the run starts serving
            importlib.import_module("killsafe.server.launcher").check_limits(serve_limits)
        check_if_busy(if_busy)
        if tensorboard:
            require_tensorboard()
        _check_mirror(mirror_keep_last, mirror_grace)
        if not isinstance(requeue, bool):
            raise ConfigError(f"requeue={requeue!r}: use True or False")
        return cls(
            directory=Path(directory),
            total_steps=total_steps,
            save_policy=save_policy,
            stop_policies=tuple(stop_policies),
            best=best_spec,
            keep_last=keep_last,
            keep_best=keep_best if keep_best is not None or best is None else 1,
            resume=getenv("RESUME") or resume,
            clear=clear,
            signals=caught,
            keyboard=keyboard,
            progress=progress,
            progress_every=progress_every,
            serve=checked_serve,
            serve_limits=serve_limits,
            compression=compression,
            async_save=async_save,
            if_busy=if_busy,
            snapshot=snapshot,
            user=dict(config or {}),
            save_metrics=save_metrics,
            tensorboard=tensorboard,
            report=report,
            callbacks=dict(callbacks or {}),
            mirror=None if mirror is None else os.fspath(mirror),
            mirror_keep_last=mirror_keep_last,
            mirror_grace=float(mirror_grace),
            incremental=bool(incremental),
            requeue=requeue,
        )

    @property
    def store_dir(self) -> Path:
        """Where the run's checkpoints live."""
        return self.directory / CHECKPOINTS_DIR

    def store_options(self) -> dict[str, Any]:
        """The options the run's local store and its mirror share."""
        return {
            "keep_best": self.keep_best,
            "best": self.best,
            "compression": self.compression,
            "incremental": self.incremental,
        }

    def record(self, *, total_steps: int | None) -> dict[str, Any]:
        """The ``config`` section of ``run.json`` (``total_steps``: as the run has it now)."""
        return {
            "total_steps": total_steps,
            "save": repr(self.save_policy),
            "stop": [repr(p) for p in self.stop_policies],
            "keep_last": self.keep_last,
            "keep_best": self.keep_best,
            "best": list(self.best) if self.best else None,
            "resume": str(self.resume),
            "signals": [s.name for s in self.signals],
            "mirror": self.mirror,
            "user": self.user,
        }

    def watched_metrics(self) -> dict[str, str]:
        """Metric name -> "min"/"max" for ``best`` and the ``OnImprovement`` policies."""
        watched: dict[str, str] = {}
        if self.best is not None:
            watched[self.best[0]] = self.best[1]
        for item in self.save_policy.policies:
            if isinstance(item, OnImprovement):
                watched.setdefault(item.metric, item.mode)
        return watched


def keywords_from_args(args: argparse.Namespace, **options: Any) -> dict[str, Any]:
    """``Run``'s keywords (``directory`` included) from ``killsafe.add_arguments`` flags.

    ``options`` are the script's defaults; a flag given on the command line wins.
    """
    from killsafe.arguments import options_from_args

    return options_from_args(args, **options)


def _check_mirror(keep_last: int | None, grace: float) -> None:
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise ConfigError(f"mirror_keep_last={keep_last!r}: use a whole number >= 1 or None")
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise ConfigError(f"mirror_grace={grace!r}: use seconds >= 0")


@dataclass(frozen=True)
class _Periodic:
    """The ``save_every_*`` shortcuts as given."""

    steps: int | None
    seconds: float | str | None
    epochs: int | None

    def policies(self) -> list[SavePolicy]:
        found: list[SavePolicy] = []
        if self.steps is not None:
            found.append(EveryNSteps(self.steps))
        if self.seconds is not None:
            found.append(EveryNSeconds(parse_duration(self.seconds)))
        if self.epochs is not None:
            found.append(EveryNEpochs(self.epochs))
        return found


def _build_save_policy(save: SavePolicy | None, periodic: _Periodic, *, on_exit: bool) -> AnyOf:
    # The first reason given wins: the exit's, then the regular policies', then a request's.
    policies: list[SavePolicy] = [OnExit()] if on_exit else []
    policies += periodic.policies()
    if save is not None:
        if not isinstance(save, SavePolicy):
            raise ConfigError(f"save={save!r}: pass a save policy such as policy.EveryNSteps(500)")
        policies.append(save)
    if on_exit and len(policies) == 1:
        # Nothing asked: a kill must not lose the whole run (save_on_exit=False
        # or any policy turns this default off).
        policies.append(EveryEpochOrNSeconds(DEFAULT_SAVE_SECONDS))
    policies.append(OnRequest())
    return AnyOf(*policies)


def _build_stop_policies(
    stop_policy: StopPolicies, stop_after: float | str | None
) -> list[StopPolicy]:
    if stop_policy is None:
        policies: list[StopPolicy] = []
    elif isinstance(stop_policy, (list, tuple)):
        policies = list(stop_policy)
    else:
        policies = [stop_policy]
    for policy in policies:
        if not isinstance(policy, StopPolicy):
            raise ConfigError(
                f"stop_policy={policy!r}: pass a stop policy such as policy.EarlyStopping(...)"
            )
    if stop_after is not None:
        policies.append(TimeLimit(parse_duration(stop_after)))
    return policies


def _checked_serve(serve: Any) -> bool | int | None:
    """``serve=``: ``None``/``False`` (no dashboard), ``True`` (a free port) or a port."""
    if serve is None or isinstance(serve, bool):
        return serve
    if isinstance(serve, int) and 0 <= serve <= 65535:
        return serve
    raise ConfigError(
        f"serve={serve!r}: use True (a free port), a port number from 0 to 65535, "
        "or None for no dashboard"
    )


def _best_spec(best: tuple[str, str] | str | None) -> tuple[str, str] | None:
    if best is None:
        return None
    if isinstance(best, str):
        return (best, "min")
    if (
        isinstance(best, (tuple, list))
        and len(best) == 2
        and isinstance(best[0], str)
        and best[1] in ("min", "max")
    ):
        return (best[0], best[1])
    raise ConfigError(f"best={best!r}: use ('metric', 'min') or ('metric', 'max')")
