"""The runner CLI: JSON lines on stdout, result.json, exit codes 0 / 2 / 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.engine.conftest import WIDTH

ROOT = Path(__file__).resolve().parents[2]


def run_runner(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "workers.runner", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line must be JSON
    return proc.returncode, events, proc.stderr


def test_help_does_not_import_torch() -> None:
    code = "import sys, workers.runner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_inspect_model(mlp_pt2: Path, tmp_path: Path) -> None:
    rc, events, _ = run_runner("inspect-model", "--file", str(mlp_pt2), "--out", str(tmp_path))
    assert rc == 0
    assert events[0]["event"] == "progress"
    assert events[-1]["event"] == "result"
    assert events[-1]["result"]["inputs"] == [{"name": "x", "shape": [None, WIDTH], "dtype": "float32"}]
    assert json.loads((tmp_path / "result.json").read_text()) == events[-1]["result"]


def test_inspect_torchscript_with_shapes(mlp_ts: Path, tmp_path: Path) -> None:
    shapes = json.dumps({"x": [None, WIDTH]})
    rc, events, _ = run_runner(
        "inspect-model", "--file", str(mlp_ts), "--input-shapes", shapes, "--out", str(tmp_path)
    )
    assert rc == 0
    assert events[-1]["result"]["format"] == "torchscript"


def test_inspect_dataset(tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((6, WIDTH), np.float32), labels=np.zeros(6, np.int64))
    rc, events, _ = run_runner("inspect-dataset", "--file", str(data), "--out", str(tmp_path / "out"))
    assert rc == 0
    assert events[-1]["result"]["num_samples"] == 6
    assert events[-1]["result"]["has_labels"] is True


def test_user_errors_exit_2(pickled_model: Path, tmp_path: Path) -> None:
    rc, events, _ = run_runner("inspect-model", "--file", str(pickled_model), "--out", str(tmp_path))
    assert rc == 2
    assert events[-1]["event"] == "error"
    assert events[-1]["code"] == "pickle_not_allowed"
    assert not (tmp_path / "result.json").exists()


def test_unexpected_errors_exit_1(mlp_pt2: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    rc, events, stderr = run_runner("inspect-model", "--file", str(mlp_pt2), "--out", str(not_a_dir))
    assert rc == 1
    assert events[-1]["code"] == "internal_error"
    assert "FileExistsError" in events[-1]["message"]
    assert "Traceback" in stderr


def write_spec(path: Path, **spec: Any) -> Path:
    path.write_text(json.dumps(spec))
    return path


def test_quantize(mlp_pt2: Path, tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "spec.json",
        model=str(mlp_pt2),
        input_shapes=None,
        mode="dynamic",
        backend="fbgemm",  # auto's candidates and its AOTInductor compile are tested in-process
        options={"exclude": [], "quantize_embeddings": None, "seed": 0, "weight_granularity": "per_channel"},
        benchmark={"batch_sizes": [1], "iterations": 3},  # threads: the contract's default
        calibration=None,
        eval=None,
        train=None,
    )
    out = tmp_path / "out"
    rc, events, _ = run_runner("quantize", "--spec", str(spec), "--out", str(out))
    assert rc == 0, events
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    assert {"loading", "converting", "verifying", "benchmarking", "saving"} <= set(stages)
    result = events[-1]["result"]
    assert result["backend"] == "fbgemm"
    names = {a["name"]: a for a in result["artifacts"]}
    assert names["model.int8.ts"]["file"] == "model.int8.ts"
    assert names["model.int8.ts"]["format"] == "torchscript"
    assert (out / "model.int8.ts").is_file()
    assert result["metrics"]["size"]["ratio"] >= 3
    assert json.loads((out / "result.json").read_text()) == result


def test_quantize_refuses_unknown_modes_and_missing_data(mlp_pt2: Path, tmp_path: Path) -> None:
    # The spec is the job contract's (qaas.contract.jobs.RunnerSpec): an unknown mode or option is named.
    spec = write_spec(tmp_path / "turbo.json", model=str(mlp_pt2), mode="turbo")
    rc, events, _ = run_runner("quantize", "--spec", str(spec), "--out", str(tmp_path / "a"))
    assert (rc, events[-1]["code"]) == (2, "invalid_config")
    assert "mode: 'turbo' is unknown" in events[-1]["message"]
    spec = write_spec(tmp_path / "typo.json", model=str(mlp_pt2), mode="dynamic", options={"sead": 1})
    rc, events, _ = run_runner("quantize", "--spec", str(spec), "--out", str(tmp_path / "a"))
    assert (rc, events[-1]["code"]) == (2, "invalid_config")
    assert "options.sead" in events[-1]["message"]
    spec = write_spec(tmp_path / "static.json", model=str(mlp_pt2), mode="static")
    rc, events, _ = run_runner("quantize", "--spec", str(spec), "--out", str(tmp_path / "c"))
    assert (rc, events[-1]["code"]) == (2, "dataset_required")
    # A combination the support matrix refuses, before any work: x86 quantizes no embeddings of a .pt2.
    options = {"quantize_embeddings": True}
    spec = write_spec(
        tmp_path / "x86.json", model=str(mlp_pt2), mode="dynamic", backend="x86", options=options
    )
    rc, events, _ = run_runner("quantize", "--spec", str(spec), "--out", str(tmp_path / "b"))
    assert (rc, events[-1]["code"]) == (2, "unsupported_combination")
    assert "backend fbgemm" in events[-1]["message"]


def test_quantize_rechecks_the_artifact_in_a_fresh_process(mlp_pt2: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, WIDTH)).astype(np.float32))
    spec = write_spec(
        tmp_path / "spec.json",
        model=str(mlp_pt2),
        mode="dynamic",
        backend="fbgemm",
        benchmark={"batch_sizes": [1], "iterations": 3},
        eval=str(calib),
    )
    out = tmp_path / "out"
    rc, events, _ = run_runner("quantize", "--spec", str(spec), "--out", str(out))
    assert rc == 0, events
    messages = [e["message"] for e in events if e["event"] == "progress"]
    assert any("fresh process" in m for m in messages)
    metrics = events[-1]["result"]["metrics"]
    assert metrics["verification"] == {"fresh_process": True, "batches": 2, "samples": 16}
    assert metrics["fidelity"]["cosine"] > 0.99
    assert json.loads((out / "report.json").read_text())["verification"]["fresh_process"] is True
    assert not list(tmp_path.glob("**/recheck"))  # its scratch files went with the runner's temp folder

    # The same artifact against numbers it never produced: the fresh process refuses it.
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"fidelity": dict(metrics["fidelity"], cosine=0.5, sqnr_db=3.0)}))
    rc, events, _ = run_runner(
        "recheck", "--spec", str(spec), "--artifact", str(out / "model.int8.ts"), "--engine", "fbgemm",
        "--first", str(first), "--out", str(tmp_path / "again"),
    )  # fmt: skip
    assert (rc, events[-1]["code"]) == (2, "verification_failed")
    assert "fresh process does not behave" in events[-1]["message"]

    # A damaged artifact does not load there either.
    (out / "model.int8.ts").write_bytes(b"PK\x03\x04 not a TorchScript archive")
    first.write_text(json.dumps(metrics))
    rc, events, _ = run_runner(
        "recheck", "--spec", str(spec), "--artifact", str(out / "model.int8.ts"), "--engine", "fbgemm",
        "--first", str(first), "--out", str(tmp_path / "again"),
    )  # fmt: skip
    assert (rc, events[-1]["code"]) == (2, "verification_failed")
    assert "does not run when loaded in a fresh process" in events[-1]["message"]
