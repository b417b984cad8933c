from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.main import create_app
from app.services import datasets as dataset_service
from app.services import models as model_service


@pytest.fixture
def client(service_env: Path) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


MLP_INSPECTION = {
    "format": "pt2",
    "inputs": [{"name": "x", "shape": [None, 16], "dtype": "float32"}],
    "parameters": 676,
    "layers": {"Linear": 2, "ReLU": 1},
}


def upload(client: TestClient, path: str, content: bytes, **fields: str) -> Any:
    return client.post(path, files={"file": ("upload.bin", content)}, data=fields)


def make_ready_model(client: TestClient, inspection: dict[str, Any] = MLP_INSPECTION) -> str:
    """An uploaded model marked as a worker would mark it (API tests run no worker)."""
    response = upload(client, "/v1/models", b"not inspected in API tests")
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    with session_scope() as session:
        model_service.record_inspection(session, model_id, result=inspection, error=None)
    return model_id


def make_ready_dataset(client: TestClient, tensors: dict[str, Any], has_labels: bool = False) -> str:
    response = upload(client, "/v1/datasets", b"not inspected in API tests")
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    num = next(iter(tensors.values()))["shape"][0]
    result = {"format": "npz", "num_samples": num, "tensors": tensors, "has_labels": has_labels}
    with session_scope() as session:
        dataset_service.record_inspection(session, dataset_id, result=result, error=None)
    return dataset_id


def job_metrics(ratio: float = 4.0, speedup: float = 2.0) -> dict[str, Any]:
    """A complete metrics document as the worker stores one (qaas.contract.metrics.JobMetrics: the worker
    refuses a runner's document that does not validate, so the API only ever serves complete ones)."""
    return {
        "size": {"fp32_bytes": 4000, "int8_bytes": int(4000 / ratio), "ratio": ratio},
        "latency": [
            {
                "batch_size": 1,
                "threads": 1,
                "fp32_ms": {"p50": 2.0 * speedup, "p95": 2.2 * speedup},
                "int8_ms": {"p50": 2.0, "p95": 2.2},
                "speedup": speedup,
            }
        ],
        "fidelity": {"sqnr_db": 30.0, "cosine": 0.999, "max_abs_error": 0.01, "top1_agreement": None},
        "warnings": [],
    }
