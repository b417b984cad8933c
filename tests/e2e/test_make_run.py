"""`make run` as a person types it, then the README's curl quick start against it, then Ctrl-C."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quickstart(readme: str) -> str:
    match = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```", readme, re.S)
    assert match, "README.md has lost its quick start block"
    return match.group(1)


def test_make_run_serves_and_the_readme_quick_start_works(tmp_path: Path) -> None:
    for tool in ("make", "curl", "jq"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"{tool} is needed for the quick start test")
            pytest.skip(f"{tool} is not installed")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"QAAS_PORT": str(port), "QAAS_DATA_DIR": str(tmp_path / "var")}
    for name in ("QAAS_DATABASE_URL", "QAAS_BROKER_URL"):
        env.pop(name, None)
    log_path = tmp_path / "make-run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 600  # includes the install when .venv is new
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        docs = httpx.get(f"{url}/docs")
        assert docs.status_code == 200 and "swagger-ui" in docs.text
        assert httpx.get(f"{url}/static-offline-docs/swagger-ui-bundle.js").status_code == 200

        script = _quickstart((ROOT / "README.md").read_text())
        script = script.replace("URL=http://127.0.0.1:8000", f"URL={url}").replace(".venv/", f"{ROOT}/.venv/")
        work = tmp_path / "quickstart"
        work.mkdir()
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr + log_path.read_text()[-3000:]
        assert '"status": "succeeded"' in done.stdout, done.stdout
        assert "torch.jit.load" in done.stdout
        artifact = (work / "model.int8.ts").read_bytes()
        summary = httpx.get(f"{url}/v1/jobs").json()["items"][0]
        assert summary["size_ratio"] > 3
        job = httpx.get(f"{url}{summary['url']}").json()
        listed = next(a for a in job["artifacts"] if a["name"] == "model.int8.ts")
        assert hashlib.sha256(artifact).hexdigest() == listed["sha256"]
        assert job["metrics"]["size"]["ratio"] > 3
    finally:
        # Ctrl-C, as a person stops it: make, the API and its worker child all exit.
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("make run did not stop on Ctrl-C") from None
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(group) >= 3 and alive == [], (group, alive)
    assert "Swagger UI" in log_path.read_text()
