"""Findings of the security review, each against a real API process (uvicorn, real HTTP): quotas that hold under
parallel requests on SQLite and PostgreSQL, a multipart body that cannot grow the API's memory, and an upload
refused by the inspection quota before its body is read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import Dataset, Job, Model
from tests.api.conftest import make_ready_model

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def api_process(data_dir: Path, **env: str) -> Iterator[tuple[str, int]]:
    """The API under uvicorn in its own process, on the test's database and data directory: (base URL, pid)."""
    port = _free_port()
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "QAAS_DATA_DIR": str(data_dir),
        "QAAS_DATABASE_URL": get_settings().resolved_database_url,
        "QAAS_BROKER_URL": "",
        "QAAS_AUTH": "disabled",
    } | env
    log = open(data_dir.parent / f"api-{port}.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)],
        env=environ,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (data_dir.parent / f"api-{port}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _parallel_posts(count: int, send: Callable[[httpx.Client], httpx.Response]) -> list[httpx.Response]:
    """`count` calls of `send(client)` released at the same moment from as many threads."""
    barrier = threading.Barrier(count)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    with httpx.Client(timeout=120, limits=limits) as http:

        def one(_: int) -> httpx.Response:
            barrier.wait()
            return send(http)

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))


def test_40_parallel_submissions_never_pass_a_quota_of_20(client: TestClient, service_env: Path) -> None:
    """Before the check and the insert were one critical section, 30 submissions got 21 jobs on SQLite."""
    model_id = make_ready_model(client)
    body = {"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"}
    with api_process(service_env, QAAS_QUOTA_ACTIVE_JOBS="20") as (url, _pid):
        answers = _parallel_posts(40, lambda http: http.post(f"{url}/v1/jobs", json=body))
    statuses = sorted(r.status_code for r in answers)
    assert 500 not in statuses, [r.text for r in answers if r.status_code >= 500]
    assert statuses.count(202) == 20, statuses
    assert statuses.count(429) == 20, statuses
    for refused in (r for r in answers if r.status_code == 429):
        assert refused.json()["error"] == "job_quota_exceeded" and refused.headers["retry-after"]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 20


def test_parallel_uploads_never_pass_the_storage_and_inspection_quotas(
    client: TestClient, service_env: Path
) -> None:
    """Twelve uploads at once of 10 kB each: a storage quota of 55 kB takes five, then (all five still
    inspecting) an inspection quota of 3 takes three."""
    content = b"u" * 10_000

    def send(http: httpx.Client, url: str) -> httpx.Response:
        return http.post(f"{url}/v1/datasets", files={"file": ("d.npz", content)})

    env = {"QAAS_QUOTA_STORAGE_BYTES": "55000", "QAAS_QUOTA_INSPECTING": "0"}
    with api_process(service_env, **env) as (url, _pid):
        answers = _parallel_posts(12, lambda http: send(http, url))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * 5 + [429] * 7, [r.text for r in answers]
    assert {r.json()["error"] for r in answers if r.status_code == 429} == {"storage_quota_exceeded"}

    with session_scope() as session:
        session.execute(delete(Dataset))
    kept = set((service_env / "uploads").iterdir())
    env = {"QAAS_QUOTA_STORAGE_BYTES": "0", "QAAS_QUOTA_INSPECTING": "3"}
    with api_process(service_env, **env) as (url, _pid):
        answers = _parallel_posts(12, lambda http: send(http, url))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * 3 + [429] * 9, [r.text for r in answers]
    assert {r.json()["error"] for r in answers if r.status_code == 429} == {"inspection_quota_exceeded"}
    stored = set((service_env / "uploads").iterdir()) - kept
    assert len(stored) == 3, stored  # the refused ones left no file behind
    assert list((service_env / "tmp").glob("*")) == []


def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _raw_post(url: str, path: str, head: bytes, body: Iterator[bytes], declared: int) -> str:
    """POST with a raw socket: the answer is read while the body is still being sent (the server answers and
    stops reading early), so that a reset after the answer cannot hide it."""
    host, port = url.removeprefix("http://").split(":")
    answer = bytearray()
    with socket.create_connection((host, int(port)), timeout=30) as sock:

        def read() -> None:
            while b"}" not in answer:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                answer.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: qaas\r\nContent-Length: {declared}\r\n".encode() + head + b"\r\n"
        )
        try:
            for chunk in body:
                if b"}" in answer:
                    break
                sock.sendall(chunk)
        except OSError:
            pass  # the server closed while we were sending: it answered already
        reader.join(timeout=30)
    return answer.decode("latin-1")


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)  # refused before the database is asked
def test_3000_form_fields_are_refused_before_the_api_grows(client: TestClient, service_env: Path) -> None:
    """3,000 `name` fields of 60 kB once took the API from 167 to 334 MB and were accepted."""
    boundary = "hardening"
    file_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.pt2"\r\n\r\n'.encode()
        + b"model bytes\r\n"
    )
    field = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'.encode()
        + b"n" * 60_000
        + b"\r\n"
    )
    end = f"--{boundary}--\r\n".encode()
    declared = len(file_part) + 3000 * len(field) + len(end)
    head = f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()

    def body() -> Iterator[bytes]:
        yield file_part
        for _ in range(3000):
            yield field
        yield end

    # Declared up front (180 MB, under QAAS_MAX_UPLOAD_BYTES): only the form's own bounds can refuse it.
    with api_process(service_env) as (url, pid):
        warm = httpx.post(f"{url}/v1/models", files={"file": ("m.pt2", b"warm-up")}, data={"name": "w"})
        assert warm.status_code == 201, warm.text
        before = _memory_kb(pid)
        answer = _raw_post(url, "/v1/models", head, body(), declared)
        after = _memory_kb(pid)
        listed = httpx.get(f"{url}/v1/models").json()["items"]
    status_line = answer.split("\r\n", 1)[0]
    assert status_line.split()[1] in ("413", "422"), answer[:500]
    assert '"error":"duplicate_field"' in answer, answer[:500]
    grown_mb = {key: (after[key] - before[key]) / 1024 for key in after}
    assert all(grown < 8 for grown in grown_mb.values()), grown_mb
    assert [item["id"] for item in listed] == [warm.json()["id"]]  # nothing stored for the refused one
    assert list((service_env / "tmp").glob("*")) == []


def test_the_inspection_quota_refuses_an_upload_before_its_body_is_read(
    client: TestClient, service_env: Path
) -> None:
    """Two uploads still inspecting (no worker runs here) fill a quota of 2: the third answers 429 at once,
    though it declares 1 GB and sends 1 MB."""
    with api_process(service_env, QAAS_QUOTA_INSPECTING="2") as (url, _pid):
        for path in ("/v1/models", "/v1/datasets"):
            assert httpx.post(f"{url}{path}", files={"file": ("f", b"bytes")}).status_code == 201
        head = b"Content-Type: multipart/form-data; boundary=b\r\n"
        first = b'--b\r\nContent-Disposition: form-data; name="file"; filename="m.pt2"\r\n\r\n'
        started = time.monotonic()
        answer = _raw_post(url, "/v1/models", head, iter([first] + [b"\0" * 65536] * 16), 1024**3)
        elapsed = time.monotonic() - started
        refused = httpx.post(f"{url}/v1/datasets", files={"file": ("d.npz", b"bytes")})
    assert answer.startswith("HTTP/1.1 429"), answer[:300]
    assert "inspection_quota_exceeded" in answer and "retry-after" in answer.lower()
    assert elapsed < 5
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "inspection_quota_exceeded"
    assert "2 uploads" in body["detail"] and "QAAS_QUOTA_INSPECTING" in body["detail"]
    assert int(refused.headers["retry-after"]) > 0
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Model)) == 1
    assert list((service_env / "tmp").glob("*")) == []
