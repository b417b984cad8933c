"""Hugging Face model zips for the engine tests: a tiny random-weight BERT with a WordPiece tokenizer.

Load with `pytest_plugins = ["tests.engine.conftest_hf"]`; the builders are plain functions too.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "a", "mat", "##s"]
TINY = {
    "vocab_size": 200,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
LINEAR_LAYERS = 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; the pooler


def build_hf_folder(folder: Path, *, seed: int = 0) -> Path:
    """A random-weight BertModel saved as safetensors, with a WordPiece tokenizer from a written vocab."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    BertModel(BertConfig(**TINY)).eval().save_pretrained(folder, safe_serialization=True)
    vocab_dir = folder.parent / f"{folder.name}-vocab"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizerFast.from_pretrained(str(vocab_dir), local_files_only=True).save_pretrained(folder)
    return folder


def zip_folder(
    folder: Path, path: Path, *, prefix: str = "", replace: dict[str, bytes | None] | None = None
) -> Path:
    """Zip a model folder; `replace` swaps (bytes) or drops (None) entries, or adds new ones."""
    replace = dict(replace or {})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.iterdir()):
            data = replace.pop(file.name, file.read_bytes())
            if data is not None:
                zf.writestr(prefix + file.name, data)
        for name, data in replace.items():
            if data is not None:
                zf.writestr(prefix + name, data)
    return path


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_folder(tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture(scope="session")
def hf_zip(hf_folder: Path) -> Path:
    return zip_folder(hf_folder, hf_folder.parent / "bert.zip")
