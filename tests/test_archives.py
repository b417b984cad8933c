"""qaas.contract.archives: hostile uploads refused from their structures, real models and data sets accepted."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qaas.contract.archives import (
    ArchiveLimits,
    ArchiveRefused,
    check_safetensors_file,
    check_upload,
    check_zip_file,
    is_zip,
)

MB = 1024**2


def refusal(check: Callable[[], object]) -> ArchiveRefused:
    with pytest.raises(ArchiveRefused) as info:
        check()
    return info.value


def write_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def safetensors_bytes(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the library pads its header with spaces
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def valid_safetensors() -> bytes:
    weight = np.arange(12, dtype=np.float32)
    header = {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}, "__metadata__": {"a": "b"}}
    return safetensors_bytes(header, weight.tobytes())


# A zip written field by field, for what zipfile will not write: lying sizes and counts, ZIP64 records.


@dataclass
class Raw:
    name: bytes
    data: bytes = b""  # the bytes stored (compressed already when method is 8)
    method: int = 0
    size: int | None = None  # declared uncompressed size; len(data) when None
    compressed: int | None = None  # declared compressed size; len(data) when None
    flags: int = 0
    external_attr: int = 0
    create_system: int = 3
    zip64: bool = False  # sizes and offset in a ZIP64 extra field
    offset: int | None = None  # points the directory at another entry's local header (no local header)


def raw_zip(entries: list[Raw], *, zip64_end: bool = False, count: int | None = None) -> bytes:
    out = bytearray()
    directory = bytearray()
    for e in entries:
        size = len(e.data) if e.size is None else e.size
        compressed = len(e.data) if e.compressed is None else e.compressed
        offset = len(out) if e.offset is None else e.offset
        if e.offset is None:
            out += struct.pack(
                "<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, e.flags, e.method, 0, 33, 0, 0, 0, len(e.name), 0
            )
            out += e.name + e.data
        fields = (size, compressed, offset)
        extra = b""
        if e.zip64:
            extra = struct.pack("<HH3Q", 1, 24, *fields)
            fields = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        directory += struct.pack(
            "<4s4B4HL2L5H2L",
            b"PK\x01\x02",
            20,
            e.create_system,
            45 if e.zip64 else 20,
            0,
            e.flags,
            e.method,
            0,
            33,
            zlib.crc32(e.data) if e.method == 0 else 0,
            fields[1],
            fields[0],
            len(e.name),
            len(extra),
            0,
            0,
            0,
            e.external_attr,
            fields[2],
        )
        directory += e.name + extra
    n = len(entries) if count is None else count
    directory_at = len(out)
    out += directory
    if zip64_end or n > 0xFFFF:
        zip64_at = len(out)
        out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(directory), directory_at)
        out += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(directory), directory_at, 0)
    return bytes(out)


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def many_entries(n: int) -> bytes:
    return raw_zip([Raw(b"f%06d" % i) for i in range(n)])


def peak_bytes(check: Callable[[], object]) -> tuple[ArchiveRefused, int]:
    tracemalloc.start()
    try:
        error = refusal(check)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return error, peak


# Accepted: what real uploads look like.


def test_a_model_like_zip_with_stored_and_deflated_entries_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/config.json", json.dumps({"model_type": "bert"}), zipfile.ZIP_DEFLATED)
        zf.writestr("model/vocab.txt", "[PAD]\n[UNK]\n" * 1000, zipfile.ZIP_DEFLATED)
        zf.writestr("model/model.safetensors", valid_safetensors(), zipfile.ZIP_STORED)
        zf.writestr("model/random.bin", np.random.default_rng(0).bytes(3 * MB), zipfile.ZIP_DEFLATED)
        zf.writestr("model/", b"")
    assert is_zip(path)
    assert check_zip_file(path) == 5
    check_upload(path, "model.zip")


def test_a_torch_export_layout_of_stored_entries_is_accepted(tmp_path: Path) -> None:
    entries = {
        "model/archive_format": b"pt2",
        "model/byteorder": b"little",
        "model/models/model.json": b"{}" * 500,
        "model/data/weights/model_weights_config.json": b"{}",
        "model/data/weights/weight_0": np.ones(4096, np.float32).tobytes(),
        "model/.data/version": b"1",
    }
    path = write_zip(tmp_path / "model.pt2", entries, zipfile.ZIP_STORED)
    assert check_zip_file(path) == len(entries)
    check_upload(path, "model.pt2")


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_safetensors_entry_written_by_the_library_is_accepted(tmp_path: Path, compression: int) -> None:
    save_file({"w": np.ones((64, 64), np.float32), "b": np.zeros(64, np.float32)}, tmp_path / "w.safetensors")
    path = tmp_path / "hf.zip"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.write(tmp_path / "w.safetensors", "bert/model.safetensors")
        zf.writestr("bert/config.json", b'{"model_type": "bert"}')
    check_upload(path, "hf.zip")


def test_an_npz_is_a_zip_and_passes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((8, 4), np.float32), y=np.arange(8))
    assert is_zip(path)
    assert check_zip_file(path) == 2
    check_upload(path, "d.npz")


def test_a_zip_with_a_comment_and_an_empty_zip_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.comment = b"built by hand; the end record is found before its comment"
        zf.writestr("a.txt", b"a")
    assert check_zip_file(path) == 1
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    assert is_zip(empty)
    assert check_zip_file(empty) == 0


def test_zip64_records_and_extra_fields_are_read(tmp_path: Path) -> None:
    entries = [Raw(b"a.bin", b"x" * 100, zip64=True), Raw(b"b/c.txt", b"hello")]
    path = tmp_path / "z64.zip"
    path.write_bytes(raw_zip(entries, zip64_end=True))
    with zipfile.ZipFile(path) as zf:  # the hand-written archive is one zipfile reads
        assert zf.read("a.bin") == b"x" * 100
    assert is_zip(path)
    assert check_zip_file(path) == 2


def test_zipfile_streamed_zip64_entries_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("w.bin", "w", force_zip64=True) as f:
        f.write(np.random.default_rng(1).bytes(2 * MB))
    assert check_zip_file(path) == 1


@pytest.mark.parametrize(
    "content", [b"hello", b"", b"\x80\x04pickle", b'{"abcd":{"x": 1}}\n{"abcd":{"x": 2}}\n']
)
def test_files_that_are_neither_zip_nor_safetensors_pass(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "upload"
    path.write_bytes(content)
    assert not is_zip(path)
    check_upload(path, "data.jsonl")


# Refused zips.


def test_a_zip_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    zeros = bytes(MB)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        zf.open("m/data/zeros", "w", force_zip64=True) as f,
    ):
        for _ in range(256):
            f.write(zeros)
    assert path.stat().st_size < 2 * MB
    error = refusal(lambda: check_upload(path, "bomb.zip"))
    assert error.code == "zip_bomb"
    assert "expands more than 200x" in error.message
    assert error.message.startswith("the archive")


def test_a_zip64_bomb_declaring_a_terabyte_is_refused(tmp_path: Path) -> None:
    data = deflate(bytes(100_000))
    path = tmp_path / "tb.zip"
    path.write_bytes(raw_zip([Raw(b"w.bin", data, method=8, size=2**40, zip64=True)]))
    assert refusal(lambda: check_zip_file(path)).code == "zip_bomb"


def test_entries_sharing_their_data_are_refused_as_a_bomb(tmp_path: Path) -> None:
    shared = np.random.default_rng(2).bytes(64 * 1024)
    entries = [Raw(b"e0", shared)] + [Raw(b"e%d" % i, shared, offset=0) for i in range(1, 100)]
    path = tmp_path / "overlap.zip"
    path.write_bytes(raw_zip(entries))
    error = refusal(lambda: check_zip_file(path))
    assert (error.code, "overlap" in error.message) == ("zip_bomb", True)


def test_a_total_over_the_limit_is_refused(tmp_path: Path) -> None:
    data = deflate(bytes(1000))
    huge = [Raw(b"p%d" % i, data, method=8, size=10 * 1024**3, zip64=True) for i in range(2)]
    path = tmp_path / "big.zip"
    path.write_bytes(raw_zip(huge))
    error = refusal(lambda: check_zip_file(path, ArchiveLimits(max_ratio=1e12)))
    assert error.code == "zip_too_large"
    assert str(20 * 1024**3) in error.message
    small = write_zip(tmp_path / "s.zip", {f"{i}.bin": np.random.default_rng(i).bytes(MB) for i in range(3)})
    assert refusal(lambda: check_zip_file(small, ArchiveLimits(max_total_uncompressed=2 * MB))).code == (
        "zip_too_large"
    )


def test_100000_entries_are_refused_in_small_memory(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    path.write_bytes(many_entries(100_000))
    error, peak = peak_bytes(lambda: check_upload(path, "many.zip"))
    assert error.code == "zip_too_many_entries"
    assert "100000 entries; at most 10000" in error.message
    assert peak < 5 * MB


def test_an_end_record_lying_about_the_count_is_caught_while_walking(tmp_path: Path) -> None:
    path = tmp_path / "liar.zip"
    path.write_bytes(raw_zip([Raw(b"f%06d" % i) for i in range(100_000)], count=10))
    error, peak = peak_bytes(lambda: check_upload(path, "liar.zip"))
    assert error.code == "zip_too_many_entries"
    assert "more than 10000 entries (its end record claims 10)" in error.message
    assert peak < 5 * MB
    print(f"peak while walking a lying directory: {peak} bytes")


def test_a_count_lower_than_the_directory_s_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "liar.zip"
    path.write_bytes(raw_zip([Raw(b"a"), Raw(b"b"), Raw(b"c")], count=2))
    assert refusal(lambda: check_zip_file(path)).code == "zip_corrupt"


def test_an_end_record_lying_about_the_directory_size_is_refused(tmp_path: Path) -> None:
    good = write_zip(tmp_path / "g.zip", {f"f{i}": b"x" for i in range(100)})
    data = bytearray(good.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<L", data, end + 12, 2**31)  # the directory's size
    path = tmp_path / "liar.zip"
    path.write_bytes(bytes(data))
    error, peak = peak_bytes(lambda: check_upload(path, "liar.zip"))
    assert error.code == "zip_corrupt"
    assert peak < 5 * MB
    error = refusal(lambda: check_zip_file(good, ArchiveLimits(max_central_directory_bytes=1000)))
    assert (error.code, "central directory" in error.message) == ("zip_too_many_entries", True)


@pytest.mark.parametrize(
    "name", ["../evil", "/etc/passwd", "C:\\x", "a/../../b", "\\\\server\\share", "a\\..\\..\\b"]
)
def test_unsafe_paths_are_refused(tmp_path: Path, name: str) -> None:
    path = write_zip(tmp_path / "evil.zip", {"ok.txt": b"ok", name: b"x"})
    error = refusal(lambda: check_upload(path, "evil.zip"))
    assert error.code == "zip_unsafe_path"
    assert repr(name) in error.message


def test_a_nul_byte_in_a_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nul.zip"
    path.write_bytes(raw_zip([Raw(b"ok.txt\x00../../etc/cron.d/x", b"x")]))
    with zipfile.ZipFile(path) as zf:  # zipfile cuts the name at the NUL: what it shows looks harmless
        assert zf.namelist() == ["ok.txt"]
    assert refusal(lambda: check_zip_file(path)).code == "zip_unsafe_path"


def test_a_symlink_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("model/weights")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/shadow")
    assert refusal(lambda: check_upload(path, "link.zip")).code == "zip_link_entry"


def test_an_encrypted_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "locked.zip"
    path.write_bytes(raw_zip([Raw(b"a.txt", b"a"), Raw(b"secret.bin", b"x" * 20, flags=0x1)]))
    error = refusal(lambda: check_upload(path, "locked.zip"))
    assert error.code == "zip_encrypted"
    assert "without a password" in error.message


@pytest.mark.parametrize("keep", [0.5, 0.95, 0.999])
def test_a_truncated_zip_is_corrupt(tmp_path: Path, keep: float) -> None:
    good = write_zip(
        tmp_path / "g.zip", {f"f{i}.bin": np.random.default_rng(i).bytes(10_000) for i in range(20)}
    )
    data = good.read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(data[: int(len(data) * keep)])
    assert refusal(lambda: check_zip_file(path)).code == "zip_corrupt"
    assert refusal(lambda: check_upload(path, "cut.zip")).code == "zip_corrupt"


def test_an_entry_past_the_end_of_the_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "long.zip"
    path.write_bytes(raw_zip([Raw(b"w.bin", deflate(b"abc"), method=8, size=3, compressed=10**6)]))
    error = refusal(lambda: check_zip_file(path))
    assert (error.code, "past the" in error.message) == ("zip_corrupt", True)


def test_a_garbled_directory_is_corrupt(tmp_path: Path) -> None:
    good = write_zip(tmp_path / "g.zip", {"a": b"a", "b": b"b"})
    data = bytearray(good.read_bytes())
    data[data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 1)] = ord("X")  # the second directory entry
    path = tmp_path / "bad.zip"
    path.write_bytes(bytes(data))
    assert refusal(lambda: check_zip_file(path)).code == "zip_corrupt"


def test_data_before_the_zip_is_refused(tmp_path: Path) -> None:
    inner = write_zip(tmp_path / "g.zip", {"a.txt": b"a"}).read_bytes()
    path = tmp_path / "sfx.zip"
    path.write_bytes(b"#!/bin/sh\nexit 0\n" + inner)
    with zipfile.ZipFile(path) as zf:  # zipfile finds the entries anyway; other readers may not
        assert zf.read("a.txt") == b"a"
    assert is_zip(path)
    error = refusal(lambda: check_upload(path, "sfx.zip"))
    assert (error.code, "17 bytes" in error.message) == ("zip_corrupt", True)


def test_a_file_object_keeps_its_position(tmp_path: Path) -> None:
    buffer = io.BytesIO(write_zip(tmp_path / "g.zip", {"a": b"a"}).read_bytes())
    buffer.seek(3)
    assert check_zip_file(buffer) == 1
    assert is_zip(buffer)
    assert buffer.tell() == 3


# Safetensors, bare and inside zips.


def test_a_safetensors_file_from_the_library_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": np.ones((8, 8), np.float32)}, path)
    check_safetensors_file(path)
    check_upload(path, "w.safetensors")
    assert not is_zip(path)


def test_a_hand_written_safetensors_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(valid_safetensors())
    check_safetensors_file(path)
    check_upload(path, "w.bin")


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (struct.pack("<Q", 2**40) + b'{"a": 1}', "safetensors_header_too_large"),
        (struct.pack("<Q", 100_000_001) + b"{", "safetensors_header_too_large"),
        (safetensors_bytes({"a": 1}, length=1000), "invalid_safetensors"),
        (safetensors_bytes([1, 2, 3]), "invalid_safetensors"),
        (struct.pack("<Q", 8) + b'{"a": 1', "invalid_safetensors"),
        (struct.pack("<Q", 12) + b'{"a": "\xff"}', "invalid_safetensors"),
        (struct.pack("<Q", 8) + b" {}     ", "invalid_safetensors"),
        (b"\x01\x00", "invalid_safetensors"),
    ],
)
def test_bad_safetensors_files_are_refused(tmp_path: Path, content: bytes, code: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    assert refusal(lambda: check_upload(path, "w.safetensors")).code == code
    assert refusal(lambda: check_safetensors_file(path)).code == code


def test_safetensors_are_recognised_by_content_too(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}" + bytes(16))
    assert refusal(lambda: check_upload(path, "weights.bin")).code == "invalid_safetensors"


def test_a_large_header_is_checked_as_it_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qaas.contract.archives.safetensors_header._FULL_PARSE_MAX", 1000)
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for i in range(2000)}
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(4)))
    check_safetensors_file(path)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) + 2) + raw[:-1] + b"\xc3\x28 " + bytes(4))
    assert refusal(lambda: check_safetensors_file(path)).code == "invalid_safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[:-1] + b"]" + bytes(4))
    assert refusal(lambda: check_safetensors_file(path)).code == "invalid_safetensors"


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_a_safetensors_entry_with_a_huge_header_length_is_refused(tmp_path: Path, compression: int) -> None:
    path = tmp_path / "hf.zip"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("config.json", b'{"model_type": "bert"}')
        zf.writestr("model.safetensors", struct.pack("<Q", 2**40) + b'{"a": 1}' + bytes(1000))
    error = refusal(lambda: check_upload(path, "hf.zip"))
    assert error.code == "safetensors_header_too_large"
    assert "'model.safetensors'" in error.message


def test_a_safetensors_entry_with_a_broken_header_is_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "hf.zip", {"m/model.safetensors": struct.pack("<Q", 4) + b"[1] " + bytes(64)})
    assert refusal(lambda: check_zip_file(path)).code == "invalid_safetensors"


def test_refusals_are_value_errors_with_their_code() -> None:
    error = ArchiveRefused("zip_bomb", "the archive is a bomb")
    assert isinstance(error, ValueError)
    assert str(error) == "zip_bomb: the archive is a bomb"
    assert (error.code, error.message) == ("zip_bomb", "the archive is a bomb")
