"""A batch of downloads that a resume never fetches twice.

Items ``item-00000`` ... are fetched from ``--base-url`` (any HTTP server that
serves ``BASE/item-00000``; the test starts one on 127.0.0.1). One step is one
item. Each file is written to a temporary name, fsynced, renamed into place,
and only then recorded as done, so a file cut short by a stop, a kill or a
dropped connection is never counted: its temporary file is swept and the item
fetched again. Items already on disk under their final name are complete by
construction and skipped without a request, even when the stop came after the
last checkpoint::

    python examples/downloads.py --dir runs/dl --base-url http://127.0.0.1:8000

The last line printed is ``result: ...`` (items, bytes and a digest of all
files): the same for an uninterrupted run and for one stopped and resumed.
``--small`` or ``KILLSAFE_EXAMPLE_SMALL=1`` fetches fewer items.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

import killsafe


def fetch(url: str, target: Path, timeout: float = 30) -> int:
    """Download ``url`` to ``target`` atomically; returns its size. Raises ``OSError``."""
    tmp = target.with_name(f".part-{target.name}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            expected = response.headers.get("Content-Length")
            size = 0
            while chunk := response.read(1 << 16):
                out.write(chunk)
                size += len(chunk)
            if expected is not None and size != int(expected):
                raise OSError(f"{url}: got {size} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())
    except http.client.HTTPException as exc:  # a connection cut mid-body
        raise OSError(f"{url}: {exc!r}") from exc
    os.replace(tmp, target)  # the rename is the commit: a final name means a whole file
    return size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    killsafe.add_arguments(parser, directory="runs/downloads")
    parser.add_argument("--base-url", required=True, help="where item-NNNNN are served")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="fewer items, for tests")
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("KILLSAFE_EXAMPLE_SMALL") == "1"
    n_items = args.items or (40 if small else 2000)
    done: dict[str, int] = {}  # item -> size, recorded after the rename

    with killsafe.Run.from_args(args, total_steps=n_items, save_every_steps=5) as run:
        run.track(done=done)
        files = Path(run.directory) / "files"
        files.mkdir(exist_ok=True)
        for stale in files.glob(".part-*"):
            stale.unlink()  # cut short by the last stop: never counted, fetched again
        for index in run.steps():
            name = f"item-{index:05d}"
            target = files / name
            if name not in done:
                if target.exists():  # renamed into place after the last checkpoint
                    done[name] = target.stat().st_size
                else:
                    done[name] = fetch(f"{args.base_url.rstrip('/')}/{name}", target)
                    fsync_dir(files)
            run.log(bytes=done[name])
            run.count("items", len(done), total=n_items)
    if run.exit_reason != "finished":
        return
    digest = hashlib.sha256()
    for name in sorted(done):
        digest.update(name.encode())
        digest.update((files / name).read_bytes())
    print(
        f"result: items={len(done)} bytes={sum(done.values())} sha={digest.hexdigest()[:16]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
