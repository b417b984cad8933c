"""The metrics document the engine writes is the contract's (qaas.contract.metrics.JobMetrics): every key is
declared, every type is as documented, and it reads back unchanged. The worker refuses a runner's document
that does not validate (workers.tasks); this proves the engine's own documents do, key for key."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qaas.contract.jobs import DynamicConfig
from qaas.contract.metrics import JobMetrics, undeclared
from tests.engine.conftest import FAST_BENCHMARK, WIDTH
from workers.engine.api import quantize


def _checked(document: dict) -> JobMetrics:
    metrics = JobMetrics.model_validate(document)
    assert undeclared(metrics) == [], "declare these keys in qaas/contract/metrics.py"
    assert metrics.model_dump(mode="json") == document  # read back unchanged: nothing dropped or added
    return metrics


def test_a_labelled_job_and_auto_write_the_documented_metrics(mlp_ts: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "eval.npz"
    np.savez(data, x=rng.standard_normal((32, WIDTH)).astype(np.float32), labels=rng.integers(0, 10, 32))
    result = quantize(
        mlp_ts,
        DynamicConfig(backend="auto", benchmark=FAST_BENCHMARK),  # TorchScript: both candidates, no compiler
        out_dir=tmp_path / "out",
        input_shapes={"x": [None, WIDTH]},
        eval_data=data,
    )
    metrics = _checked(result.metrics)
    assert metrics.accuracy is not None and metrics.backends and metrics.backend_choice
    assert [row.batch_size for row in metrics.latency] == [1, 4]
    first = metrics.first_latency()
    assert first is not None and first.speedup == result.metrics["latency"][0]["speedup"]


def test_a_job_without_labels_leaves_accuracy_absent(mlp_pt2: Path, tmp_path: Path) -> None:
    result = quantize(mlp_pt2, DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK), out_dir=tmp_path)
    metrics = _checked(result.metrics)
    assert metrics.accuracy is None and "accuracy" not in metrics.model_dump(mode="json")
