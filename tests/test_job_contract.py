"""The job contract (qaas.contract.jobs): one definition of every option, from which the API's request, the
engine's configs and the runner's spec are built; configs are frozen and validated when built, with messages
that say how to fix the call."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.schemas.jobs import JobCreate
from qaas.contract.jobs import (
    BenchmarkConfig,
    BenchmarkOptions,
    DynamicConfig,
    JobOptions,
    QATConfig,
    QATOptions,
    RunnerSpec,
    StaticConfig,
    engine_config,
    explain,
)
from qaas.contract.vocab import Backend, DataRole


def test_defaults_are_the_same_in_the_request_and_the_engine() -> None:
    request = JobCreate(model_id="mdl_x", mode="static")
    config = engine_config(request.mode, request.backend, request.options, request.benchmark)
    assert config == StaticConfig()
    assert config.backend == Backend.AUTO == "auto"
    assert config.benchmark == BenchmarkConfig(batch_sizes=(1, 8), threads=1, iterations=50)
    assert DynamicConfig().seed == JobOptions().seed == 0
    with pytest.raises(ValidationError, match="frozen"):
        config.seed = 3  # type: ignore[misc]


def test_each_mode_takes_its_own_options() -> None:
    options = JobOptions(
        weight_granularity="per_tensor", exclude=("head",), quantize_embeddings=True, qat=QATOptions(epochs=3)
    )
    dynamic = engine_config("dynamic", "fbgemm", options, BenchmarkOptions(batch_sizes=(1,)))
    assert isinstance(dynamic, DynamicConfig)
    assert (dynamic.exclude, dynamic.quantize_embeddings, dynamic.benchmark.batch_sizes) == (
        ("head",),
        True,
        (1,),
    )
    static = engine_config("static", "x86", options, BenchmarkOptions())
    assert type(static) is StaticConfig and static.weight_granularity == "per_tensor"
    qat = engine_config("qat", "auto", options, BenchmarkOptions())
    assert isinstance(qat, QATConfig) and qat.qat.epochs == 3


def test_lists_become_tuples() -> None:
    config = DynamicConfig(exclude=["head"], benchmark=BenchmarkConfig(batch_sizes=[1, 8]))  # type: ignore[arg-type]
    assert config.exclude == ("head",)
    assert config.benchmark.batch_sizes == (1, 8)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"batch_sizes": ()}, "batch_sizes: needs at least 1"),
        ({"batch_sizes": (0,)}, "batch_sizes.0: must be >= 1"),
        ({"batch_sizes": (257,)}, "batch_sizes.0: must be <= 256"),
        ({"threads": 65}, "threads: must be <= 64"),
        ({"iterations": 0}, "iterations: must be >= 1"),
        ({"iterations": 10_001}, "iterations: must be <= 10000"),
    ],
)
def test_benchmark_bounds(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BenchmarkConfig(**kwargs)
    assert words in explain(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"backend": "onnx"}, "backend: 'onnx' is unknown: use 'fbgemm', 'x86' or 'auto'"),
        ({"exclude": ("",)}, "not a layer or type name"),
        ({"exclude": ("  ",)}, "not a layer or type name"),
        ({"seed": -1}, "seed: must be >= 0"),
        ({"seed": 2**31}, "seed: must be <= 2147483647"),
        ({"quantize_embeddings": "yes"}, "quantize_embeddings: must be true or false"),
        ({"weight_granularity": "per_tensor"}, "weight_granularity: is not an option here"),
    ],
)
def test_dynamic_config_validation(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DynamicConfig(**kwargs)
    assert words in explain(caught.value)


def test_the_runner_spec_is_typed() -> None:
    spec = RunnerSpec.model_validate_json(
        '{"model": "m.pt2", "mode": "qat", "train": "t.npz", "options": {"qat": {"batch_size": 16}}}'
    )
    assert spec.data() == {DataRole.CALIBRATION: None, DataRole.EVAL: None, DataRole.TRAIN: "t.npz"}
    config = spec.config()
    assert isinstance(config, QATConfig) and config.qat.batch_size == 16 and config.batch_size == 8
    with pytest.raises(ValidationError) as caught:
        RunnerSpec.model_validate_json('{"model": "m.pt2", "mode": "dynamic", "options": {"sead": 1}}')
    assert "options.sead: is not an option here" in explain(caught.value)


def test_the_api_schema_is_the_contract() -> None:
    """OpenAPI shows the contract's bounds and defaults: the request's options are the contract's model."""
    schema = JobCreate.model_json_schema()
    options = schema["$defs"]["JobOptions"]["properties"]
    assert options["seed"]["maximum"] == 2**31 - 1
    assert schema["$defs"]["BenchmarkOptions"]["properties"]["batch_sizes"]["default"] == [1, 8]
    assert JobCreate.model_fields["options"].annotation is JobOptions


def test_openapi_shows_the_typed_metrics() -> None:
    from app.main import create_app

    schemas = create_app().openapi()["components"]["schemas"]
    metrics = schemas["JobOut"]["properties"]["metrics"]
    assert {"$ref": "#/components/schemas/JobMetrics"} in metrics["anyOf"]
    assert {"size", "latency", "fidelity"} <= set(schemas["JobMetrics"]["required"])
    assert schemas["LatencyRow"]["properties"]["speedup"]["description"].startswith("fp32 p50 / int8 p50")
    report = create_app().openapi()["paths"]["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]
    assert report["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobReport"}
    assert schemas["JobReport"]["properties"]["metrics"] == {"$ref": "#/components/schemas/JobMetrics"}
