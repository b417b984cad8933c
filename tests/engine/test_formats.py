"""Model formats are told apart by content, and every refusal says what to do instead."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from tests.engine.conftest import make_zip
from workers.engine.errors import EngineError
from workers.engine.inputs.io import detect_model_format, load_model


def refusal(path: Path) -> EngineError:
    with pytest.raises(EngineError) as info:
        detect_model_format(path)
    return info.value


def test_pt2_and_torchscript_are_detected_whatever_their_names(
    mlp_pt2: Path, mlp_ts: Path, tmp_path: Path
) -> None:
    swapped_pt2, swapped_ts = tmp_path / "model.ts", tmp_path / "model.pt2"
    swapped_pt2.write_bytes(mlp_pt2.read_bytes())
    swapped_ts.write_bytes(mlp_ts.read_bytes())
    assert detect_model_format(swapped_pt2) == "pt2"
    assert detect_model_format(swapped_ts) == "torchscript"


def test_random_bytes_are_not_a_model(random_bytes: Path) -> None:
    error = refusal(random_bytes)
    assert error.code == "not_a_model"
    assert "found 1234 bytes that are not a zip archive" in error.message


def test_a_plain_zip_lists_what_it_holds(plain_zip: Path) -> None:
    error = refusal(plain_zip)
    assert error.code == "not_a_model"
    assert error.message.endswith("found a plain zip with files a.txt, b.bin")


def test_a_pickled_module_is_refused_with_the_export_recipe(pickled_model: Path) -> None:
    error = refusal(pickled_model)
    assert error.code == "pickle_not_allowed"
    assert 'torch.export.Dim("batch")' in error.message
    assert "torch.export.export(model.eval()" in error.message
    assert 'torch.export.save(ep, "model.pt2")' in error.message


def test_a_legacy_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, str(path), _use_new_zipfile_serialization=False)
    assert refusal(path).code == "pickle_not_allowed"


def test_native_code_is_refused(native_zip: Path) -> None:
    error = refusal(native_zip)
    assert error.code == "native_code_not_allowed"
    assert "lib.so" in error.message


def test_an_aoti_package_layout_is_refused(tmp_path: Path) -> None:
    entries = {"m/archive_format": b"pt2", "m/data/aotinductor/model/wrapper.json": b"{}"}
    assert refusal(make_zip(tmp_path / "m.pt2", entries)).code == "native_code_not_allowed"


def test_unsafe_entry_paths_are_refused(tmp_path: Path) -> None:
    error = refusal(make_zip(tmp_path / "m.pt2", {"../escape/archive_format": b"pt2"}))
    assert error.code == "not_a_model"
    assert "unsafe entry path" in error.message


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(10_001):
            zf.writestr(f"f{i}", b"")
    assert "entries" in refusal(path).message


def test_a_zip_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/data/zeros", b"\x00" * (8 * 1024 * 1024))
    assert "expands more than" in refusal(path).message


def test_a_program_with_a_pickled_payload_is_refused_before_loading(
    pt2_with_pickled_weight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.export.load must not run on this file")

    monkeypatch.setattr(torch.export, "load", never)
    assert detect_model_format(pt2_with_pickled_weight) == "pt2"
    with pytest.raises(EngineError) as info:
        load_model(pt2_with_pickled_weight)
    assert info.value.code == "pickle_not_allowed"


def test_a_broken_program_is_a_load_failure(mlp_pt2: Path, tmp_path: Path) -> None:
    from tests.engine.conftest import rewrite_zip

    with zipfile.ZipFile(mlp_pt2) as zf:
        model_json = next(n for n in zf.namelist() if n.endswith("/models/model.json"))
    broken = rewrite_zip(mlp_pt2, tmp_path / "broken.pt2", {model_json: b'{"graph_module": 1}'})
    with pytest.raises(EngineError) as info:
        load_model(broken)
    assert info.value.code == "model_load_failed"
