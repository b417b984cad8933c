"""Hugging Face encoders through quantize(): dynamic mode on either engine, JSONL text tokenized by the model's
own tokenizer, static and QAT refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qaas.contract.jobs import DynamicConfig, QATConfig, StaticConfig
from tests.engine.conftest import FAST_BENCHMARK
from tests.engine.conftest_hf import LINEAR_LAYERS
from workers.engine.api import quantize
from workers.engine.errors import EngineError
from workers.engine.inputs.hf import embedding_cosine, hf_example_inputs
from workers.engine.inputs.io import load_model

pytest_plugins = ["tests.engine.conftest_hf"]

TEXTS = ["the cat sat on a mat", "a dog", "the dogs sat on the cat", "cat", "a mat sat"]


@pytest.fixture(scope="session")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "reviews.jsonl"
    lines = [json.dumps({"text": text, "label": i % 2}) for i, text in enumerate(TEXTS * 4)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_dynamic_with_a_labelled_jsonl_eval_set(
    hf_zip: Path, hf_folder: Path, reviews: Path, tmp_path: Path
) -> None:
    result = quantize(
        hf_zip, DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK), out_dir=tmp_path, eval_data=reviews
    )
    assert [(a.name, a.format) for a in result.artifacts] == [("model.int8.ts", "torchscript")]
    metrics = result.metrics
    layers = metrics["layers"]
    assert (layers["quantized"], layers["float"]) == (LINEAR_LAYERS + 1, 0)  # + word embeddings
    rows = layers["per_layer"]  # every quantized layer, under its transformers path, worst first
    assert len(rows) == len({row["name"] for row in rows}) == LINEAR_LAYERS + 1
    by_name = {row["name"]: row["type"] for row in rows}
    assert by_name["embeddings.word_embeddings"] == "Embedding"
    assert by_name["encoder.layer.1.attention.self.query"] == by_name["pooler.dense"] == "Linear"
    assert sum(1 for kind in by_name.values() if kind == "Linear") == LINEAR_LAYERS
    values = [row["sqnr_db"] for row in rows]
    assert values == sorted(values) and all(20 < v < 200 for v in values)
    assert metrics["fidelity"]["cosine"] >= 0.99
    assert metrics["size"]["fp32_bytes"] == (hf_folder / "model.safetensors").stat().st_size
    warnings = metrics["warnings"]
    assert not any("random inputs" in w for w in warnings)  # verified on the tokenized texts
    assert any("no accuracy reported" in w for w in warnings)  # labels, but the output is hidden states
    assert "accuracy" not in metrics
    assert result.manifest["format"] == "hf" and result.manifest["engine"] == "fbgemm"
    assert "y = model(input_ids, attention_mask)" in result.load_snippet
    torch.backends.quantized.engine = "fbgemm"
    int8 = torch.jit.load(str(result.artifacts[0].path))  # plain torch
    loaded = load_model(hf_zip)
    batches = [hf_example_inputs(loaded, b, s, seed=b + s, padded=True) for b, s in ((1, 5), (3, 12))]
    for batch in batches:
        out = int8(batch["input_ids"], batch["attention_mask"])
        assert out.shape == (*batch["input_ids"].shape, 64)
    assert embedding_cosine(loaded.module, int8, batches) >= 0.99


def test_embeddings_can_be_kept_float(hf_zip: Path, tmp_path: Path) -> None:
    config = DynamicConfig(backend="x86", quantize_embeddings=False, benchmark=FAST_BENCHMARK)
    result = quantize(hf_zip, config, out_dir=tmp_path)
    assert result.metrics["layers"]["quantized"] == LINEAR_LAYERS
    assert result.manifest["engine"] == "x86"
    assert 'torch.backends.quantized.engine = "x86"' in result.load_snippet
    assert any("random inputs" in w for w in result.metrics["warnings"])


@pytest.mark.parametrize(
    "config", [StaticConfig(backend="fbgemm"), QATConfig(backend="fbgemm")], ids=["static", "qat"]
)
def test_static_and_qat_are_refused_before_anything_else(
    config: object, hf_zip: Path, tmp_path: Path
) -> None:
    with pytest.raises(EngineError) as info:
        quantize(hf_zip, config, out_dir=tmp_path)  # no data: the refusal comes first
    assert info.value.code == "unsupported_combination"
    assert info.value.message.startswith("Hugging Face models are served in dynamic mode: ")
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
