"""Hugging Face model zips: detected by content, loaded offline, quantized dynamically and traced to TorchScript."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.engine.conftest_hf import LINEAR_LAYERS, build_hf_folder, zip_folder
from workers.engine.errors import EngineError
from workers.engine.inputs.io import detect_model_format, inspect_model, load_model

__all__ = ["build_hf_folder", "zip_folder"]  # tests/e2e import them from here
pytest_plugins = ["tests.engine.conftest_hf"]


@pytest.fixture
def fbgemm() -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    yield
    torch.backends.quantized.engine = previous


def config_with(folder: Path, **changes: object) -> bytes:
    config = json.loads((folder / "config.json").read_text())
    return json.dumps(config | changes).encode()


def refusal(path: Path) -> EngineError:
    with pytest.raises(EngineError) as info:
        detect_model_format(path)
    return info.value


def test_a_model_folder_zip_is_detected_by_content(hf_folder: Path, tmp_path: Path) -> None:
    assert detect_model_format(zip_folder(hf_folder, tmp_path / "model.pt2")) == "hf"
    assert detect_model_format(zip_folder(hf_folder, tmp_path / "nested.zip", prefix="bert/")) == "hf"


def test_inspection_has_dynamic_token_inputs_layers_and_tokenizer(hf_zip: Path) -> None:
    info = inspect_model(hf_zip).to_dict()
    assert info["format"] == "hf"
    assert info["inputs"] == [
        {"name": "input_ids", "shape": [None, None], "dtype": "int64"},
        {"name": "attention_mask", "shape": [None, None], "dtype": "int64"},
    ]
    assert info["layers"]["Linear"] == LINEAR_LAYERS
    assert info["layers"]["Embedding"] == 3  # word, position, token type
    assert info["layers"]["LayerNorm"] == 5
    assert info["parameters"] > 80_000
    assert info["hf"] == {
        "model_type": "bert",
        "architecture": "BertModel",
        "tokenizer": True,
        "vocab_size": 200,
        "hidden_size": 64,
        "max_length": 64,
    }


def test_load_extracts_only_what_transformers_reads(hf_folder: Path, tmp_path: Path) -> None:
    path = zip_folder(hf_folder, tmp_path / "m.zip", replace={"README.md": b"# notes", "tf_model.h5": b"x"})
    loaded = load_model(path, workdir=tmp_path)
    assert loaded.directory is not None and loaded.directory.parent == tmp_path
    names = sorted(p.name for p in loaded.directory.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    ids = torch.randint(0, 200, (2, 7))
    assert loaded.module(ids, torch.ones_like(ids)).shape == (2, 7, 64)


def test_quantized_bert_is_faithful_torchscript_with_dynamic_shapes(
    hf_zip: Path, hf_folder: Path, tmp_path: Path, fbgemm: None
) -> None:
    from workers.engine.inputs.hf import embedding_cosine, hf_example_inputs, quantize_hf_dynamic

    loaded = load_model(hf_zip)
    result = quantize_hf_dynamic(loaded, seed=3)
    assert result.quantized == LINEAR_LAYERS + 1  # every Linear and the word embeddings
    assert result.float_layers == 0 and result.warnings == []
    assert result.cosine >= 0.99
    artifact = tmp_path / "model.int8.ts"
    torch.jit.save(result.module, str(artifact))
    float_ts = tmp_path / "model.fp32.ts"
    torch.jit.save(result.float_traced, str(float_ts))
    reloaded = torch.jit.load(str(artifact))
    batches = [hf_example_inputs(loaded, b, s, seed=b * s, padded=True) for b in (1, 3) for s in (5, 12)]
    for batch in batches:
        out = reloaded(batch["input_ids"], batch["attention_mask"])
        assert out.shape == (*batch["input_ids"].shape, 64)
    cosine = embedding_cosine(loaded.module, reloaded, batches)
    assert cosine >= 0.99  # the requirement; measured 0.99999 on this random-weight model
    weights = (hf_folder / "model.safetensors").stat().st_size
    size = artifact.stat().st_size
    print(
        f"cosine {cosine:.6f}, safetensors/int8 {weights / size:.2f}x, ts fp32/int8 {float_ts.stat().st_size / size:.2f}x"
    )
    assert size < float_ts.stat().st_size


def test_the_artifact_runs_with_plain_torch(hf_zip: Path, tmp_path: Path, fbgemm: None) -> None:
    from workers.engine.inputs.hf import quantize_hf_dynamic

    artifact = tmp_path / "model.int8.ts"
    torch.jit.save(quantize_hf_dynamic(load_model(hf_zip)).module, str(artifact))
    code = (
        "import sys, torch\n"
        "torch.backends.quantized.engine = 'fbgemm'\n"
        f"m = torch.jit.load({str(artifact)!r})\n"
        "for b, s in ((1, 5), (3, 12)):\n"
        "    ids = torch.randint(0, 200, (b, s))\n"
        "    assert m(ids, torch.ones_like(ids)).shape == (b, s, 64)\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_embeddings_and_excluded_layers_stay_float(hf_zip: Path, fbgemm: None) -> None:
    from workers.engine.inputs.hf import quantize_hf_dynamic

    loaded = load_model(hf_zip)
    result = quantize_hf_dynamic(
        loaded, quantize_embeddings=False, exclude=("encoder.layer.1", "pooler.dense", "head")
    )
    assert result.quantized == 6  # the six Linear layers of encoder.layer.0
    assert result.float_layers == 7
    assert result.warnings == ["exclude entry 'head' matched no layer"]
    assert type(loaded.module.model.embeddings.word_embeddings).__name__ == "Embedding"  # untouched
    with pytest.raises(EngineError) as info:
        quantize_hf_dynamic(loaded, quantize_embeddings=False, exclude=("Linear",))
    assert info.value.code == "nothing_quantized"


def test_remote_code_is_refused(hf_folder: Path, tmp_path: Path) -> None:
    auto_map = config_with(hf_folder, auto_map={"AutoModel": "modeling_evil.EvilModel"})
    error = refusal(zip_folder(hf_folder, tmp_path / "a.zip", replace={"config.json": auto_map}))
    assert error.code == "unsupported_format"
    assert "auto_map" in error.message
    error = refusal(zip_folder(hf_folder, tmp_path / "b.zip", replace={"modeling_evil.py": b"import os"}))
    assert error.code == "unsupported_format"
    assert "modeling_evil.py" in error.message


def test_pickled_weights_are_refused(hf_folder: Path, tmp_path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(200, 64)}, buffer)
    only_bin = {"model.safetensors": None, "pytorch_model.bin": buffer.getvalue()}
    error = refusal(zip_folder(hf_folder, tmp_path / "bin.zip", replace=only_bin))
    assert error.code == "pickle_not_allowed"
    assert "pytorch_model.bin" in error.message
    assert "safe_serialization=True" in error.message
    disguised = {"weights.data": b"\x80\x04\x95" + b"\x00" * 16}  # pickle content under another name
    error = refusal(zip_folder(hf_folder, tmp_path / "pkl.zip", replace=disguised))
    assert error.code == "pickle_not_allowed"
    assert "weights.data" in error.message


def test_other_model_types_are_refused(hf_folder: Path, tmp_path: Path) -> None:
    gpt2 = config_with(hf_folder, model_type="gpt2")
    error = refusal(zip_folder(hf_folder, tmp_path / "g.zip", replace={"config.json": gpt2}))
    assert error.code == "unsupported_format"
    assert "bert, distilbert, roberta" in error.message


def test_a_folder_without_weights_or_model_type_is_not_a_model(hf_folder: Path, tmp_path: Path) -> None:
    error = refusal(zip_folder(hf_folder, tmp_path / "w.zip", replace={"model.safetensors": None}))
    assert error.code == "not_a_model"
    assert "no *.safetensors weights" in error.message
    no_type = json.dumps({"hidden_size": 64}).encode()
    error = refusal(zip_folder(hf_folder, tmp_path / "t.zip", replace={"config.json": no_type}))
    assert error.code == "not_a_model"
    assert "model_type" in error.message


def test_weights_that_do_not_fit_the_config_are_a_load_failure(hf_folder: Path, tmp_path: Path) -> None:
    deeper = config_with(hf_folder, num_hidden_layers=3)  # layer 2 would run on random weights
    path = zip_folder(hf_folder, tmp_path / "d.zip", replace={"config.json": deeper})
    with pytest.raises(EngineError) as info:
        load_model(path)
    assert info.value.code == "model_load_failed"
    assert "encoder.layer.2" in info.value.message


@pytest.mark.parametrize("model_type", ["distilbert", "roberta"])
def test_distilbert_and_roberta_are_served(model_type: str, tmp_path: Path, fbgemm: None) -> None:
    import transformers

    from workers.engine.inputs.hf import quantize_hf_dynamic

    config_class, model_class = {
        "distilbert": (transformers.DistilBertConfig, transformers.DistilBertModel),
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
    }[model_type]
    sizes = {"vocab_size": 200, "max_position_embeddings": 66}
    if model_type == "distilbert":
        sizes |= {"dim": 64, "n_layers": 2, "n_heads": 2, "hidden_dim": 128}
    else:
        sizes |= {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        }
    torch.manual_seed(0)
    folder = tmp_path / model_type
    model_class(config_class(**sizes)).eval().save_pretrained(folder, safe_serialization=True)
    loaded = load_model(zip_folder(folder, tmp_path / "m.zip"))
    assert loaded.info.hf is not None
    assert (loaded.info.hf["model_type"], loaded.info.hf["tokenizer"]) == (model_type, False)
    assert loaded.info.hf["max_length"] == (64 if model_type == "roberta" else 66)  # roberta skips padding
    result = quantize_hf_dynamic(loaded)  # checks the trace at batch 1 and 3, 5 and 11 tokens
    assert result.quantized == loaded.info.layers["Linear"] + 1
    assert result.cosine >= 0.99


def test_encrypted_entries_are_refused(hf_zip: Path, tmp_path: Path) -> None:
    data = bytearray(hf_zip.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        start = 0
        while (start := data.find(signature, start)) >= 0:
            data[start + flags_at] |= 0x1  # "encrypted"
            start += 4
    path = tmp_path / "locked.zip"
    path.write_bytes(bytes(data))
    error = refusal(path)
    assert error.code == "not_a_model"
    assert "encrypted" in error.message
