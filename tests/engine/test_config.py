"""Configs are frozen and validated when built, with messages that say how to fix the call."""

from __future__ import annotations

import dataclasses

import pytest

from workers.engine.config import BenchmarkConfig, DynamicConfig


def test_defaults() -> None:
    config = DynamicConfig()
    assert config.backend == "fbgemm"
    assert config.benchmark == BenchmarkConfig(batch_sizes=(1,), threads=1, iterations=50)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


def test_lists_become_tuples() -> None:
    config = DynamicConfig(exclude=["head"], benchmark=BenchmarkConfig(batch_sizes=[1, 8]))  # type: ignore[arg-type]
    assert config.exclude == ("head",)
    assert config.benchmark.batch_sizes == (1, 8)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"batch_sizes": ()}, "at least one"),
        ({"batch_sizes": (0,)}, "1..256"),
        ({"batch_sizes": (257,)}, "1..256"),
        ({"threads": 65}, "1..64"),
        ({"iterations": 0}, "1..10000"),
        ({"iterations": 10_001}, "1..10000"),
    ],
)
def test_benchmark_bounds(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        BenchmarkConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"backend": "onnx"}, "fbgemm, x86, auto"),
        ({"exclude": ("",)}, "layer or type name"),
        ({"seed": -1}, "seed"),
        ({"quantize_embeddings": "yes"}, "true or false"),
    ],
)
def test_dynamic_config_validation(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        DynamicConfig(**kwargs)
