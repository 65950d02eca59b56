"""Exact comparison of state trees, shared by the store and format tests."""

from __future__ import annotations

import ctypes
import math
import struct
from typing import Any

import numpy as np
import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of every element of ``t`` in logical order (works for every dtype)."""
    if t.numel() == 0:
        return b""
    size = t.element_size()
    out = bytearray()
    storage_base = t.untyped_storage().data_ptr()
    for index in np.ndindex(*t.shape):
        offset = t.storage_offset() + sum(i * s for i, s in zip(index, t.stride(), strict=False))
        out += ctypes.string_at(storage_base + offset * size, size)
    return bytes(out)


def assert_same(saved: Any, loaded: Any, path: str = "state") -> None:
    """Fail unless ``loaded`` is exactly ``saved``: types, bits, dtypes, layouts."""
    assert type(loaded) is type(saved), f"{path}: {type(loaded)} is not {type(saved)}"
    if isinstance(saved, float):
        assert struct.pack("<d", saved) == struct.pack("<d", loaded) or (
            math.isnan(saved) and math.isnan(loaded)
        ), f"{path}: {loaded!r} != {saved!r}"
    elif isinstance(saved, torch.Tensor):
        assert loaded.dtype == saved.dtype, path
        assert loaded.shape == saved.shape, path
        assert loaded.stride() == saved.stride(), path
        assert tensor_bytes(loaded) == tensor_bytes(saved), path
    elif isinstance(saved, np.ndarray):
        assert loaded.dtype == saved.dtype and loaded.shape == saved.shape, path
        assert loaded.tobytes() == saved.tobytes(), path
    elif isinstance(saved, np.generic):
        assert loaded.dtype == saved.dtype and loaded.tobytes() == saved.tobytes(), path
    elif isinstance(saved, dict):
        assert list(loaded) == list(saved), path
        for key in saved:
            assert type(next(k for k in loaded if k == key)) is type(key), f"{path} key {key!r}"
            assert_same(saved[key], loaded[key], f"{path}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), path
        for i, (a, b) in enumerate(zip(saved, loaded, strict=False)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert loaded == saved, f"{path}: {loaded!r} != {saved!r}"
