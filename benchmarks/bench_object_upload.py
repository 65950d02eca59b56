"""Raw upload throughput and CPU cost of S3 clients against the same local S3 server.

Uploads the same random bytes to SeaweedFS on 127.0.0.1 (started here, or
the server that ``AWS_ENDPOINT_URL`` names) with boto3's ``upload_file``,
s3fs's ``put_file``, obstore's ``put`` (its defaults, then with
``UNSIGNED-PAYLOAD``) and killsafe's object-store backend (a multipart sink
fed from memory, as the saver feeds it). Rows run in a new random order
every round. Prints a table of ratios measured in this one run; it is not a
test and asserts nothing. CPU is the process's CPU time (all threads) per
GB uploaded: what an upload takes from a training loop running beside it.
"Server CPU" is the SeaweedFS process's CPU time per GB during the same
uploads (when this script started the server): on a machine whose cores
the server shares, it bounds every client's throughput. "Both" adds the
two: with the cores saturated, throughput is about the cores over it.
A last pass uploads once more per client beside a pure-Python thread and
reports how fast that thread ran during the upload, relative to just before
(the GIL and the cores the upload leaves to a loop).

    python benchmarks/bench_object_upload.py                 # 256 MiB, 3 rounds
    python benchmarks/bench_object_upload.py --size-mib 512 --repeat 5

Needs ``pip install 'killsafe[test]' boto3 s3fs``; rows whose client is
missing are skipped.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from killsafe import storage
from killsafe.storage.testserver import LocalS3Server

MiB = 1 << 20
GB = 1e9
BUCKET = "killsafe-bench"
Upload = Callable[[str], None]


def boto3_upload(path: Path, env: dict[str, str]) -> Upload | None:
    try:
        import boto3
    except ImportError:
        return None
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    return lambda key: client.upload_file(str(path), BUCKET, key)


def s3fs_upload(path: Path, env: dict[str, str]) -> Upload | None:
    try:
        import s3fs
    except ImportError:
        return None
    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
    )
    return lambda key: fs.put_file(str(path), f"{BUCKET}/{key}")


def obstore_upload(data: bytes, env: dict[str, str], *, unsigned: bool) -> Upload | None:
    try:
        import obstore
        from obstore.store import S3Store
    except ImportError:
        return None
    store = S3Store(
        BUCKET,
        endpoint=env["AWS_ENDPOINT_URL"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_REGION"],
        client_options={"allow_http": True},
        unsigned_payload=unsigned,
    )
    return lambda key: obstore.put(store, key, data)


def killsafe_upload(data: bytes) -> Upload:
    backend = storage.open(f"s3://{BUCKET}")
    view = memoryview(data)

    def upload(key: str) -> None:
        with backend.open_write(key) as sink:
            for start in range(0, len(view), 8 * MiB):
                sink.write(view[start : start + 8 * MiB])

    return upload


class LoopProbe:
    """Pure-Python work on another thread, standing in for a training loop's Python side.

    ``rate(seconds)`` counts how much it gets done per second; comparing the
    rate during an upload with the rate just before shows how much the
    upload (its CPU and its hold on the GIL) slows the loop.
    """

    def __init__(self) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            for _ in range(1000):
                pass
            self.count += 1

    def rate_during(self, work: Callable[[], object]) -> float:
        start, began = self.count, time.perf_counter()
        work()
        return (self.count - start) / (time.perf_counter() - began)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def loop_progress(uploads: dict[str, Upload], backend: storage.Backend) -> dict[str, float]:
    """Per client: the probe's rate during an upload over its rate in the second before."""
    probe = LoopProbe()
    progress: dict[str, float] = {}
    try:
        for name in random.sample(list(uploads), len(uploads)):
            idle = probe.rate_during(lambda: time.sleep(1.0))
            key = f"probe/{name.split()[0]}"
            progress[name] = probe.rate_during(partial(uploads[name], key)) / idle
            backend.delete(key)
    finally:
        probe.stop()
    return progress


def process_cpu(pid: int | None) -> float:
    """CPU seconds (all threads) of process ``pid`` so far; 0 when unknown (not Linux)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(upload: Upload, key: str, server: int | None) -> tuple[float, float, float]:
    """Wall seconds, this process's CPU seconds and the server's CPU seconds of one upload."""
    wall, cpu, served = time.perf_counter(), time.process_time(), process_cpu(server)
    upload(key)
    elapsed, used = time.perf_counter() - wall, time.process_time() - cpu
    return elapsed, used, process_cpu(server) - served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MiB

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ks-bench-s3-")))
        server_pid: int | None = None
        if "AWS_ENDPOINT_URL" in os.environ:
            env = {name: os.environ[name] for name in LocalS3Server(work).environment()}
        else:
            server = stack.enter_context(LocalS3Server(work / "server"))
            env = server.environment()
            os.environ.update(env)
            server_pid = server.process.pid if server.process is not None else None
        data = os.urandom(size)
        path = work / "payload.bin"
        path.write_bytes(data)
        killsafe_backend = storage.open(f"s3://{BUCKET}")
        storage.write_bytes(killsafe_backend, "warm-up", b"creates the bucket")

        rows: dict[str, Any] = {
            "boto3 upload_file": boto3_upload(path, env),
            "s3fs put_file": s3fs_upload(path, env),
            "obstore put (defaults)": obstore_upload(data, env, unsigned=False),
            "obstore put, unsigned payload": obstore_upload(data, env, unsigned=True),
            "killsafe object backend": killsafe_upload(data),
        }
        uploads: dict[str, Upload] = {name: up for name, up in rows.items() if up is not None}
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in uploads}
        for round_number in range(args.repeat):
            order = list(uploads)
            random.shuffle(order)
            for name in order:
                key = f"round-{round_number}/{name.split()[0]}"
                results[name].append(measure(uploads[name], key, server_pid))
                killsafe_backend.delete(key)
                time.sleep(0.5)
        progress = loop_progress(uploads, killsafe_backend)
        print_table(results, progress, size, args.repeat, sorted(set(rows) - set(uploads)))


def print_table(
    results: dict[str, list[tuple[float, float, float]]],
    progress: dict[str, float],
    size: int,
    repeat: int,
    skipped: list[str],
) -> None:
    gb = size / GB
    best = {name: gb / min(run[0] for run in runs) for name, runs in results.items()}
    median = {name: gb / statistics.median(r[0] for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r[1] for r in runs) / gb for name, runs in results.items()}
    served = {name: statistics.median(r[2] for r in runs) / gb for name, runs in results.items()}
    both = {name: statistics.median(r[1] + r[2] for r in rs) / gb for name, rs in results.items()}
    baselines = [n for n in results if not n.startswith(("killsafe", "obstore put, unsigned"))]
    fastest = max(baselines, key=lambda n: best[n]) if baselines else None
    steadiest = max(baselines, key=lambda n: median[n]) if baselines else None
    boto = "boto3 upload_file" if "boto3 upload_file" in results else None
    print(f"\nupload of {size // MiB} MiB to SeaweedFS on 127.0.0.1, {repeat} rounds")
    header = f"{'client':32s} {'best GB/s':>9s} {'median':>7s} {'CPU s/GB':>9s} {'server':>7s}"
    header += f" {'both':>6s}"
    print(header + "  best vs fastest baseline   median vs best median   CPU vs boto3   loop speed")
    for name in results:
        vs_fastest = f"{best[name] / best[fastest]:.2f}x" if fastest else "-"
        vs_median = f"{median[name] / median[steadiest]:.2f}x" if steadiest else "-"
        vs_boto = f"{cpu[name] / cpu[boto]:.2f}x" if boto else "-"
        print(
            f"{name:32s} {best[name]:9.3f} {median[name]:7.3f} {cpu[name]:9.2f} {served[name]:7.2f}"
            f" {both[name]:6.2f}  {vs_fastest:>24s}   {vs_median:>21s}   {vs_boto:>11s}"
            f"   {progress[name]:9.2f}x"
        )
    if fastest and steadiest:
        print(f"fastest baseline: {fastest} (best), {steadiest} (median)")
    print("server: the S3 server's CPU s/GB during the same uploads (0: not started here)")
    print("both: the client's and the server's CPU s/GB of each upload added, median")
    print("loop speed: a pure-Python thread's rate during one upload over its rate just before")
    for name in skipped:
        print(f"skipped (client not installed): {name}")


if __name__ == "__main__":
    main()
