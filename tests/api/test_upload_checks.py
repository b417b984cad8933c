"""Hostile archives through the upload routes: refused right after streaming with a clear code, nothing kept.
The rules and their memory bounds are tested in tests/test_archives.py; this checks the API applies them."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.test_archives import many_entries


def zipped(entries: dict[str, bytes], *, link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.create_system = 3
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("m/data/0", "w") as f:
        for _ in range(64):
            f.write(bytes(1024**2))
    return buffer.getvalue()


# The checks run before the database is touched: one backend is enough.
pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)

CASES = {
    "zip_bomb": lambda: bomb(),
    "zip_too_many_entries": lambda: many_entries(100_000),
    "zip_unsafe_path": lambda: zipped({"model/../../etc/cron.d/x": b"*"}),
    "zip_unsafe_path ": lambda: zipped({"/etc/passwd": b"x"}),
    "zip_link_entry": lambda: zipped({"model/config.json": b"{}"}, link="model/model.safetensors"),
    "safetensors_header_too_large": lambda: struct.pack("<Q", 2**40) + b"{}",
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets"])
def test_hostile_uploads_are_refused_and_leave_nothing(
    client: TestClient, service_env: Path, route: str, case: str
) -> None:
    content = CASES[case]()
    assert len(content) < 10 * 1024**2
    response = client.post(route, files={"file": ("upload.safetensors", content)})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == case.strip()
    assert client.get(route).json()["items"] == []
    assert [p for p in service_env.rglob("*") if p.is_file() and "sqlite" not in p.name] == []


def test_an_npz_and_a_plain_file_are_accepted(client: TestClient) -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((4, 16), dtype=np.float32))
    assert client.post("/v1/datasets", files={"file": ("d.npz", buffer.getvalue())}).status_code == 201
    assert client.post("/v1/datasets", files={"file": ("d.jsonl", b'{"text": "hi"}\n')}).status_code == 201
