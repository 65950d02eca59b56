"""Pinned staging: CUDA tensors copied into one reused page-locked host arena.

Each device's state is copied, storage by storage (tied weights stay
tied), into one arena of page-locked host memory, at 4 KiB-aligned offsets.
The copies are queued on the current stream without blocking, in the order
the loop's own kernels were queued, so each reads what the step before it
wrote; ``Staged.wait()`` waits for them together; ``format.encode`` reads the
entries from these copies instead of copying again.

The arena is sized exactly: torch's pinned allocator rounds every block up
to a power of two (a 180 MB tensor takes 256 MB of locked memory), so the
arena is plain anonymous memory that CUDA page-locks in place
(``cudaHostRegister``), falling back to a pinned tensor of the same size
where registering fails. It is reused while the state fits in it and is
not under half its size, so the snapshot memory is one copy of the device
state.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import sys
from dataclasses import dataclass, field
from typing import Any

from killsafe.state import tensors_in

__all__ = ["PinnedStaging", "Staged"]

log = logging.getLogger("killsafe.staging")

ALIGN = 4096


@dataclass
class Staged:
    """Host copies of a tree's CUDA storages, filled in the background.

    ``copies`` maps ``(device, storage pointer)`` to a host uint8 tensor of
    the whole storage, what ``format.encode(host_copies=...)`` takes.
    """

    copies: dict[tuple[str, int], Any] = field(default_factory=dict)
    devices: set[Any] = field(default_factory=set)

    def wait(self) -> None:
        """Block until every queued device-to-host copy has landed."""
        if not self.devices:
            return
        torch = sys.modules["torch"]
        for device in self.devices:
            torch.cuda.synchronize(device)
        self.devices = set()


class PinnedStaging:
    """Reused page-locked host memory that CUDA tensors are staged into.

    Not thread-safe; stage again only once the previous staged tree is no
    longer read (the saver writes one save at a time).
    """

    def __init__(self) -> None:
        self._arenas: dict[str, _Arena] = {}

    def owns(self, tensor: Any) -> bool:
        """Whether ``tensor`` lives in one of the arenas (already a private copy)."""
        pointer = tensor.untyped_storage().data_ptr()
        return any(arena.contains(pointer) for arena in self._arenas.values())

    def stage(self, tree: Any) -> Staged:
        """Queue a copy of every CUDA storage of ``tree``; CPU values are left alone."""
        by_device = _device_storages(tree)
        if not by_device:
            return Staged()
        copies: dict[tuple[str, int], Any] = {}
        for device, storages in by_device.items():
            offsets, total = _layout(storage for storage, _ in storages.values())
            copies.update(self._arena_for(device, total).copy_all(storages, offsets))
        torch = sys.modules["torch"]
        return Staged(copies, {torch.device(d) for d in by_device})

    def release(self) -> None:
        """Unlock and free every arena."""
        for arena in self._arenas.values():
            arena.close()
        self._arenas.clear()

    def _arena_for(self, device: str, nbytes: int) -> _Arena:
        arena = self._arenas.get(device)
        if arena is not None and nbytes <= arena.nbytes <= 2 * nbytes:
            return arena
        if arena is not None:
            arena.close()
        arena = _Arena(nbytes)
        self._arenas[device] = arena
        return arena


class _Arena:
    """One block of page-locked host memory, handed out in per-storage pieces."""

    def __init__(self, nbytes: int) -> None:
        torch = sys.modules["torch"]
        self.nbytes = nbytes
        self._memory: Any = mmap.mmap(-1, nbytes)
        self._pieces: dict[tuple[int, int, Any], tuple[Any, Any]] = {}
        self.pointer = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._registered = _register(self.pointer, nbytes)
        if not self._registered:
            self._memory = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.pointer = int(self._memory.data_ptr())

    def contains(self, pointer: int) -> bool:
        return self.pointer <= pointer < self.pointer + self.nbytes

    def copy_all(
        self, storages: dict[tuple[str, int], tuple[Any, Any]], offsets: list[int]
    ) -> dict[Any, Any]:
        """Queue a copy of each storage into the arena; return the host pieces by key.

        ``storages`` maps a key to ``(storage, a tensor on it)``, placed at
        ``offsets`` in the arena. A piece is
        a host uint8 tensor over the copy's bytes with a storage of its own
        (so the encoder sees one storage per device storage), which keeps
        the arena's memory alive. Pieces are kept for the next save, whose
        layout is usually the same.
        """
        torch = sys.modules["torch"]
        pieces: dict[Any, Any] = {}
        used: dict[tuple[int, int, Any], tuple[Any, Any]] = {}
        with torch.no_grad():
            for (key, (storage, tensor)), offset in zip(storages.items(), offsets, strict=True):
                pieces[key] = self._copy_one(storage, tensor, offset, used)
        self._pieces = used
        return pieces

    def _copy_one(self, storage: Any, tensor: Any, offset: int, used: dict[Any, Any]) -> Any:
        torch = sys.modules["torch"]
        size = storage.nbytes()
        # The usual tensor is its whole storage: copy from it directly.
        whole = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.numel() * tensor.element_size() == size
        )
        dtype = tensor.dtype if whole else torch.uint8
        slot = (offset, size, dtype)
        piece, target = used[slot] = self._pieces.get(slot) or self._new_piece(offset, size, dtype)
        if whole:
            target.copy_(tensor.view(-1), non_blocking=True)
        else:
            source = torch.empty(0, dtype=torch.uint8, device=storage.device)
            source.set_(storage, 0, (size,), (1,))
            target.copy_(source, non_blocking=True)
        return piece

    def _new_piece(self, offset: int, size: int, dtype: Any) -> tuple[Any, Any]:
        torch = sys.modules["torch"]
        memory = (ctypes.c_ubyte * size).from_address(self.pointer + offset)
        memory.owner = self  # type: ignore[attr-defined]
        piece = torch.frombuffer(memory, dtype=torch.uint8, count=size)
        return piece, piece.view(dtype)

    def close(self) -> None:
        """Unlock the memory; it is freed once no piece refers to it."""
        if self._registered:
            self._registered = False
            _unregister(self.pointer)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _register(pointer: int, nbytes: int) -> bool:
    torch = sys.modules["torch"]
    try:
        error = torch.cuda.cudart().cudaHostRegister(pointer, nbytes, 0)
    except (AttributeError, RuntimeError) as exc:
        log.debug("cudaHostRegister is not available (%s): using torch's pinned allocator", exc)
        return False
    if int(error) != 0:
        log.debug("cudaHostRegister failed (%s): using torch's pinned allocator", error)
        return False
    return True


def _unregister(pointer: int) -> None:
    sys.modules["torch"].cuda.cudart().cudaHostUnregister(pointer)


def _device_storages(tree: Any) -> dict[str, dict[tuple[str, int], tuple[Any, Any]]]:
    """Per device, the distinct storages of the tree's non-empty CUDA tensors.

    Each with the first tensor found on it.
    """
    by_device: dict[str, dict[tuple[str, int], tuple[Any, Any]]] = {}
    for tensor in tensors_in(tree):
        if tensor.device.type == "cpu" or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        device = str(tensor.device)
        key = (device, storage.data_ptr())
        by_device.setdefault(device, {}).setdefault(key, (storage, tensor))
    return by_device


def _layout(storages: Any) -> tuple[list[int], int]:
    """Aligned offsets of each storage in an arena, and the arena's size."""
    offsets, total = [], 0
    for storage in storages:
        offsets.append(total)
        total += -(-storage.nbytes() // ALIGN) * ALIGN
    return offsets, max(total, ALIGN)
