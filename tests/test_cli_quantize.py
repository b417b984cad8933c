"""`qaas quantize`: the engine alone, without a server, writes the same files a job publishes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qaas", "quantize", *args], capture_output=True, text=True, timeout=300
    )


def test_quantize_offline_writes_model_report_and_manifest(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).eval()
    program = torch.export.export(
        model, (torch.randn(2, 64),), dynamic_shapes={"input": {0: torch.export.Dim("batch")}}
    )
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, path)

    done = _run(
        str(path),
        "--mode",
        "dynamic",
        "--backend",
        "fbgemm",
        "--iterations",
        "5",
        "-o",
        str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    assert "backend      fbgemm" in done.stdout
    assert "torch.jit.load" in done.stdout
    out = tmp_path / "out"
    assert {"model.int8.ts", "report.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["size"]["int8_bytes"] == (out / "model.int8.ts").stat().st_size
    assert json.loads((out / "manifest.json").read_text())["mode"] == "dynamic"
    int8 = torch.jit.load(str(out / "model.int8.ts"))
    assert int8(torch.randn(3, 64)).shape == (3, 8)


def test_quantize_offline_reports_a_bad_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a model at all")
    done = _run(str(junk), "-o", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "not_a_model" in done.stderr
    missing = _run(str(tmp_path / "nope.pt2"), "-o", str(tmp_path / "out"))
    assert missing.returncode == 1 and "is not a file" in missing.stderr


def test_quantize_offline_refuses_a_value_the_job_contract_refuses(tmp_path: Path) -> None:
    """The flags are the job contract's: a bad value is a usage error in its words, before any runner starts."""
    model = tmp_path / "model.pt2"
    model.write_bytes(b"never read")
    for flags, expected in (
        (["--seed", "-1"], "options.seed: must be >= 0, got -1"),
        (["--qat-batch-size", "0"], "options.qat.batch_size: must be >= 1, got 0"),
        (["--batch-sizes", "1,x"], "'1,x' is not a comma-separated list of ints"),
        (["--weight-granularity", "per_row"], "invalid choice: 'per_row'"),
    ):
        done = _run(str(model), *flags, "-o", str(tmp_path / "out"))
        assert (done.returncode, expected in done.stderr) == (2, True), (flags, done.stderr)
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
