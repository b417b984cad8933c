"""Image-folder zips (preprocessed to NCHW float32 with labels) and JSONL text (tokenized by the model's tokenizer)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.engine.errors import EngineError
from workers.engine.inputs import images
from workers.engine.inputs.data import check_dataset_matches, inspect_dataset, load_dataset, tokenize_jsonl
from workers.engine.inputs.io import InputSpec, ModelInfo

SPEC = {"resize": 32, "crop": 28, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
RED, BLUE = (255, 0, 0), (0, 0, 255)


def image_bytes(size: tuple[int, int], color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    """Two classes, images of different sizes and formats; 'dog' sorts after 'cat' whatever the zip order."""
    return make_zip(
        tmp_path / "pets.bin",
        {
            "dog/d1.png": image_bytes((50, 64), BLUE),
            "cat/c2.jpg": image_bytes((40, 30), RED, "JPEG"),
            "cat/c1.png": image_bytes((32, 32), RED),
            "cat/.DS_Store": b"\x00\x01",
            "__MACOSX/cat/._c1.png": b"\x00",
        },
    )


def refusal(path: Path, **kwargs: object) -> EngineError:
    with pytest.raises(EngineError) as info:
        inspect_dataset(path, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_image_folder_inspection_and_load(pets: Path) -> None:
    info = inspect_dataset(pets, preprocess=SPEC).to_dict()
    assert info == {
        "format": "image_folder",
        "num_samples": 3,
        "tensors": {
            "x": {"shape": [3, 3, 28, 28], "dtype": "float32"},
            "labels": {"shape": [3], "dtype": "int64"},
        },
        "has_labels": True,
        "classes": ["cat", "dog"],
    }
    arrays = load_dataset(pets, preprocess=SPEC)
    assert arrays["x"].shape == (3, 3, 28, 28) and arrays["x"].dtype == np.float32
    assert arrays["labels"].tolist() == [0, 0, 1]  # cat/c1.png, cat/c2.jpg, dog/d1.png
    # (pixel / 255 - 0.5) / 0.25: a red pixel is [2, -2, -2], a blue one [-2, -2, 2]
    np.testing.assert_allclose(arrays["x"][0, :, 5, 5], [2, -2, -2], atol=1e-5)
    np.testing.assert_allclose(arrays["x"][1, :, 5, 5], [2, -2, -2], atol=0.05)  # JPEG is lossy
    np.testing.assert_allclose(arrays["x"][2, :, 5, 5], [-2, -2, 2], atol=1e-5)


def test_one_top_folder_is_allowed_and_sizes_follow_resize(tmp_path: Path) -> None:
    entries = {"pets/cat/a.png": image_bytes((60, 40), RED), "pets/dog/b.png": image_bytes((90, 60), BLUE)}
    path = make_zip(tmp_path / "p.zip", entries)
    info = inspect_dataset(path, preprocess={"resize": 20})
    assert info.tensors["x"]["shape"] == [2, 3, 20, 30]  # shorter side 20, aspect kept
    assert info.classes == ["cat", "dog"]
    assert load_dataset(path, preprocess={"resize": 20})["x"].shape == (2, 3, 20, 30)


def test_images_of_different_sizes_need_a_preprocess(pets: Path) -> None:
    error = refusal(pets)
    assert error.code == "invalid_dataset"
    assert "differ in size" in error.message and '"crop": 224' in error.message


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"resize": -1}, "preprocess resize is -1"),
        ({"resise": 32}, "unknown keys 'resise'"),
        ({"crop": [28, 28, 3]}, "preprocess crop"),
        ({"mean": [0.5, 0.5]}, "preprocess mean"),
        ({"std": [0.2, 0.0, 0.2]}, "three positive numbers"),
        ({"resize": 32, "crop": 40}, "smaller than the 40x40 crop"),
        ("resize=32", "JSON object"),
    ],
)
def test_bad_preprocess_specs_are_refused(pets: Path, spec: object, words: str) -> None:
    error = refusal(pets, preprocess=spec)
    assert error.code == "invalid_dataset"
    assert words in error.message


def test_preprocess_is_for_images_only(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 4), np.float32))
    assert "applies to image-folder zips" in refusal(path, preprocess=SPEC).message


def test_a_path_traversal_entry_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "evil.zip", {"cat/a.png": image_bytes((8, 8), RED), "../dog/b.png": b"x"})
    error = refusal(path, preprocess=SPEC)
    assert error.code == "invalid_dataset"
    assert "unsafe entry path '../dog/b.png'" in error.message


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(10_001):
            zf.writestr(f"cat/{i}.png", b"")
    error = refusal(path)
    assert error.code == "invalid_dataset"
    assert "10001 entries" in error.message


def test_a_decompression_bomb_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    path = make_zip(tmp_path / "b.zip", {"cat/big.png": image_bytes((40, 30), RED)})
    error = refusal(path)
    assert error.code == "invalid_dataset"
    assert "40x30 pixels; at most 1000" in error.message


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ({"cat/a.png": b"not an image"}, "not a readable PNG or JPEG"),
        ({"cat/a.png": image_bytes((8, 8), RED, "GIF")}, "not a readable PNG or JPEG"),  # by content
        ({"cat/a.png": image_bytes((8, 8), RED), "cat/notes.txt": b"hi"}, "'cat/notes.txt' is not a .png"),
        ({"cat/a.png": image_bytes((8, 8), RED), "b.png": image_bytes((8, 8), RED)}, "<class>/<image>"),
    ],
)
def test_malformed_image_folders_are_invalid(tmp_path: Path, entries: dict[str, bytes], words: str) -> None:
    error = refusal(make_zip(tmp_path / "d.zip", entries))
    assert error.code == "invalid_dataset"
    assert words in error.message


def test_a_zip_without_images_is_unsupported(tmp_path: Path) -> None:
    error = refusal(make_zip(tmp_path / "d.zip", {"a.txt": b"hello"}))
    assert error.code == "unsupported_format"
    assert "image-folder zip" in error.message


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_inspection(tmp_path: Path) -> None:
    lines = ['{"text": "the cat sat", "label": 0}', "", '{"text": "a dog", "label": 1, "id": 7}']
    info = inspect_dataset(write_jsonl(tmp_path / "t.jsonl", lines)).to_dict()
    assert info == {
        "format": "jsonl",
        "num_samples": 2,
        "tensors": {"text": {"shape": [2], "dtype": "str"}, "labels": {"shape": [2], "dtype": "int64"}},
        "has_labels": True,
    }
    plain = inspect_dataset(write_jsonl(tmp_path / "u.jsonl", ['{"text": "hello"}']))
    assert (plain.num_samples, plain.has_labels, list(plain.tensors)) == (1, False, ["text"])
    arrays = load_dataset(tmp_path / "t.jsonl")
    assert arrays["text"].tolist() == ["the cat sat", "a dog"] and arrays["labels"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ('{"text": "a dog", "label": 1', "line 3 is not valid JSON"),
        ('{"label": 1}', 'line 3 has no "text" string'),
        ('["a dog"]', 'line 3 has no "text" string'),
        ('{"text": "a dog", "label": -1}', "line 3 has label -1"),
        ('{"text": "a dog", "label": true}', "line 3 has label True"),
        ('{"text": "a dog"}', "line 3 has no label but line 1 has one"),
    ],
)
def test_malformed_jsonl_lines_are_named(tmp_path: Path, bad: str, words: str) -> None:
    lines = ['{"text": "the cat", "label": 0}', '{"text": "the mat", "label": 1}', bad]
    error = refusal(write_jsonl(tmp_path / "t.jsonl", lines))
    assert error.code == "invalid_dataset"
    assert words in error.message


def test_jsonl_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert "line 2 is not UTF-8" in refusal(path).message


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.engine.conftest_hf import build_hf_folder

    return build_hf_folder(tmp_path_factory.mktemp("tok") / "bert")


def test_jsonl_is_tokenized_by_the_models_tokenizer(tmp_path: Path, tokenizer_dir: Path) -> None:
    lines = ['{"text": "the cat sat", "label": 1}', '{"text": "a dog sat on the mat", "label": 0}']
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    arrays = tokenize_jsonl(path, tokenizer_dir, 16)
    # [CLS] the cat sat [SEP] [PAD]…, with ids from the vocabulary written by build_hf_folder
    assert arrays["input_ids"].tolist() == [[2, 5, 6, 8, 3, 0, 0, 0], [2, 10, 7, 8, 9, 5, 11, 3]]
    assert arrays["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]
    assert arrays["input_ids"].dtype == np.int64 and arrays["labels"].tolist() == [1, 0]
    short = load_dataset(path, tokenizer_dir=tokenizer_dir, max_length=4)
    assert short["input_ids"].tolist() == [[2, 5, 6, 3], [2, 10, 7, 3]]  # truncated, [SEP] kept
    with pytest.raises(EngineError) as info:
        tokenize_jsonl(path, tokenizer_dir, 65)
    assert info.value.code == "invalid_config"
    assert "1..64" in info.value.message


def test_jsonl_needs_a_tokenizer(tmp_path: Path, tokenizer_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((tokenizer_dir / "config.json").read_bytes())
    path = write_jsonl(tmp_path / "t.jsonl", ['{"text": "the cat"}'])
    with pytest.raises(EngineError) as info:
        tokenize_jsonl(path, bare, 8)
    assert info.value.code == "unsupported_combination"
    assert "tokenizer.json" in info.value.message


def test_jsonl_matches_only_hugging_face_models_with_a_tokenizer(tmp_path: Path) -> None:
    ds = inspect_dataset(write_jsonl(tmp_path / "t.jsonl", ['{"text": "the cat"}']))
    specs = [InputSpec(n, [None, None], "int64") for n in ("input_ids", "attention_mask")]
    check_dataset_matches(ModelInfo("hf", specs, 0, {}, hf={"tokenizer": True}), ds, role="calibration")
    for model in (ModelInfo("hf", specs, 0, {}, hf={"tokenizer": False}), ModelInfo("pt2", specs, 0, {})):
        with pytest.raises(EngineError) as info:
            check_dataset_matches(model, ds, role="calibration")
        assert info.value.code == "dataset_mismatch"
        assert "the calibration dataset is JSONL text" in info.value.message


def test_image_folders_match_image_models(pets: Path) -> None:
    ds = inspect_dataset(pets, preprocess=SPEC)
    check_dataset_matches(ModelInfo("pt2", [InputSpec("x", [None, 3, 28, 28], "float32")], 0, {}), ds)
    with pytest.raises(EngineError) as info:
        check_dataset_matches(ModelInfo("pt2", [InputSpec("x", [None, 3, 32, 32], "float32")], 0, {}), ds)
    assert "[N, 3, 32, 32]" in info.value.message


def test_a_thin_image_cannot_be_resized_into_a_memory_bomb(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "thin.zip", {"cat/thin.png": image_bytes((1, 4000), RED)})
    error = refusal(path, preprocess={"resize": 8000, "crop": 8})
    assert error.code == "invalid_dataset"
    assert "after resize; at most" in error.message


def test_a_truncated_image_fails_at_load_with_its_name(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    path = make_zip(tmp_path / "t.zip", {"cat/ok.png": data, "cat/cut.png": data[: len(data) // 2]})
    assert inspect_dataset(path).num_samples == 2  # inspection reads headers only
    with pytest.raises(EngineError) as info:
        load_dataset(path)
    assert info.value.code == "invalid_dataset"
    assert "'cat/cut.png' could not be decoded" in info.value.message
