"""State trees: the Stateful protocol, capture (validate) and restore, RNG state.

A *state tree* holds None, bool, int, float, str, bytes, list, tuple, dict
(str or int keys), set, frozenset, numpy arrays and scalars, torch tensors,
Stateful objects (anything with ``state_dict()`` and ``load_state_dict()``)
and random generators a script owns (``random.Random``, ``torch.Generator``,
numpy's ``Generator``, ``BitGenerator`` and ``RandomState``), which are saved
as plain data: ``{"generator": KIND, "state": ...}``.
torch and numpy are never imported here: they are looked up in
``sys.modules``, so a value can only be a tensor if torch is already loaded.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Mapping
from types import GeneratorType
from typing import Any, Protocol, runtime_checkable

from killsafe.errors import StateMismatch, UnsupportedState

__all__ = [
    "RNGState",
    "Stateful",
    "capture",
    "format_path",
    "generator_kind",
    "generator_state",
    "restore",
    "set_generator_state",
]

_PLAIN = (type(None), bool, int, float, str, bytes)


@runtime_checkable
class Stateful(Protocol):
    """Anything that can hand out its state and take it back."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def format_path(path: tuple[Any, ...]) -> str:
    """Render a path like ``state["optimizer"]["param_groups"][0]``."""
    return "state" + "".join(
        f"[{part!r}]" if not isinstance(part, _SetItem) else "{...}" for part in path
    )


class _SetItem:
    """Path marker for an element of a set (sets have no index)."""


def _torch_module() -> Any:
    return sys.modules.get("torch")


def _numpy_module() -> Any:
    return sys.modules.get("numpy")


def is_torch_tensor(value: Any) -> bool:
    """True when ``value`` is a torch tensor (without importing torch)."""
    torch = _torch_module()
    return torch is not None and isinstance(value, torch.Tensor)


def is_numpy_array(value: Any) -> bool:
    """True when ``value`` is a numpy ndarray (without importing numpy)."""
    np = _numpy_module()
    return np is not None and isinstance(value, np.ndarray)


def is_numpy_scalar(value: Any) -> bool:
    """True when ``value`` is a numpy scalar such as ``np.float32(1)``."""
    np = _numpy_module()
    return np is not None and isinstance(value, np.generic)


def tensors_in(tree: Any) -> Iterator[Any]:
    """Every torch tensor of a (captured) tree."""
    stack = [tree]
    while stack:
        value = stack.pop()
        if is_torch_tensor(value):
            yield value
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)


def _refuse(path: tuple[Any, ...], value: Any, hint: str) -> UnsupportedState:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    return UnsupportedState(f"cannot save {format_path(path)} of type {kind}: {hint}")


def check_tensor(value: Any, path: tuple[Any, ...]) -> None:
    """Refuse tensors that cannot be stored byte for byte."""
    if value.is_quantized:
        raise _refuse(
            path, value, "quantized tensors are not supported; save .dequantize() or int_repr()"
        )
    if value.layout is not _torch_module().strided:
        raise _refuse(path, value, f"{value.layout} tensors are not supported; save .to_dense()")
    if value.device.type == "meta":
        raise _refuse(path, value, "meta tensors hold no data; materialize the module first")
    if type(value).__name__ == "FakeTensor" or getattr(value, "_is_functional", False):
        raise _refuse(path, value, "fake or functional tensors hold no data")


def check_array(value: Any, path: tuple[Any, ...]) -> None:
    """Refuse numpy arrays whose dtype cannot be stored as plain bytes."""
    if value.dtype.kind not in "biufcmMSU" or value.dtype.fields is not None:
        raise _refuse(
            path, value, f"numpy dtype {value.dtype} is not supported; convert to a numeric dtype"
        )


def capture(tree: Any) -> Any:
    """Return the tree with every Stateful replaced by its ``state_dict()``.

    Every value is validated; tensors and arrays are not copied. Raises
    ``UnsupportedState`` naming the exact path of the first bad value.
    """
    return _capture(tree, (), set())


def _capture(value: Any, path: tuple[Any, ...], active: set[int]) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if is_torch_tensor(value):
        check_tensor(value, path)
        return value
    if is_numpy_array(value):
        check_array(value, path)
        return value
    if is_numpy_scalar(value):
        if value.dtype.kind not in "biufcmMSU":
            raise _refuse(
                path, value, "only numeric, bool, date and string numpy scalars are supported"
            )
        return value
    if generator_kind(value) is not None:
        return _capture(generator_state(value), path, active)
    marker = id(value)
    if marker in active:
        raise _refuse(path, value, "the state contains a reference cycle; break the cycle")
    active.add(marker)
    try:
        return _capture_container(value, path, active)
    finally:
        active.discard(marker)


def _capture_container(value: Any, path: tuple[Any, ...], active: set[int]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise UnsupportedState(
                    f"cannot save {format_path(path)}: key {key!r} of type "
                    f"{type(key).__name__} is not a str or int; convert the key to str"
                )
            out[key] = _capture(item, (*path, key), active)
        return out
    if type(value) in (list, tuple):
        items = [_capture(item, (*path, i), active) for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if type(value) in (set, frozenset):
        members = [_capture(item, (*path, _SetItem()), active) for item in value]
        return set(members) if isinstance(value, set) else frozenset(members)
    if isinstance(value, Stateful) and not isinstance(value, type):
        return _capture(value.state_dict(), path, active)
    raise _refuse(path, value, _unsupported_hint(value))


def _unsupported_hint(value: Any) -> str:
    """What to do instead, for a value that cannot be saved."""
    if _is_data_loader(value):
        return (
            "a data loader has no saveable position; iterate it with "
            "run.batches() inside `for epoch in run.epochs(n)` "
            "(its position is saved for you), or track a loader with "
            "state_dict()/load_state_dict() (the Stateful protocol)"
        )
    if isinstance(value, (GeneratorType, Iterator)):
        return (
            "a generator or iterator cannot be saved; pass a DataLoader, a list or an "
            "object with state_dict()/load_state_dict() (the Stateful protocol) to "
            "run.batches(), or track the values it is built from"
        )
    if isinstance(value, random.SystemRandom):
        return "SystemRandom draws from the OS and has no state; use random.Random(seed)"
    return (
        "only None, bool, int, float, str, bytes, list, tuple, dict, set, numpy arrays, "
        "torch tensors, random generators and objects with state_dict()/load_state_dict() "
        "can be saved; convert it or save its state_dict()"
    )


def _is_data_loader(value: Any) -> bool:
    data = sys.modules.get("torch.utils.data")
    loader = getattr(data, "DataLoader", None)
    if loader is not None and isinstance(value, loader):
        return True
    return "DataLoader" in type(value).__name__


def restore(targets: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """Load ``saved`` into ``targets`` and return the restored values by name.

    A Stateful target gets ``load_state_dict(saved[name])``; a random
    generator gets its saved state set in place; a dict, list or tuple that
    holds either is walked, so they are restored in place inside it (a dict
    or list is updated in place too); any other target is replaced by the
    saved value (returned in the dict). RNGState targets and targets holding
    generators are restored last so that restoring other objects cannot
    consume randomness. Raises ``StateMismatch`` listing missing names and
    what did not fit (the errors ``load_state_dict`` raised).
    """
    missing = [name for name in targets if name not in saved]
    if missing:
        raise StateMismatch(
            f"checkpoint has no state for {', '.join(sorted(missing))} "
            f"(it holds {', '.join(sorted(map(str, saved))) or 'nothing'}); "
            "track the same objects as when it was saved"
        )
    order = sorted(targets, key=lambda name: _holds(targets[name], _is_random))
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name in order:
        out[name] = _restore_value(targets[name], saved[name], name, problems)
    if problems:
        raise StateMismatch("state does not fit: " + "; ".join(problems))
    return out


def _restore_value(target: Any, saved: Any, where: str, problems: list[str]) -> Any:
    """The restored value of one target; what does not fit goes to ``problems``."""
    if generator_kind(target) is not None:
        try:
            set_generator_state(target, saved)
        except StateMismatch as exc:
            problems.append(f"{where}: {exc}")
        return target
    if isinstance(target, Stateful) and not isinstance(target, type):
        try:
            target.load_state_dict(saved)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(f"{where}: {first_line}")
        return target
    if isinstance(target, dict) and isinstance(saved, Mapping) and _holds(target, _is_live):
        for key in [k for k in target if k not in saved]:
            problems.append(f"{where}[{key!r}] is missing from the checkpoint")
        for key, value in saved.items():
            inner = target.get(key)
            target[key] = _restore_value(inner, value, f"{where}[{key!r}]", problems)
        return target
    if type(target) in (list, tuple) and _holds(target, _is_live):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(target):
            problems.append(f"{where}: saved {_length(saved)} items, now {len(target)}")
            return target
        items = [
            _restore_value(item, value, f"{where}[{i}]", problems)
            for i, (item, value) in enumerate(zip(target, saved, strict=True))
        ]
        if isinstance(target, list):
            target[:] = items
            return target
        return tuple(items)
    return saved


def _length(value: Any) -> str:
    return str(len(value)) if isinstance(value, (list, tuple)) else type(value).__name__


def _is_live(value: Any) -> bool:
    """A Stateful object or a random generator: restored in place, never replaced."""
    if generator_kind(value) is not None:
        return True
    return isinstance(value, Stateful) and not isinstance(value, type)


def _is_random(value: Any) -> bool:
    return isinstance(value, RNGState) or generator_kind(value) is not None


def _holds(value: Any, test: Callable[[Any], bool]) -> bool:
    """True when ``value`` passes ``test`` or a dict, list or tuple in it holds one that does."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if test(item):
            return True
        if isinstance(item, (dict, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


# -- random generators a script owns ------------------------------------------


def generator_kind(value: Any) -> str | None:
    """The kind of random generator ``value`` is, or None when it is not one.

    Kinds: ``"random.Random"``, ``"torch.Generator"``, ``"numpy.Generator"``,
    ``"numpy.BitGenerator"``, ``"numpy.RandomState"``. torch and numpy are
    looked up in ``sys.modules``, never imported.
    """
    if isinstance(value, random.Random):
        return None if isinstance(value, random.SystemRandom) else "random.Random"
    torch = _torch_module()
    if torch is not None and isinstance(value, torch.Generator):
        return "torch.Generator"
    np = _numpy_module()
    if np is not None:
        if isinstance(value, np.random.Generator):
            return "numpy.Generator"
        if isinstance(value, np.random.BitGenerator):
            return "numpy.BitGenerator"
        if isinstance(value, np.random.RandomState):
            return "numpy.RandomState"
    return None


def generator_state(generator: Any) -> dict[str, Any]:
    """A generator's state as plain data: ``{"generator": KIND, "state": ...}``.

    The state is what the generator's own API hands out (a fresh copy):
    ``Random.getstate()``, ``Generator.get_state()`` (a uint8 tensor), a
    numpy bit generator's ``state`` dict, ``RandomState.get_state(legacy=False)``.
    """
    kind = generator_kind(generator)
    if kind == "random.Random":
        state: Any = generator.getstate()
    elif kind == "torch.Generator":
        return {"generator": kind, "device": str(generator.device), "state": generator.get_state()}
    elif kind == "numpy.Generator":
        state = generator.bit_generator.state
    elif kind == "numpy.BitGenerator":
        state = generator.state
    elif kind == "numpy.RandomState":
        state = generator.get_state(legacy=False)
    else:
        raise TypeError(f"{type(generator).__qualname__} is not a random generator")
    return {"generator": kind, "state": state}


def set_generator_state(generator: Any, saved: Any) -> None:
    """Put a state from ``generator_state`` back into ``generator``, in place.

    Raises ``StateMismatch`` when the saved state is of another kind (or
    another numpy bit generator) than ``generator``.
    """
    kind = generator_kind(generator)
    saved_kind = saved.get("generator") if isinstance(saved, Mapping) else None
    if saved_kind != kind or "state" not in saved:
        found = saved_kind or type(saved).__name__
        raise StateMismatch(
            f"saved state is {found}, not a {kind} state; track the same kind of generator"
        )
    state = saved["state"]
    try:
        if kind == "random.Random":
            version, internal, gauss = state
            generator.setstate((version, tuple(internal), gauss))
        elif kind == "torch.Generator":
            generator.set_state(state)
        elif kind == "numpy.Generator":
            generator.bit_generator.state = _plain_dict(state)
        elif kind == "numpy.BitGenerator":
            generator.state = _plain_dict(state)
        else:
            generator.set_state(_plain_dict(state))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise StateMismatch(
            f"saved {kind} state does not fit: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            "; build the generator as the run that saved it did"
        ) from exc


def _plain_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """numpy wants real dicts (a loaded tree may hold other mappings)."""
    return {k: _plain_dict(v) if isinstance(v, Mapping) else v for k, v in state.items()}


class RNGState:
    """The random number generators as one Stateful object.

    Covers Python's ``random``, NumPy's global RNG (when numpy is imported)
    and torch's CPU and CUDA generators (when torch is imported).
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the states of every RNG that is loaded."""
        state: dict[str, Any] = {"python": random.getstate()}
        np = _numpy_module()
        if np is not None:
            state["numpy"] = np.random.get_state()
        torch = _torch_module()
        if torch is not None:
            state["torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the RNG states present in ``state`` (others are left alone)."""
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        np = _numpy_module()
        if np is not None and "numpy" in state:
            np.random.set_state(tuple(state["numpy"]))
        torch = _torch_module()
        if torch is not None and "torch" in state:
            torch.set_rng_state(state["torch"])
            cuda = state.get("cuda")
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(cuda)[: torch.cuda.device_count()])
