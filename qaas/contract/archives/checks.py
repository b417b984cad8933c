"""The checks callers make: is_zip, check_zip_file, check_safetensors_file, and check_upload, which picks."""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from typing import IO

from qaas.contract.archives.directory import Entry, walk_directory
from qaas.contract.archives.end_record import check_end_record, find_end_record
from qaas.contract.archives.layout import (
    BZIP2,
    CENTRAL_SIGNATURE,
    DEFLATED,
    LOCAL,
    LOCAL_SIGNATURE,
    LZMA,
    STORED,
)
from qaas.contract.archives.refusal import DEFAULT_LIMITS, ArchiveLimits, ArchiveRefused, corrupt
from qaas.contract.archives.safetensors_header import check_header
from qaas.contract.archives.source import Source, file_size, opened, raw_chunks, read_at
from qaas.contract.archives.streams import Pull, inflated


def is_zip(path: Source) -> bool:
    """Whether the file is a zip archive, by content: an end-of-central-directory record that zipfile would
    take, and the central directory where that record puts it. The name plays no part.

    Args:
        path: the file, or a seekable binary file object (its position is kept).

    Returns:
        True when `zipfile.ZipFile` would open it; False otherwise, and when it cannot be read.
    """
    try:
        with opened(path) as f:
            try:
                end = find_end_record(f, file_size(f))
            except ArchiveRefused:
                return False  # a multi-disk archive: zipfile refuses to open it too
            if end is None:
                return False
            start = end.directory_end - end.directory_size  # where zipfile reads the directory
            if start < 0:
                return False
            return end.directory_size == 0 or read_at(f, start, 4) == CENTRAL_SIGNATURE
    except OSError:
        return False


def check_zip_file(path: Source, limits: ArchiveLimits = DEFAULT_LIMITS) -> int:
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
    with opened(path) as f:
        end = find_end_record(f, file_size(f))
        if end is None:
            raise corrupt("the archive has no end-of-central-directory record (it is not a whole zip)")
        check_end_record(end, limits)
        count, safetensors = walk_directory(f, end, limits)
        _check_safetensors_entries(f, safetensors, end.directory_offset, limits)
        return count


def _check_safetensors_entries(
    f: IO[bytes], entries: list[Entry], directory_start: int, limits: ArchiveLimits
) -> None:
    """Check each `.safetensors` entry's header from its first bytes, decompressed as they are read."""
    for entry in entries:
        local = read_at(f, entry.header_offset, LOCAL.size)
        if len(local) < LOCAL.size or local[:4] != LOCAL_SIGNATURE:
            raise corrupt(f"the archive entry {entry.name!r} has no local header where the directory says")
        name_length, extra_length = LOCAL.unpack(local)[10:]
        data_start = entry.header_offset + LOCAL.size + name_length + extra_length
        if data_start + entry.compressed > directory_start:
            raise corrupt(f"the archive entry {entry.name!r} runs past the start of the central directory")
        if entry.method not in (STORED, DEFLATED, BZIP2, LZMA):
            continue  # no reader here (nor in zipfile) can extract it, so nothing will read it either
        chunks = inflated(raw_chunks(f, data_start, entry.compressed), entry.method)
        try:
            check_header(Pull(chunks), entry.size, f"the archive entry {entry.name!r}", limits)
        except ArchiveRefused:
            raise
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            raise corrupt(f"the archive entry {entry.name!r} does not decompress ({exc})") from None


def check_safetensors_file(path: Source, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
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
    with opened(path) as f:
        size = file_size(f)
        check_header(Pull(raw_chunks(f, 0, size)), size, "the safetensors file", limits)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # The length must also fit the file: a JSON or JSON-lines file starting `{"abcd":{` would otherwise
    # read as a safetensors file with an absurd header length.
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack_from("<Q", head)
    return 2 <= length <= size - 8


def check_upload(path: str | os.PathLike[str], filename: str, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
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
        size = file_size(f)
        if head.startswith(LOCAL_SIGNATURE) or is_zip(f):
            check_zip_file(f, limits)
        elif filename.lower().endswith(".safetensors") or _looks_like_safetensors(head, size):
            check_safetensors_file(f, limits)
