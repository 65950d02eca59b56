"""``gs://`` and ``az://`` open through the same backend as ``s3://``.

No Google or Azure service is reachable here: the tests check what can be
checked offline. A ``gs://`` URL names its bucket and prefix; an ``az://``
store pointed at the Azure emulator's address with nothing listening fails
with one line that names the URL and Azure's settings, not S3's.
"""

from __future__ import annotations

import pytest

pytest.importorskip("obstore", reason="pip install 'killsafe[s3]'")

from killsafe import CheckpointStore, storage
from killsafe.errors import ConfigError, KillsafeError


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_a_bucket_url_names_its_bucket_and_prefix(
    scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1")
    backend = storage.open(f"{scheme}://bucket/runs/exp1")
    assert backend.url == f"{scheme}://bucket/runs/exp1/"
    assert backend.url_of("step-000001/manifest.json") == (
        f"{scheme}://bucket/runs/exp1/step-000001/manifest.json"
    )


def test_an_unreachable_azure_store_fails_in_one_line_naming_azure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")  # 127.0.0.1:10000, nobody there
    backend = storage.open("az://container/exp1", max_retries=0, retry_timeout=5)
    with pytest.raises(KillsafeError) as caught:
        CheckpointStore(backend).save({"weights": [1.0, 2.0]}, step=1)
    message = str(caught.value)
    assert "\n" not in message and "az://container/exp1/" in message
    assert "AZURE_STORAGE" in message and "AWS_ENDPOINT_URL" not in message


def test_a_plain_http_endpoint_on_another_machine_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(ConfigError) as caught:
        storage.open("s3://bucket/exp1")
    message = str(caught.value)
    assert "http://minio.example:9000" in message and "https" in message and "\n" not in message


def test_plain_http_to_another_machine_is_allowed_when_aws_allow_http_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    backend = storage.open("s3://bucket/exp1", max_retries=0, retry_timeout=5)
    assert backend.url == "s3://bucket/exp1/"  # opened; no request is made yet
