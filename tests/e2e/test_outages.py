"""The broker and the database go away and come back: the API answers 503 (never 500) meanwhile, recovers by
itself, and every job still reaches a final state exactly once. Each test stops its own server (a redis-server
it started, a TCP proxy in front of PostgreSQL), never the shared ones the rest of CI uses."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import IN_CI, PG_URL, configure, require_url, reset_caches, reset_postgres
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throw-away redis-server without persistence: a restart loses every queued message."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed: CI must run the Redis restart test")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_stack(own_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """The API and one worker on its own Redis, and on PostgreSQL when CI provides it (else SQLite)."""
    from app.core.config import get_settings
    from app.core.migrate import upgrade
    from app.main import create_app

    database_url = ""
    if PG_URL or IN_CI:
        database_url = require_url("QAAS_TEST_DATABASE_URL", PG_URL)
        reset_postgres(database_url)
    configure(monkeypatch, tmp_path / "var", database_url, own_redis.url)
    for name, value in {"HEARTBEAT_S": "1", "REAPER_INTERVAL_S": "1", "REQUEUE_AFTER_S": "5"}.items():
        monkeypatch.setenv(f"QAAS_{name}", value)
    settings = get_settings()
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app()) as client:
        stack = Stack(client=client, data_dir=settings.data_dir, worker_log=tmp_path / "worker.log")
        stack.start_worker(QAAS_WORKER_CONCURRENCY="2")
        try:
            yield stack
        finally:
            stack.stop_workers()
            reset_caches()


def test_a_redis_restart_loses_no_job_and_runs_none_twice(
    redis_stack: Stack, own_redis: RedisServer, pt2_file: Path
) -> None:
    stack = redis_stack
    with open(pt2_file, "rb") as handle:
        model_id = stack.client.post("/v1/models", files={"file": ("mlp.pt2", handle)}).json()["id"]
    assert stack.wait(f"/v1/models/{model_id}", {"ready", "invalid"})["status"] == "ready"

    def submit(iterations: int) -> str:
        body = {
            "model_id": model_id,
            "mode": "dynamic",
            "backend": "fbgemm",
            "benchmark": {"batch_sizes": [64], "iterations": iterations},
        }
        response = stack.client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    running = submit(3000)  # long enough to be running across the restart
    stack.wait(f"/v1/jobs/{running}", {"running"}, timeout_s=60)
    queued = [submit(3) for _ in range(10)]
    own_redis.kill()  # every queued message is gone with it
    down = stack.client.post("/v1/jobs", json={"model_id": model_id, "mode": "dynamic"})
    assert (down.status_code, down.json()["error"]) == (503, "dependency_unavailable")
    own_redis.start()

    jobs = {job_id: stack.wait(f"/v1/jobs/{job_id}", FINAL, timeout_s=300) for job_id in [running, *queued]}
    for job_id, job in jobs.items():
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
        names = sorted(a["name"] for a in job["artifacts"])
        assert names == ["manifest.json", "model.int8.ts", "report.json"], job_id
        folder = stack.data_dir / "artifacts" / job_id
        assert sorted(p.name for p in folder.iterdir()) == ["attempt-1"]


class TcpProxy:
    """Forwards a local port to PostgreSQL until cut: then connections are refused and open ones reset."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
        self.listener.close()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.connections.clear()


def test_postgres_down_is_503_and_the_api_recovers_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.engine import make_url

    from app.core.config import get_settings
    from app.core.migrate import upgrade
    from app.main import create_app

    url = make_url(require_url("QAAS_TEST_DATABASE_URL", PG_URL))
    reset_postgres(url.render_as_string(hide_password=False))
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    configure(monkeypatch, tmp_path / "var", proxied)
    get_settings().data_dir.mkdir(parents=True)
    upgrade(proxied)
    try:
        with TestClient(create_app()) as client:
            assert client.get("/v1/models").status_code == 200
            assert client.get("/readyz").status_code == 200

            proxy.cut()
            for path in ("/v1/models", "/v1/jobs", "/readyz", "/v1/jobs/job_unknown"):
                response = client.get(path)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["error"] == "dependency_unavailable"
            posted = client.post("/v1/jobs", json={"model_id": "mdl_x", "mode": "dynamic"})
            assert (posted.status_code, posted.json()["error"]) == (503, "dependency_unavailable")

            proxy.start()  # the database is back: no restart, no manual step
            answers = [client.get("/v1/models").status_code for _ in range(3)]
            assert answers == [200, 200, 200]
            assert client.get("/readyz").status_code == 200
    finally:
        proxy.cut()
        reset_caches()
