"""Clients that stop sending are cut off (QAAS_READ_TIMEOUT_S, app.api.timeouts), against a real `qaas api`
(uvicorn) on a free port with a 2 s timeout: a connection that sends nothing, a request head that trickles in,
and an upload whose body stalls (408, no temporary file left)."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0
CUT_OFF_WITHIN_S = TIMEOUT_S + 4.0  # the bound the tests hold the server to
WAIT_S = 12.0  # how long a test waits before it calls the connection held


@dataclass
class Api:
    port: int
    data_dir: Path
    log: Path

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)
        return sock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    folder = tmp_path_factory.mktemp("timeouts")
    data_dir = folder / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")} | {
        "QAAS_READ_TIMEOUT_S": str(TIMEOUT_S),
        "QAAS_AUTH": "disabled",
    }
    qaas = [sys.executable, "-m", "qaas"]
    migrated = subprocess.run(
        [*qaas, "migrate", "--data-dir", str(data_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr
    port = _free_port()
    log = folder / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*qaas, "api", "--port", str(port), "--data-dir", str(data_dir)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield Api(port, data_dir, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _closed_after(sock: socket.socket, started: float, trickle: bytes = b"") -> float:
    """Seconds from `started` until the server closed `sock` (sending `trickle` a byte every 0.3 s meanwhile);
    fails when it is still open after WAIT_S."""
    pending = trickle
    while time.monotonic() - started < WAIT_S:
        readable, _, _ = select.select([sock], [], [], 0.3)
        if readable:
            try:
                if sock.recv(65536) == b"":
                    return time.monotonic() - started
            except ConnectionResetError:
                return time.monotonic() - started
        elif pending:
            try:
                sock.sendall(pending[:1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            pending = pending[1:]
    raise AssertionError(f"the server still holds the connection after {WAIT_S} s")


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of a response"
        body += chunk
    return int(lines[0].split()[1]), body


def test_a_connection_that_sends_nothing_is_closed(api: Api) -> None:
    with api.connect() as sock:
        assert _closed_after(sock, time.monotonic()) < CUT_OFF_WITHIN_S


def test_a_request_head_that_trickles_in_is_closed(api: Api) -> None:
    """A byte every 0.3 s keeps uvicorn's own timer from ever firing; the head's deadline does not move."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100
    with api.connect() as sock:
        assert _closed_after(sock, time.monotonic(), trickle=head) < CUT_OFF_WITHIN_S


def test_the_next_request_on_a_kept_alive_connection_is_bounded_too(api: Api) -> None:
    with api.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(sock)[0] == 200
        sock.sendall(b"G")
        started = time.monotonic()
        assert _closed_after(sock, started, trickle=b"ET /healthz HTTP/1.1\r\n" + b"X: " + b"a" * 100) < (
            CUT_OFF_WITHIN_S
        )


def test_a_slow_but_complete_head_and_body_are_served(api: Api) -> None:
    """Each piece within the timeout, the whole longer than it: served."""
    body = b'{"name": "x"}'
    pieces = [
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n",
        b"Content-Type: application/json\r\n",
        f"Content-Length: {len(body)}\r\n\r\n".encode(),
        body[:5],
        body[5:],
    ]
    with api.connect() as sock:
        for piece in pieces[:3]:
            sock.sendall(piece)
            time.sleep(0.5)
        for piece in pieces[3:]:
            time.sleep(TIMEOUT_S * 0.6)
            sock.sendall(piece)
        status, answer = _response(sock)
    assert status != 408, answer  # the route's own answer (the job is invalid), not a timeout


def test_an_upload_whose_body_stalls_gets_408_and_leaves_no_file(api: Api) -> None:
    boundary = "qaasboundary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="model.pt2"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"\0" * 4096
    head = (
        "POST /v1/models HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n"
    ).encode()
    with api.connect() as sock:
        sock.sendall(head + part)
        started = time.monotonic()
        while not list(api.data_dir.rglob("*.part")):
            assert time.monotonic() - started < TIMEOUT_S, "the upload did not start: no temporary file"
            time.sleep(0.05)
        status, answer = _response(sock)
        elapsed = time.monotonic() - started
        assert status == 408, answer
        assert json.loads(answer)["error"] == "request_timeout"
        assert TIMEOUT_S * 0.9 < elapsed < CUT_OFF_WITHIN_S
        assert _closed_after(sock, time.monotonic()) < 2.0  # Connection: close
    assert list(api.data_dir.rglob("*.part")) == []
    assert "request body stalled" in api.log.read_text()
