"""S3 storage (QAAS_STORAGE_URL=s3://...) against moto's S3 server over real HTTP: the storage itself, the API's
uploads and downloads, and one job run by a real worker."""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.storage import S3Storage, StoredFileMissing
from tests.api.conftest import upload
from tests.e2e.conftest import Stack, float_model, pt2_file, stack  # noqa: F401 (fixtures)

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port of this host, for the tests of this module."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, and the settings (boto3's own AWS_* chain for credentials) that select it."""
    name = f"qaas-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("QAAS_STORAGE_URL", f"s3://{name}/qaas")
    monkeypatch.setenv("QAAS_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("QAAS_S3_REGION", "us-east-1")
    _s3(s3_endpoint).create_bucket(Bucket=name)
    return name


def _s3(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _objects(endpoint: str, bucket: str) -> list[str]:
    listed = _s3(endpoint).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture
def storage(bucket: str, s3_endpoint: str, tmp_path: Path) -> S3Storage:
    """Through the explicit QAAS_S3_* credentials this time, with pages of 2 keys."""
    from app.core.config import Settings

    settings = Settings(
        data_dir=tmp_path / "var",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    built = S3Storage.from_settings(settings)
    built.page_size = 2
    return built


# --- the storage ------------------------------------------------------------------------------------------------


def test_commit_uploads_with_sha256_and_removes_the_temp_file(
    storage: S3Storage, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    tmp = storage.temp_path()
    data = b"model bytes " * 1000
    tmp.write_bytes(data)
    storage.commit(tmp, "uploads/model_x.bin", sha256=hashlib.sha256(data).hexdigest())
    assert not tmp.exists()
    head = _s3(s3_endpoint).head_object(Bucket=bucket, Key="qaas/uploads/model_x.bin")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}

    copy = storage.local_copy("uploads/model_x.bin", tmp_path / "work" / "inputs")
    assert copy.parent == tmp_path / "work" / "inputs" and copy.read_bytes() == data


def test_store_file_range_reads_and_missing_objects(storage: S3Storage, tmp_path: Path) -> None:
    source = tmp_path / "model.int8.ts"
    source.write_bytes(bytes(range(256)) * 10)
    assert storage.store_file(source, "artifacts/job_a/attempt-1/model.int8.ts") == (
        2560,
        hashlib.sha256(source.read_bytes()).hexdigest(),
    )
    assert source.exists()  # a copy: the runner's output stays where it was

    whole = storage.open("artifacts/job_a/attempt-1/model.int8.ts")
    assert (whole.length, whole.content_range, b"".join(whole.chunks())) == (2560, None, source.read_bytes())
    part = storage.open("artifacts/job_a/attempt-1/model.int8.ts", "bytes=10-19")
    assert (part.content_range, b"".join(part.chunks())) == ("bytes 10-19/2560", bytes(range(10, 20)))
    tail = storage.open("artifacts/job_a/attempt-1/model.int8.ts", "bytes=-6")
    assert (tail.content_range, b"".join(tail.chunks())) == ("bytes 2554-2559/2560", bytes(range(250, 256)))

    with pytest.raises(StoredFileMissing):
        storage.open("artifacts/job_a/attempt-1/nothing")
    with pytest.raises(StoredFileMissing):
        storage.local_copy("uploads/nothing.bin", tmp_path / "inputs")
    with pytest.raises(ValueError, match="escapes"):
        storage.open("../outside")


def test_keys_under_and_delete_under_page_through_folders(
    storage: S3Storage, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    keys = [f"artifacts/job_a/attempt-1/{n}" for n in ("a", "b", "c", "d", "e")]
    for key in [*keys, "artifacts/job_a/attempt-10/a", "artifacts/job_b/attempt-1/a", "uploads/u.bin"]:
        storage.store_file(source, key)

    assert storage.keys_under("artifacts/job_a/attempt-1/") == keys  # 3 pages of 2
    assert storage.keys_under("artifacts/job_a/attempt-1") == keys  # a folder: not attempt-10
    storage.delete_under("artifacts/job_a/attempt-1")
    assert storage.keys_under("artifacts/job_a/") == ["artifacts/job_a/attempt-10/a"]
    storage.delete("uploads/u.bin")
    storage.delete("uploads/u.bin")  # deleting twice is fine
    assert _objects(s3_endpoint, bucket) == [
        "qaas/artifacts/job_a/attempt-10/a",
        "qaas/artifacts/job_b/attempt-1/a",
    ]


# --- the API ----------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_client(bucket: str, service_env: Path) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def test_api_upload_download_range_and_delete(
    s3_client: TestClient, s3_endpoint: str, bucket: str, service_env: Path
) -> None:
    data = bytes(range(256)) * 40
    response = upload(s3_client, "/v1/models", data, name="résumé.pt2")
    assert response.status_code == 201, response.text
    model = response.json()
    [key] = _objects(s3_endpoint, bucket)
    assert key == f"qaas/uploads/{model['id']}.bin"
    head = _s3(s3_endpoint).head_object(Bucket=bucket, Key=key)
    assert head["Metadata"]["sha256"] == model["sha256"] == hashlib.sha256(data).hexdigest()
    # Nothing kept on the API's disk: the temporary file went to S3.
    assert [p for p in service_env.rglob("*") if p.is_file() and "sqlite" not in p.name] == []

    url = f"/v1/models/{model['id']}/file"
    whole = s3_client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{model["sha256"]}"'
    assert whole.headers["content-length"] == str(len(data))
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-disposition"] == "attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pt2"

    part = s3_client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert part.headers["etag"] == whole.headers["etag"]
    multi = s3_client.get(url, headers={"Range": "bytes=0-1, 5-6"})
    assert multi.status_code == 200 and multi.content == data  # S3 serves one range: the whole file
    refused = s3_client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{len(data)}"

    _s3(s3_endpoint).delete_object(Bucket=bucket, Key=key)  # removed outside qaas
    gone = s3_client.get(url)
    assert (gone.status_code, gone.json()["error"]) == (410, "file_missing")

    response = upload(s3_client, "/v1/models", b"second")
    assert response.status_code == 201
    assert s3_client.delete(f"/v1/models/{response.json()['id']}").status_code == 204
    assert _objects(s3_endpoint, bucket) == []


# --- a real worker ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_job_on_s3_storage(
    bucket: str,
    stack: Stack,  # noqa: F811 (the fixture imported above; after `bucket`, so its worker sees S3)
    pt2_file: Path,  # noqa: F811
    s3_endpoint: str,
) -> None:
    with open(pt2_file, "rb") as handle:
        response = stack.client.post("/v1/models", files={"file": (pt2_file.name, handle)})
    assert response.status_code == 201, response.text
    model = stack.wait(f"/v1/models/{response.json()['id']}", {"ready", "invalid"})
    assert model["status"] == "ready", model

    response = stack.client.post(
        "/v1/jobs",
        json={"model_id": model["id"], "mode": "dynamic", "benchmark": {"batch_sizes": [1], "iterations": 3}},
    )
    assert response.status_code == 202, response.text
    job = stack.wait(f"/v1/jobs/{response.json()['id']}", {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    assert "clean_env" in job["runner"]["sandbox"]

    artifact = next(a for a in job["artifacts"] if a["name"] == "model.int8.ts")
    download = stack.client.get(artifact["url"])
    assert download.status_code == 200
    assert (
        hashlib.sha256(download.content).hexdigest()
        == artifact["sha256"]
        == download.headers["etag"].strip('"')
    )
    assert download.headers["repr-digest"].startswith("sha-256=:")
    prefix = f"qaas/artifacts/{job['id']}/attempt-1/"
    assert {prefix + a["name"] for a in job["artifacts"]} <= set(_objects(s3_endpoint, bucket))

    # On local disk: the databases only, once the worker has removed the job's work folder.
    deadline = time.monotonic() + 15
    while True:
        left = [p for p in stack.data_dir.rglob("*") if p.is_file() and "sqlite" not in p.name]
        left = [p for p in left if p.name != "bench.lock"]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert left == [], left
