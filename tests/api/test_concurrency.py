"""Many concurrent requests against one API process: every one is answered, none waits for the pool's timeout.

Before app.api.deps.ReleasingRoute, a sync route kept its pooled connection while it waited for a worker thread
to validate its response, and with more requests in flight than connections every thread ended up waiting for
a connection that only a thread could give back: 500s after the pool's 30 s timeout (found by bench/load.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.conftest import make_ready_model


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
def test_200_concurrent_polls_are_all_answered(client: TestClient, service_env: Path) -> None:
    model_id = make_ready_model(client)
    job = client.post("/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"}).json()
    paths = [f"/v1/jobs/{job['id']}", f"/v1/models/{model_id}", "/v1/jobs", "/v1/capabilities"]

    async def poll_all() -> list[int]:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://qaas") as http:
            responses = await asyncio.gather(*(http.get(paths[i % len(paths)]) for i in range(200)))
        return [r.status_code for r in responses]

    started = time.monotonic()
    statuses = asyncio.run(poll_all())
    assert statuses == [200] * 200
    assert time.monotonic() - started < 25  # the pool's timeout is 30 s: nobody waited for it
