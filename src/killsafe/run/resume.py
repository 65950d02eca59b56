"""Resuming: which checkpoint to continue from, and restoring tracked objects in place."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from killsafe.errors import CheckpointNotFound, ConfigError, CorruptCheckpoint, StateMismatch
from killsafe.run.tree import RNG_KEY, RUN_KEY

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo
    from killsafe.store import CheckpointStore

__all__ = ["Resume", "check_shapes"]

logger = logging.getLogger("killsafe")

MAX_SHOWN_PROBLEMS = 12


class Resume:
    """The checkpoint a session continues from, and its tree until everything is restored.

    ``choose()`` applies ``resume=`` (``auto``, ``never``, ``ask``, or a
    reference) and loads the chosen checkpoint; ``restore(objects)`` puts its
    values into tracked objects; ``restore_rng(rng)`` comes last, just before
    the first step, and drops the tree.
    """

    def __init__(
        self,
        store: CheckpointStore,
        directory: Path,
        store_dir: Path,
        ref: str | int | os.PathLike[str],
        *,
        clear: bool,
    ) -> None:
        self._store = store
        self._directory = directory
        self._store_dir = store_dir
        self._ref = ref
        self._clear = clear
        self.info: CheckpointInfo | None = None
        self._tree: Mapping[str, Any] | None = None

    def choose(self) -> CheckpointInfo | None:
        """The checkpoint to resume from, loaded (``None``: a fresh start)."""
        info = self._resolve()
        if info is not None:
            if self._tree is None:
                self._tree = self._load(info)
            self._warn_if_newer(info)
        self.info = info
        return info

    def _load(self, info: CheckpointInfo) -> Mapping[str, Any]:
        if info.sharded:  # saved by a job of many processes: read as its rank 0
            from killsafe.run.sharded_tree import tree_of

            return tree_of(self._store, info, 0, 1)
        tree: Mapping[str, Any] = self._store.load(info)
        return tree

    @property
    def run_state(self) -> Any:
        """The run's own state in the checkpoint (best values, stop policies), if any."""
        return None if self._tree is None else self._tree.get(RUN_KEY)

    def restore(self, objects: Mapping[str, Any]) -> dict[str, Any]:
        """``objects`` with their saved values restored (as they are when fresh).

        Raises ``StateMismatch`` when the checkpoint lacks a name or its shapes differ.
        """
        restored: dict[str, Any] = dict(objects)
        if self._tree is None:
            return restored
        from killsafe import state as state_module

        self._check_names(objects)
        targets = self._targets(objects)
        rest = self._restore_together(targets)
        saved = {name: self._saved(name, target) for name, target in rest.items()}
        check_shapes(rest, saved, self.info)
        values = state_module.restore(rest, saved)
        for name, value in values.items():
            if targets[name] is not objects[name]:
                continue  # restored inside its wrapper
            restored[name] = _restore_in_place(objects[name], value)
        return restored

    def _targets(self, objects: Mapping[str, Any]) -> Mapping[str, Any]:
        """What the saved values go into: a sharded checkpoint holds DDP's inner modules."""
        if self.info is None or not self.info.sharded:
            return objects
        from killsafe.run.sharded_tree import unwrapped

        return unwrapped(objects)

    def _restore_together(self, targets: Mapping[str, Any]) -> Mapping[str, Any]:
        """Restore what every process of a job loads at once; return the rest (here, all)."""
        return targets

    def _saved(self, name: str, target: Any) -> Any:
        """The saved value of ``name``, as it is restored into ``target``."""
        assert self._tree is not None
        return self._tree[name]

    def restore_rng(self, rng: Any) -> None:
        # Last of all, just before the first step: restoring other objects and
        # building iterators in between must not shift the random streams.
        if self._tree is not None and RNG_KEY in self._tree:
            rng.load_state_dict(self._tree[RNG_KEY])
        self._tree = None

    def _check_names(self, objects: Mapping[str, Any]) -> None:
        assert self._tree is not None
        tree = self._tree
        missing = [name for name in objects if name not in tree]
        if missing:
            where = self.info.path if self.info else "the checkpoint"
            raise StateMismatch(
                f"{where} has no saved state for {', '.join(missing)}; it holds "
                f"{', '.join(sorted(k for k in tree if not k.startswith('__')))}"
                "; track the same names as the run that saved it, or resume='never'"
            )

    # -- which checkpoint ---------------------------------------------------

    def _resolve(self) -> CheckpointInfo | None:
        ref = self._ref
        if isinstance(ref, str) and ref.strip().isdigit():
            ref = int(ref)
        if ref == "auto":
            return self._load_newest_good()
        if ref == "never":
            self._refuse_or_clear()
            return None
        if ref == "ask":
            return self._ask()
        try:
            return self._store.get(ref)
        except CheckpointNotFound as exc:
            raise CheckpointNotFound(
                f"resume={ref!r}: no such checkpoint in {self._store_dir} ({exc}); "
                "list them with `killsafe list`, or pass resume='auto' or 'never'"
            ) from exc

    def _warn_if_newer(self, info: CheckpointInfo) -> None:
        newer = [c.step for c in self._store.list() if c.step > info.step]
        if newer:
            logger.warning(
                "resuming from step %d although %s holds newer checkpoints (steps %s); "
                "valid ones are replaced as this run reaches their steps, damaged ones kept",
                info.step,
                self._store_dir,
                ", ".join(map(str, newer)),
            )

    def _load_newest_good(self) -> CheckpointInfo | None:
        """The newest checkpoint that loads, loaded: one read that also verifies."""
        for info in reversed(self._store.list()):
            try:
                self._tree = self._load(info)
            except CorruptCheckpoint as exc:
                logger.warning("skipping corrupt checkpoint %s: %s", info.path, exc)
                continue
            return info
        return None

    def _refuse_or_clear(self) -> None:
        existing = self._store.list()
        if not existing:
            return
        if not self._clear:
            raise ConfigError(
                f"resume='never' but {self._store_dir} holds {len(existing)} "
                f"checkpoint(s) up to step {existing[-1].step}; pass clear=True (--clear) to "
                "delete them, resume='auto' to continue, or use another directory"
            )
        for info in existing:
            self._delete(info)
        logger.info("cleared %d checkpoint(s) from %s", len(existing), self._store_dir)

    def _delete(self, info: CheckpointInfo) -> None:
        self._store.delete(info, force=True)

    def _ask(self) -> CheckpointInfo | None:
        found = self._store.list()
        latest = self._store.latest() if found else None
        if latest is None:
            return None
        if not (sys.stdin is not None and sys.stdin.isatty()):
            logger.info("resume='ask' without a terminal: resuming from step %d", latest.step)
            return latest
        sys.stderr.write(
            f"{self._directory}: {len(found)} checkpoint(s); newest: {_describe(latest)}\n"
            f"Resume from step {latest.step}? [Y]es / [n]ew run (deletes them) / a step number: "
        )
        sys.stderr.flush()
        answer = (sys.stdin.readline() or "").strip().lower()
        if answer in ("", "y", "yes"):
            return latest
        if answer.isdigit():
            return self._store.get(int(answer))
        if answer in ("n", "no", "new"):
            self._clear = True
            self._refuse_or_clear()
            return None
        raise ConfigError(f"resume='ask': answer {answer!r} not understood; use y, n or a step")


def _describe(info: CheckpointInfo) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
    metrics = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in list(info.metrics.items())[:4]
    )
    text = f"step {info.step}, {when}, reason {info.reason}"
    return text + (f", {metrics}" if metrics else "")


def check_shapes(
    targets: Mapping[str, Any], saved: Mapping[str, Any], info: CheckpointInfo | None
) -> None:
    """Raise ``StateMismatch`` listing the keys and shapes that differ, module by module.

    Only flat name -> tensor mappings (a module's ``state_dict()``) are
    compared; a framework's own message names one mismatch in a traceback.
    """
    problems: list[str] = []
    for name, target in targets.items():
        if not hasattr(target, "state_dict") or not isinstance(saved[name], Mapping):
            continue
        current = target.state_dict()
        if not (_tensor_table(current) and _tensor_table(saved[name])):
            continue
        problems.extend(_table_differences(name, current, saved[name]))
    if problems:
        shown = "; ".join(problems[:MAX_SHOWN_PROBLEMS])
        extra = len(problems) - MAX_SHOWN_PROBLEMS
        more = f"; and {extra} more" if extra > 0 else ""
        where = info.path if info is not None else "the checkpoint"
        raise StateMismatch(
            f"{where} does not fit: {shown}{more}; build the objects as the run that saved "
            "it did, or start fresh with resume='never'"
        )


def _tensor_table(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and hasattr(v, "shape") for k, v in value.items())
    )


def _table_differences(
    name: str, current: Mapping[str, Any], saved: Mapping[str, Any]
) -> list[str]:
    problems = [f"{name}.{k} missing from the checkpoint" for k in current if k not in saved]
    problems += [f"{name}.{k} unexpected in the checkpoint" for k in saved if k not in current]
    for key, value in current.items():
        if key in saved and tuple(value.shape) != tuple(saved[key].shape):
            problems.append(
                f"{name}.{key} shape {tuple(saved[key].shape)} in the checkpoint, "
                f"{tuple(value.shape)} now"
            )
    return problems


def _restore_in_place(original: Any, value: Any) -> Any:
    """Put a restored plain value into the user's own dict, list, array or tensor."""
    if original is value:
        return value
    if _same_shape_array(original, value):
        if hasattr(original, "copy_"):  # a torch tensor
            original.copy_(value)
        else:  # a numpy array
            original[...] = value
        return original
    if isinstance(original, dict) and isinstance(value, Mapping):
        original.clear()
        original.update(value)
        return original
    if isinstance(original, list) and isinstance(value, (list, tuple)):
        original[:] = value
        return original
    return value


def _same_shape_array(original: Any, value: Any) -> bool:
    shape = getattr(original, "shape", None)
    return (
        shape is not None
        and type(original) is type(value)
        and getattr(value, "shape", None) == shape
        and getattr(value, "dtype", None) == getattr(original, "dtype", None)
        and hasattr(original, "__setitem__")
    )
