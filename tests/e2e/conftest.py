"""A real Celery worker process beside the API, on the embedded default (SQLite database and broker) and on
PostgreSQL + Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import PG_URL, REDIS_URL, configure, require_url, reset_postgres


@dataclass
class Stack:
    client: TestClient
    data_dir: Path
    worker_log: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        """A `qaas worker` process leading its own process group, logging to worker_log; `env` adds settings."""
        with open(self.worker_log, "ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "qaas", "worker", "--loglevel", "info"],
                env=os.environ | env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()

    def wait(self, path: str, done: set[str], timeout_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.client.get(path).json()
            if body["status"] in done:
                return body
            if time.monotonic() > deadline:
                tail = self.worker_log.read_text()[-3000:]
                raise AssertionError(
                    f"{path} still {body['status']} after {timeout_s} s: {body}\nworker log:\n{tail}"
                )
            time.sleep(0.2)


@pytest.fixture(params=["embedded", "redis-postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    from app.core.config import get_settings
    from app.core.migrate import upgrade
    from app.main import create_app

    database_url = broker_url = ""
    if request.param == "redis-postgres":
        database_url = require_url("QAAS_TEST_DATABASE_URL", PG_URL)
        broker_url = require_url("QAAS_TEST_REDIS_URL", REDIS_URL)
        reset_postgres(database_url)
        import redis

        redis.Redis.from_url(broker_url).flushdb()
    data_dir = tmp_path / "var"
    configure(monkeypatch, data_dir, database_url, broker_url)
    # Fast beats: a lost job's lease (6 heartbeats, at least 10 s) expires soon, the reaper looks every second.
    monkeypatch.setenv("QAAS_HEARTBEAT_S", "1")
    monkeypatch.setenv("QAAS_REAPER_INTERVAL_S", "1")
    monkeypatch.setenv("QAAS_REQUEUE_AFTER_S", "5")
    settings = get_settings()
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)

    with TestClient(create_app()) as client:
        stack = Stack(client=client, data_dir=data_dir, worker_log=tmp_path / "worker.log")
        if "no_worker" not in request.keywords:
            stack.start_worker()
        try:
            yield stack
        finally:
            stack.stop_workers()


class MLP(torch.nn.Module):
    """Big enough Linear layers that int8 weights dominate the file: the size ratio is then above 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 512)
        self.fc2 = torch.nn.Linear(512, 512)
        self.fc3 = torch.nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def float_model() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def pt2_file(tmp_path: Path, float_model: MLP) -> Path:
    path = tmp_path / "mlp.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(float_model, (torch.randn(2, 64),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    return path


@pytest.fixture
def torchscript_file(tmp_path: Path, float_model: MLP) -> Path:
    path = tmp_path / "mlp.ts"
    torch.jit.save(torch.jit.script(float_model), path)
    return path
