"""Faults made real for tests: a tiny tmpfs that fills up, a damaged checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


class SmallDisk:
    """A tiny tmpfs that can be filled up and freed again."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self._filler = mount / "filler"

    def fill(self) -> None:
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


def mounted_small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 1 MiB tmpfs under ``tmp_path`` (skips the test where none can be mounted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs needs Linux")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
            capture_output=True,
            check=False,
        )
    except OSError as exc:
        pytest.skip(f"cannot run mount here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield SmallDisk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def damage(checkpoint: Path) -> dict[str, bytes]:
    """Flip a byte of the tensor file; return every file's bytes, as damaged."""
    tensors = next(p for p in checkpoint.iterdir() if p.suffix == ".safetensors")
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    return {p.name: p.read_bytes() for p in checkpoint.iterdir()}
