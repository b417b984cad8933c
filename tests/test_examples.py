"""Every example in examples/ run as a user runs it, against one real `qaas serve` (with an API key, taken from
QAAS_API_KEY as the examples document), at smaller settings than their defaults; their printed tables checked."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qaas.client import Client
from tests.conftest import IN_CI
from tests.test_client_cli import Served, qaas_serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with qaas_serve(tmp_path_factory.mktemp("examples")) as server:
        yield server


def _run(served: Served, command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, cwd=cwd, env=served.env(**env), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + served.tail()
    return done


def test_every_example_is_tested() -> None:
    tested = {"digits_cnn.py", "bert_dynamic.py", "curl.sh"}
    assert {path.name for path in EXAMPLES.iterdir() if path.suffix in (".py", ".sh")} == tested
    for path in EXAMPLES.iterdir():
        if path.suffix == ".py":  # a README paragraph on top: what it does and how to run it
            assert path.read_text().startswith('"""') and "python examples/" in path.read_text()


def test_digits_cnn_static_and_qat(served: Served, tmp_path: Path) -> None:
    done = _run(
        served,
        [sys.executable, str(EXAMPLES / "digits_cnn.py"), "--epochs", "4", "--iterations", "10"],
        tmp_path,
    )
    trained = re.search(r"fp32 test accuracy ([\d.]+) % on 450 images", done.stdout)
    assert trained and float(trained.group(1)) > 90, done.stdout
    header, *rows = done.stdout.split("measured by the server):\n")[1].strip().splitlines()
    assert header.split() == [
        "mode",
        "backend",
        "fp32",
        "acc",
        "int8",
        "acc",
        "delta",
        "size",
        "speedup",
        "b1",
    ]
    by_mode = {row.split()[0]: row.split() for row in rows}
    assert set(by_mode) == {"static", "qat"}, done.stdout
    for mode, cells in by_mode.items():
        assert cells[1] == "fbgemm", done.stdout
        fp32, int8, delta = float(cells[2]), float(cells[4]), float(cells[6])
        # The server measures the uploaded model on the same held-out quarter as the script did.
        assert fp32 == pytest.approx(float(trained.group(1)), abs=0.01), (mode, done.stdout)
        assert int8 > 85 and abs(delta) <= 3 and delta == pytest.approx(int8 - fp32, abs=0.01), done.stdout
        assert float(cells[7].rstrip("x")) > 2, done.stdout  # int8 weights, fp32 originals


def test_bert_dynamic(served: Served, tmp_path: Path) -> None:
    command = [
        sys.executable, str(EXAMPLES / "bert_dynamic.py"), "--layers", "2", "--hidden", "128", "--iterations", "10",
    ]  # fmt: skip
    done = _run(served, command, tmp_path)
    assert "random-weight BERT classifier: 2 layers, hidden 128" in done.stdout
    assert "'model_type': 'bert'" in done.stdout and "'tokenizer': True" in done.stdout
    size = re.search(r"size +fp32 +([\d.]+) MB +int8 +([\d.]+) MB +([\d.]+)x smaller", done.stdout)
    cosine = re.search(r"cosine +([\d.]+) +SQNR ([\d.]+) dB", done.stdout)
    assert size and cosine, done.stdout
    assert float(size.group(3)) > 2.5 and float(cosine.group(1)) >= 0.99, done.stdout
    assert re.search(r"dynamic int8, backend fbgemm, \d+ layers in int8", done.stdout)
    assert len(re.findall(r"latency +batch (1|8) ", done.stdout)) == 2


def test_curl_quick_start(served: Served, tmp_path: Path) -> None:
    for tool in ("curl", "jq"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"{tool} is needed for examples/curl.sh")
            pytest.skip(f"{tool} is not installed")
    work = tmp_path / "work"
    done = _run(served, ["bash", str(EXAMPLES / "curl.sh"), str(work)], tmp_path, PYTHON=sys.executable)
    assert '"status": "ready"' in done.stdout and '"status": "succeeded"' in done.stdout, done.stdout
    assert '"ratio": ' in done.stdout and "torch.jit.load" in done.stdout
    with Client(served.url, api_key=served.key) as client:
        job = client.job(client.jobs(limit=1)[0])  # the list's summary, then the whole job
    assert job.status == "succeeded" and job.mode == "dynamic"
    listed = job.artifact("model.int8.ts").sha256
    assert hashlib.sha256((work / "model.int8.ts").read_bytes()).hexdigest() == listed
