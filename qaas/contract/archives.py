"""Safety checks for a hostile uploaded file, run on disk right after it was streamed and before anything reads it.

Zip archives (torch.export programs, TorchScript archives, zipped Hugging Face models, image folders, `.npz`)
are checked from their own structures, never with `zipfile.ZipFile`, so that memory stays small whatever the
archive claims: the end-of-central-directory record is found the way `zipfile` finds it (so both see the
same archive), its counts and sizes are checked before anything else, then the central directory is walked in
chunks, entry by entry, stopping as soon as a limit is broken. Each `.safetensors` entry's header is checked
from the entry's first bytes, without extracting it. Bare safetensors files get the same header check.

Only the stdlib is imported: the API and the engine share these rules.

Every refusal is an `ArchiveRefused` with a stable code; messages about a zip begin with "the archive", so a
caller may name it ("the model archive").

Example:
    >>> check_upload("/data/uploads/3f2a.part", "model.pt2")  # raises ArchiveRefused, or returns None
"""

from __future__ import annotations

import bz2
import codecs
import itertools
import json
import lzma
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

__all__ = [
    "ArchiveLimits",
    "ArchiveRefused",
    "check_safetensors_file",
    "check_upload",
    "check_zip_file",
    "is_zip",
]

# The zip structures, as zipfile spells them.
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: 22 bytes, then the comment
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes, right before the end record
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # 56 bytes, right before the locator
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # central directory entry: 46 bytes, then name, extra, comment
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # local file header: 30 bytes, then name, extra, data
_LOCAL_SIGNATURE = b"PK\x03\x04"
_MAX_COMMENT = 1 << 16
_ZIP64_EXTRA = 0x0001
_FLAG_ENCRYPTED = 0x0001
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_UTF8 = 0x0800
_STORED, _DEFLATED, _BZIP2, _LZMA = 0, 8, 12, 14
_MAX_EXTRACT_VERSION = 63  # zipfile refuses newer entries with NotImplementedError
_U32_MAX = 0xFFFF_FFFF

_CHUNK = 256 * 1024
# Headers up to this size are parsed as JSON; larger ones (up to the safetensors limit) are checked as they
# stream (UTF-8, an object's braces) so that a hostile 100 MB header costs no more than a chunk of memory.
_FULL_PARSE_MAX = 16 * 1024**2
_JSON_SPACE = " \t\n\r"
_LISTING_HINT = "re-create it from the files themselves, e.g. `zip -r model.zip folder`"


class ArchiveRefused(ValueError):
    """An upload refused before anything reads it; code is stable snake_case, message says what to fix.

    Codes: zip_too_many_entries, zip_too_large, zip_bomb, zip_unsafe_path, zip_link_entry, zip_encrypted,
    zip_corrupt, safetensors_header_too_large, invalid_safetensors.

    Example:
        >>> raise ArchiveRefused("zip_encrypted", "the archive entry 'a.bin' is encrypted: zip it without a password")
    """

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ArchiveLimits:
    """What an upload may claim; the defaults are the service's.

    `max_ratio` applies to each entry larger than `ratio_min_bytes` once uncompressed (model weights compress
    a little, a bomb a thousandfold). `max_safetensors_header_bytes` is the safetensors library's own limit.
    """

    max_entries: int = 10_000
    max_total_uncompressed: int = 16 * 1024**3
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1024**2
    max_central_directory_bytes: int = 64 * 1024**2
    max_safetensors_header_bytes: int = 100_000_000


_DEFAULT_LIMITS = ArchiveLimits()

Source = str | os.PathLike[str] | IO[bytes]


@dataclass(frozen=True)
class _EndRecord:
    """The end-of-central-directory record, with the ZIP64 record's values when there is one."""

    position: int  # where the end record starts
    directory_end: int  # where the central directory must end: the ZIP64 record, else the end record
    disk: int
    directory_disk: int
    entries_on_disk: int
    entries: int
    directory_size: int
    directory_offset: int
    zip64: bool


@dataclass(frozen=True)
class _Entry:
    """What the central directory says about one entry (only kept for `.safetensors` entries)."""

    name: str
    method: int
    compressed: int
    size: int
    header_offset: int


@contextmanager
def _opened(source: Source) -> Iterator[IO[bytes]]:
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield f
        return
    position = source.tell()
    try:
        yield source
    finally:
        source.seek(position)


def _file_size(f: IO[bytes]) -> int:
    return f.seek(0, os.SEEK_END)


def _read_at(f: IO[bytes], offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _find_end_record(f: IO[bytes], size: int) -> _EndRecord | None:
    """The end record exactly where zipfile finds it (so both see one archive), or None when there is none.

    Raises:
        ArchiveRefused: zip_corrupt when the ZIP64 locator says the archive spans several disks.
    """
    if size < _EOCD.size:
        return None
    tail_start = max(size - _MAX_COMMENT - _EOCD.size, 0)
    tail = _read_at(f, tail_start, size - tail_start)
    last = tail[-_EOCD.size :]
    if last[:4] == _EOCD_SIGNATURE and last[-2:] == b"\x00\x00":
        start = len(tail) - _EOCD.size
    else:
        start = tail.rfind(_EOCD_SIGNATURE)
        if start < 0 or len(tail) - start < _EOCD.size:
            return None
    _, disk, directory_disk, on_disk, entries, directory_size, offset, _ = _EOCD.unpack_from(tail, start)
    position = tail_start + start
    record = _EndRecord(
        position, position, disk, directory_disk, on_disk, entries, directory_size, offset, zip64=False
    )
    if position < _ZIP64_LOCATOR.size:
        return record
    locator = _read_at(f, position - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size)
    signature, locator_disk, _, disks = _ZIP64_LOCATOR.unpack(locator)
    if signature != _ZIP64_LOCATOR_SIGNATURE:
        return record
    if locator_disk != 0 or disks > 1:
        raise ArchiveRefused(
            "zip_corrupt", f"the archive spans {disks} disks; upload a single-file zip ({_LISTING_HINT})"
        )
    zip64_at = position - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if zip64_at < 0:
        return record
    (signature, _, _, _, disk, directory_disk, on_disk, entries, directory_size, offset) = _ZIP64_EOCD.unpack(
        _read_at(f, zip64_at, _ZIP64_EOCD.size)
    )
    if signature != _ZIP64_EOCD_SIGNATURE:
        return record
    return _EndRecord(
        position, zip64_at, disk, directory_disk, on_disk, entries, directory_size, offset, zip64=True
    )


def is_zip(path: Source) -> bool:
    """Whether the file is a zip archive, by content: an end-of-central-directory record that zipfile would
    take, and the central directory where that record puts it. The name plays no part.

    Args:
        path: the file, or a seekable binary file object (its position is kept).

    Returns:
        True when `zipfile.ZipFile` would open it; False otherwise, and when it cannot be read.
    """
    try:
        with _opened(path) as f:
            try:
                end = _find_end_record(f, _file_size(f))
            except ArchiveRefused:
                return False  # a multi-disk archive: zipfile refuses to open it too
            if end is None:
                return False
            start = end.directory_end - end.directory_size  # where zipfile reads the directory
            if start < 0:
                return False
            return end.directory_size == 0 or _read_at(f, start, 4) == _CENTRAL_SIGNATURE
    except OSError:
        return False


def _unsafe_path(name: str) -> bool:
    """Absolute (/ or \\), a drive letter, a NUL byte or a `..` component: a path that could escape on extraction."""
    if "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in PurePosixPath(name.replace("\\", "/")).parts


class _DirectoryReader:
    """Reads the central directory sequentially, a chunk at a time, never past its end."""

    def __init__(self, f: IO[bytes], start: int, end: int) -> None:
        self._f = f
        self._next = start
        self._end = end
        self._buffer = b""
        self._at = 0

    def take(self, n: int) -> bytes | None:
        """The next n bytes, or None when the directory ends before them."""
        available = len(self._buffer) - self._at
        if available < n:
            want = min(max(n - available, _CHUNK), self._end - self._next)
            more = _read_at(self._f, self._next, want) if want > 0 else b""
            self._next += len(more)
            self._buffer = self._buffer[self._at :] + more
            self._at = 0
            if len(self._buffer) < n:
                return None
        out = self._buffer[self._at : self._at + n]
        self._at += n
        return out


def _corrupt(message: str) -> ArchiveRefused:
    return ArchiveRefused("zip_corrupt", f"{message}: the file is truncated or damaged; upload it again")


def _zip64_sizes(
    extra: bytes, size: int, compressed: int, header_offset: int, name: str
) -> tuple[int, int, int]:
    """The sizes and offset with their ZIP64 values (extra field 0x0001), read the way zipfile reads them."""
    while len(extra) >= 4:
        kind, length = struct.unpack_from("<HH", extra)
        if length + 4 > len(extra):
            raise _corrupt(f"the archive entry {name!r} has a malformed extra field")
        if kind == _ZIP64_EXTRA:
            data = extra[4 : length + 4]
            try:
                if size in (0xFFFF_FFFF_FFFF_FFFF, _U32_MAX):
                    (size,) = struct.unpack_from("<Q", data)
                    data = data[8:]
                if compressed == _U32_MAX:
                    (compressed,) = struct.unpack_from("<Q", data)
                    data = data[8:]
                if header_offset == _U32_MAX:
                    (header_offset,) = struct.unpack_from("<Q", data)
            except struct.error:
                raise _corrupt(f"the archive entry {name!r} has a truncated ZIP64 extra field") from None
        extra = extra[length + 4 :]
    return size, compressed, header_offset


def _check_end_record(end: _EndRecord, limits: ArchiveLimits) -> None:
    if max(end.entries, end.entries_on_disk) > limits.max_entries:
        raise ArchiveRefused(
            "zip_too_many_entries",
            f"the archive has {max(end.entries, end.entries_on_disk)} entries; at most {limits.max_entries} "
            "are accepted: zip only the files the model or data set needs",
        )
    if end.disk != 0 or end.directory_disk != 0 or end.entries_on_disk != end.entries:
        raise _corrupt(
            f"the archive's end record is inconsistent (disk {end.disk}, directory on disk "
            f"{end.directory_disk}, {end.entries_on_disk} of {end.entries} entries on this disk)"
        )
    gap = end.directory_end - end.directory_size - end.directory_offset
    if gap < 0:
        raise _corrupt(
            f"the archive's end record puts a central directory of {end.directory_size} bytes at offset "
            f"{end.directory_offset}, past the end of the directory at {end.directory_end}"
        )
    if end.directory_size > limits.max_central_directory_bytes:
        raise ArchiveRefused(
            "zip_too_many_entries",
            f"the archive's central directory is {end.directory_size} bytes; at most "
            f"{limits.max_central_directory_bytes} are accepted: it lists too many entries or too long names",
        )
    if gap > 0:
        raise ArchiveRefused(
            "zip_corrupt",
            f"the archive has {gap} bytes its end record does not account for (a self-extracting or "
            f"concatenated file, or data written before the zip): upload a plain zip; {_LISTING_HINT}",
        )


def _check_entry(
    name: str, flags: int, method: int, size: int, compressed: int, limits: ArchiveLimits
) -> None:
    if _unsafe_path(name):
        raise ArchiveRefused(
            "zip_unsafe_path",
            f"the archive has an unsafe entry path {name!r}: entries must be relative paths without '..', "
            "drive letters or NUL bytes; zip the folder's contents from inside it",
        )
    if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
        raise ArchiveRefused(
            "zip_encrypted", f"the archive entry {name!r} is encrypted: zip it without a password"
        )
    if method == _STORED and compressed != size:
        raise _corrupt(
            f"the archive entry {name!r} is stored uncompressed but declares {compressed} bytes stored "
            f"for {size} bytes of content"
        )
    if size > limits.ratio_min_bytes and (compressed == 0 or size / compressed > limits.max_ratio):
        raise ArchiveRefused(
            "zip_bomb",
            f"the archive entry {name!r} expands more than {limits.max_ratio:g}x ({compressed} bytes to "
            f"{size}): model weights and data sets do not compress like that; this looks like a zip bomb",
        )


def _walk_directory(f: IO[bytes], end: _EndRecord, limits: ArchiveLimits) -> tuple[int, list[_Entry]]:
    """Walk the central directory like zipfile (by its size), checking each entry as it goes.

    Returns:
        The entry count and the `.safetensors` entries.
    """
    start = end.directory_offset
    reader = _DirectoryReader(f, start, end.directory_end)
    count = total = stored_bytes = 0
    safetensors: list[_Entry] = []
    consumed = 0
    while consumed < end.directory_size:
        fixed = reader.take(_CENTRAL.size)
        if fixed is None:
            raise _corrupt(f"the archive's central directory ends in the middle of entry {count + 1}")
        fields = _CENTRAL.unpack(fixed)
        signature, _, create_system, extract_version, _, flags, method = fields[:7]
        compressed, size, name_length, extra_length, comment_length = fields[10:15]
        external_attr, header_offset = fields[17:]
        if signature != _CENTRAL_SIGNATURE:
            raise _corrupt(f"the archive's central directory entry {count + 1} has no entry signature")
        count += 1
        if count > limits.max_entries:
            raise ArchiveRefused(
                "zip_too_many_entries",
                f"the archive lists more than {limits.max_entries} entries (its end record claims "
                f"{end.entries}); at most {limits.max_entries} are accepted: zip only the files needed",
            )
        variable = reader.take(name_length + extra_length + comment_length)
        if variable is None:
            raise _corrupt(f"the archive's central directory ends in the middle of entry {count}")
        consumed += _CENTRAL.size + len(variable)
        raw_name = variable[:name_length]
        try:
            name = raw_name.decode("utf-8" if flags & _FLAG_UTF8 else "cp437")
        except UnicodeDecodeError:
            raise _corrupt(f"the archive entry name {raw_name!r} is marked UTF-8 but is not") from None
        extra = variable[name_length : name_length + extra_length]
        size, compressed, header_offset = _zip64_sizes(extra, size, compressed, header_offset, name)
        if extract_version > _MAX_EXTRACT_VERSION:
            raise ArchiveRefused(
                "zip_corrupt",
                f"the archive entry {name!r} needs zip version {extract_version / 10:.1f} to extract, newer "
                f"than the readers here: {_LISTING_HINT}",
            )
        _check_entry(name, flags, method, size, compressed, limits)
        if stat.S_ISLNK(external_attr >> 16):
            raise ArchiveRefused(
                "zip_link_entry",
                f"the archive entry {name!r} is a symbolic link (made on system {create_system}): zip the "
                "files themselves, e.g. `zip -r` without --symlinks",
            )
        if header_offset + _LOCAL.size + compressed > start:
            raise _corrupt(
                f"the archive entry {name!r} declares {compressed} compressed bytes at offset "
                f"{header_offset}, past the {start} bytes that precede the central directory"
            )
        total += size
        stored_bytes += _LOCAL.size + compressed
        if name.lower().endswith(".safetensors"):
            safetensors.append(_Entry(name, method, compressed, size, header_offset))
    if count != end.entries:
        raise _corrupt(
            f"the archive's end record says {end.entries} entries but its central directory lists {count}"
        )
    if total > limits.max_total_uncompressed:
        raise ArchiveRefused(
            "zip_too_large",
            f"the archive expands to {total} bytes; at most {limits.max_total_uncompressed} are accepted: "
            "upload a smaller model or data set",
        )
    if stored_bytes > start:
        raise ArchiveRefused(
            "zip_bomb",
            f"the archive's entries overlap: they declare {stored_bytes} bytes of data in the {start} bytes "
            "before the central directory; this is how zip bombs are built",
        )
    return count, safetensors


class _Pull:
    """Takes exact byte counts from an iterator of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def read(self, n: int) -> bytes:
        """Up to n bytes: fewer only when the chunks run out."""
        parts = [self._buffer]
        have = len(self._buffer)
        while have < n:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        self._buffer = data[n:]
        return data[:n]


def _raw_chunks(f: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    position, end = start, start + length
    while position < end:
        data = _read_at(f, position, min(_CHUNK, end - position))
        if not data:
            return
        position += len(data)
        yield data


def _lzma_decompressor(properties: bytes) -> lzma.LZMADecompressor:
    # LZMA1 properties: one byte packing lc, lp and pb, then the dictionary size.
    (packed, dict_size) = struct.unpack_from("<BL", properties)
    lc, packed = packed % 9, packed // 9
    lp, pb = packed % 5, packed // 5
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)


def _inflated(raw: Iterator[bytes], method: int) -> Iterator[bytes]:
    """The entry's content, a chunk at a time: never more than one chunk is decompressed ahead."""
    if method == _STORED:
        yield from raw
        return
    if method == _DEFLATED:
        inflater = zlib.decompressobj(-15)
        for data in raw:
            while True:
                out = inflater.decompress(data, _CHUNK)
                data = inflater.unconsumed_tail
                if out:
                    yield out
                if inflater.eof or (not data and len(out) < _CHUNK):
                    break
            if inflater.eof:
                return
        return
    decompressor: bz2.BZ2Decompressor | lzma.LZMADecompressor
    if method == _BZIP2:
        decompressor = bz2.BZ2Decompressor()
    else:
        # zip's LZMA entries: 2 version bytes, 2 bytes of property size, the properties, then the raw stream.
        buffer = b""
        for data in raw:
            buffer += data
            if len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack_from("<H", buffer, 2)[0]:
                break
        properties_size = struct.unpack_from("<H", buffer, 2)[0] if len(buffer) >= 4 else 0
        if properties_size < 5 or len(buffer) < 4 + properties_size:
            raise lzma.LZMAError("truncated LZMA properties")
        decompressor = _lzma_decompressor(buffer[4 : 4 + properties_size])
        raw = itertools.chain([buffer[4 + properties_size :]], raw)
    for data in raw:
        while True:
            out = decompressor.decompress(data, _CHUNK)
            data = b""
            if out:
                yield out
            if decompressor.eof or decompressor.needs_input:
                break
        if decompressor.eof:
            return


def _check_header(pull: _Pull, size: int, where: str, limits: ArchiveLimits) -> None:
    """Check a safetensors header read from `pull`: `size` bytes in all, the 8-byte length first.

    Raises:
        ArchiveRefused: safetensors_header_too_large, invalid_safetensors.
    """
    fix = "save it again with safetensors' save_file (safetensors.torch.save_file)"
    head = pull.read(8)
    if len(head) < 8:
        raise ArchiveRefused(
            "invalid_safetensors",
            f"{where} is {size} bytes; a safetensors file starts with an 8-byte header length: {fix}",
        )
    (length,) = struct.unpack("<Q", head)
    if length > limits.max_safetensors_header_bytes:
        raise ArchiveRefused(
            "safetensors_header_too_large",
            f"{where} declares a header of {length} bytes; at most {limits.max_safetensors_header_bytes} "
            f"are accepted (the safetensors library's limit): the file is damaged or not safetensors; {fix}",
        )
    if length < 2 or length > size - 8:
        raise ArchiveRefused(
            "invalid_safetensors",
            f"{where} declares a header of {length} bytes but holds {size - 8} bytes after the length: "
            f"the file is truncated or not safetensors; upload the whole file, or {fix}",
        )
    not_json = f"{where} has a header that is not a JSON object; {fix}"
    if length <= _FULL_PARSE_MAX:
        raw = pull.read(length)
        if len(raw) < length:
            raise ArchiveRefused("invalid_safetensors", f"{where} ends inside its header; {fix}")
        if raw[:1] != b"{":
            raise ArchiveRefused("invalid_safetensors", not_json)
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ArchiveRefused(
                "invalid_safetensors", f"{where} has a header that is not UTF-8; {fix}"
            ) from None
        except (ValueError, RecursionError):
            raise ArchiveRefused("invalid_safetensors", not_json) from None
        if not isinstance(header, dict):
            raise ArchiveRefused("invalid_safetensors", not_json)
        return
    # Too large to parse here: UTF-8 and an object's braces, checked as it streams.
    decoder = codecs.getincrementaldecoder("utf-8")()
    remaining, last = length, ""
    try:
        while remaining:
            raw = pull.read(min(_CHUNK, remaining))
            if not raw:
                raise ArchiveRefused("invalid_safetensors", f"{where} ends inside its header; {fix}")
            if remaining == length and raw[:1] != b"{":
                raise ArchiveRefused("invalid_safetensors", not_json)
            remaining -= len(raw)
            last = decoder.decode(raw, final=not remaining).rstrip(_JSON_SPACE)[-1:] or last
    except UnicodeDecodeError:
        raise ArchiveRefused(
            "invalid_safetensors", f"{where} has a header that is not UTF-8; {fix}"
        ) from None
    if last != "}":
        raise ArchiveRefused("invalid_safetensors", not_json)


def _check_safetensors_entries(
    f: IO[bytes], entries: list[_Entry], directory_start: int, limits: ArchiveLimits
) -> None:
    for entry in entries:
        local = _read_at(f, entry.header_offset, _LOCAL.size)
        if len(local) < _LOCAL.size or local[:4] != _LOCAL_SIGNATURE:
            raise _corrupt(f"the archive entry {entry.name!r} has no local header where the directory says")
        name_length, extra_length = _LOCAL.unpack(local)[10:]
        data_start = entry.header_offset + _LOCAL.size + name_length + extra_length
        if data_start + entry.compressed > directory_start:
            raise _corrupt(f"the archive entry {entry.name!r} runs past the start of the central directory")
        if entry.method not in (_STORED, _DEFLATED, _BZIP2, _LZMA):
            continue  # no reader here (nor in zipfile) can extract it, so nothing will read it either
        chunks = _inflated(_raw_chunks(f, data_start, entry.compressed), entry.method)
        try:
            _check_header(_Pull(chunks), entry.size, f"the archive entry {entry.name!r}", limits)
        except ArchiveRefused:
            raise
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            raise _corrupt(f"the archive entry {entry.name!r} does not decompress ({exc})") from None


def check_zip_file(path: Source, limits: ArchiveLimits = _DEFAULT_LIMITS) -> int:
    """Refuse a zip that is too big, holds too many entries, is built like a bomb or is unsafe to extract.

    Reads only the archive's structures (end record, central directory in chunks, and the first bytes of
    each `.safetensors` entry), never building a list of entries: memory stays small whatever it claims.
    Data before the zip (a self-extracting or concatenated file) is refused, so that every reader finds the
    entries where this check found them.

    Args:
        path: the file, or a seekable binary file object (its position is kept).
        limits: the limits to apply.

    Returns:
        The number of entries.

    Raises:
        ArchiveRefused: zip_too_many_entries (the end record's count, the directory's own count or its size),
            zip_too_large (total uncompressed size), zip_bomb (an entry's ratio, overlapping entries),
            zip_unsafe_path, zip_link_entry, zip_encrypted, zip_corrupt (no end record, a truncated or
            inconsistent directory, an entry past the file's data), safetensors_header_too_large and
            invalid_safetensors (a `.safetensors` entry's header).
        OSError: the file cannot be read.
    """
    with _opened(path) as f:
        end = _find_end_record(f, _file_size(f))
        if end is None:
            raise _corrupt("the archive has no end-of-central-directory record (it is not a whole zip)")
        _check_end_record(end, limits)
        count, safetensors = _walk_directory(f, end, limits)
        _check_safetensors_entries(f, safetensors, end.directory_offset, limits)
        return count


def check_safetensors_file(path: Source, limits: ArchiveLimits = _DEFAULT_LIMITS) -> None:
    """Refuse a safetensors file whose header is too large, overruns the file or is not a JSON object.

    The header is read in chunks; headers larger than 16 MiB are checked for UTF-8 and an object's braces
    as they stream rather than parsed.

    Args:
        path: the file, or a seekable binary file object (its position is kept).
        limits: the limits to apply.

    Raises:
        ArchiveRefused: safetensors_header_too_large, invalid_safetensors.
        OSError: the file cannot be read.
    """
    with _opened(path) as f:
        size = _file_size(f)
        _check_header(_Pull(_raw_chunks(f, 0, size)), size, "the safetensors file", limits)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # The length must also fit the file: a JSON or JSON-lines file starting `{"abcd":{` would otherwise
    # read as a safetensors file with an absurd header length.
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack_from("<Q", head)
    return 2 <= length <= size - 8


def check_upload(
    path: str | os.PathLike[str], filename: str, limits: ArchiveLimits = _DEFAULT_LIMITS
) -> None:
    """Check an uploaded file on disk before anything else reads it: the one call the API makes.

    A zip (by content: an end record, or a local header at the start, so that a truncated zip is refused
    rather than passed on) gets check_zip_file, including the header of each `.safetensors` entry. Otherwise a
    safetensors file (named `*.safetensors`, or by content: an 8-byte length that fits the file, then `{`)
    gets check_safetensors_file. Anything else passes: the engine tells what it is.

    Args:
        path: the uploaded file.
        filename: the name the client gave it.
        limits: the limits to apply.

    Raises:
        ArchiveRefused: any code of check_zip_file and check_safetensors_file.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(9)
        size = _file_size(f)
        if head.startswith(_LOCAL_SIGNATURE) or is_zip(f):
            check_zip_file(f, limits)
        elif filename.lower().endswith(".safetensors") or _looks_like_safetensors(head, size):
            check_safetensors_file(f, limits)
