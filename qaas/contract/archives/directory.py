"""The central directory, walked like zipfile walks it (by its size) a chunk at a time, each entry checked as it
is read and dropped, so that memory stays small whatever the directory claims."""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from qaas.contract.archives.end_record import EndRecord
from qaas.contract.archives.layout import (
    CENTRAL,
    CENTRAL_SIGNATURE,
    FLAG_ENCRYPTED,
    FLAG_STRONG_ENCRYPTION,
    FLAG_UTF8,
    LOCAL,
    MAX_EXTRACT_VERSION,
    STORED,
    U32_MAX,
    U64_MAX,
    ZIP64_EXTRA,
)
from qaas.contract.archives.refusal import LISTING_HINT, ArchiveLimits, ArchiveRefused, corrupt
from qaas.contract.archives.source import CHUNK, read_at


@dataclass(frozen=True)
class Entry:
    """What the central directory says about one entry (only kept for `.safetensors` entries)."""

    name: str
    method: int
    compressed: int
    size: int
    header_offset: int


@dataclass(frozen=True, slots=True)
class _Listing:
    """One central directory entry as read: its fields, the name decoded, the sizes with their ZIP64 values."""

    name: str
    create_system: int
    extract_version: int
    flags: int
    method: int
    compressed: int
    size: int
    external_attr: int
    header_offset: int
    length: int  # the bytes it takes in the directory


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
            want = min(max(n - available, CHUNK), self._end - self._next)
            more = read_at(self._f, self._next, want) if want > 0 else b""
            self._next += len(more)
            self._buffer = self._buffer[self._at :] + more
            self._at = 0
            if len(self._buffer) < n:
                return None
        out = self._buffer[self._at : self._at + n]
        self._at += n
        return out


def walk_directory(f: IO[bytes], end: EndRecord, limits: ArchiveLimits) -> tuple[int, list[Entry]]:
    """Walk the central directory like zipfile (by its size), checking each entry as it goes.

    Returns:
        The entry count and the `.safetensors` entries.

    Raises:
        ArchiveRefused: any zip code but zip_corrupt's multi-disk case (the end record's).
    """
    start = end.directory_offset
    reader = _DirectoryReader(f, start, end.directory_end)
    count = total = stored_bytes = consumed = 0
    safetensors: list[Entry] = []
    while consumed < end.directory_size:
        listing = _read_listing(reader, count + 1, end, limits)
        count += 1
        consumed += listing.length
        _check_listing(listing, start, limits)
        total += listing.size
        stored_bytes += LOCAL.size + listing.compressed
        if listing.name.lower().endswith(".safetensors"):
            safetensors.append(
                Entry(listing.name, listing.method, listing.compressed, listing.size, listing.header_offset)
            )
    _check_totals(end, start, count, total, stored_bytes, limits)
    return count, safetensors


def _read_listing(reader: _DirectoryReader, number: int, end: EndRecord, limits: ArchiveLimits) -> _Listing:
    """The directory's next entry, entry `number`; the count is checked before its variable part is read."""
    fixed = reader.take(CENTRAL.size)
    if fixed is None:
        raise corrupt(f"the archive's central directory ends in the middle of entry {number}")
    fields = CENTRAL.unpack(fixed)
    signature, _, create_system, extract_version, _, flags, method = fields[:7]
    compressed, size, name_length, extra_length, comment_length = fields[10:15]
    external_attr, header_offset = fields[17:]
    if signature != CENTRAL_SIGNATURE:
        raise corrupt(f"the archive's central directory entry {number} has no entry signature")
    if number > limits.max_entries:
        raise ArchiveRefused(
            "zip_too_many_entries",
            f"the archive lists more than {limits.max_entries} entries (its end record claims "
            f"{end.entries}); at most {limits.max_entries} are accepted: zip only the files needed",
        )
    variable = reader.take(name_length + extra_length + comment_length)
    if variable is None:
        raise corrupt(f"the archive's central directory ends in the middle of entry {number}")
    name = _decode_name(variable[:name_length], flags)
    extra = variable[name_length : name_length + extra_length]
    size, compressed, header_offset = _zip64_sizes(extra, size, compressed, header_offset, name)
    return _Listing(
        name,
        create_system,
        extract_version,
        flags,
        method,
        compressed,
        size,
        external_attr,
        header_offset,
        length=CENTRAL.size + len(variable),
    )


def _decode_name(raw_name: bytes, flags: int) -> str:
    try:
        return raw_name.decode("utf-8" if flags & FLAG_UTF8 else "cp437")
    except UnicodeDecodeError:
        raise corrupt(f"the archive entry name {raw_name!r} is marked UTF-8 but is not") from None


def _zip64_sizes(
    extra: bytes, size: int, compressed: int, header_offset: int, name: str
) -> tuple[int, int, int]:
    """The sizes and offset with their ZIP64 values (extra field 0x0001), read the way zipfile reads them."""
    while len(extra) >= 4:
        kind, length = struct.unpack_from("<HH", extra)
        if length + 4 > len(extra):
            raise corrupt(f"the archive entry {name!r} has a malformed extra field")
        if kind == ZIP64_EXTRA:
            data = extra[4 : length + 4]
            try:
                if size in (U64_MAX, U32_MAX):
                    (size,) = struct.unpack_from("<Q", data)
                    data = data[8:]
                if compressed == U32_MAX:
                    (compressed,) = struct.unpack_from("<Q", data)
                    data = data[8:]
                if header_offset == U32_MAX:
                    (header_offset,) = struct.unpack_from("<Q", data)
            except struct.error:
                raise corrupt(f"the archive entry {name!r} has a truncated ZIP64 extra field") from None
        extra = extra[length + 4 :]
    return size, compressed, header_offset


def _check_listing(listing: _Listing, directory_start: int, limits: ArchiveLimits) -> None:
    """Refuse an entry zipfile cannot extract, or one unsafe, encrypted, a bomb, a link or past the data."""
    name = listing.name
    if listing.extract_version > MAX_EXTRACT_VERSION:
        raise ArchiveRefused(
            "zip_corrupt",
            f"the archive entry {name!r} needs zip version {listing.extract_version / 10:.1f} to extract, "
            f"newer than the readers here: {LISTING_HINT}",
        )
    _check_content(listing, limits)
    if stat.S_ISLNK(listing.external_attr >> 16):
        raise ArchiveRefused(
            "zip_link_entry",
            f"the archive entry {name!r} is a symbolic link (made on system {listing.create_system}): zip the "
            "files themselves, e.g. `zip -r` without --symlinks",
        )
    if listing.header_offset + LOCAL.size + listing.compressed > directory_start:
        raise corrupt(
            f"the archive entry {name!r} declares {listing.compressed} compressed bytes at offset "
            f"{listing.header_offset}, past the {directory_start} bytes that precede the central directory"
        )


def _unsafe_path(name: str) -> bool:
    """Absolute (/ or \\), a drive letter, a NUL byte or a `..` component: a path that could escape on extraction."""
    if "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in PurePosixPath(name.replace("\\", "/")).parts


def _check_content(listing: _Listing, limits: ArchiveLimits) -> None:
    """Refuse an entry by its path, its encryption and its sizes."""
    name, size, compressed = listing.name, listing.size, listing.compressed
    if _unsafe_path(name):
        raise ArchiveRefused(
            "zip_unsafe_path",
            f"the archive has an unsafe entry path {name!r}: entries must be relative paths without '..', "
            "drive letters or NUL bytes; zip the folder's contents from inside it",
        )
    if listing.flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION):
        raise ArchiveRefused(
            "zip_encrypted", f"the archive entry {name!r} is encrypted: zip it without a password"
        )
    if listing.method == STORED and compressed != size:
        raise corrupt(
            f"the archive entry {name!r} is stored uncompressed but declares {compressed} bytes stored "
            f"for {size} bytes of content"
        )
    if size > limits.ratio_min_bytes and (compressed == 0 or size / compressed > limits.max_ratio):
        raise ArchiveRefused(
            "zip_bomb",
            f"the archive entry {name!r} expands more than {limits.max_ratio:g}x ({compressed} bytes to "
            f"{size}): model weights and data sets do not compress like that; this looks like a zip bomb",
        )


def _check_totals(
    end: EndRecord, directory_start: int, count: int, total: int, stored_bytes: int, limits: ArchiveLimits
) -> None:
    """Refuse a directory by its sums: a count unlike the end record's, too large once expanded, overlapping."""
    if count != end.entries:
        raise corrupt(
            f"the archive's end record says {end.entries} entries but its central directory lists {count}"
        )
    if total > limits.max_total_uncompressed:
        raise ArchiveRefused(
            "zip_too_large",
            f"the archive expands to {total} bytes; at most {limits.max_total_uncompressed} are accepted: "
            "upload a smaller model or data set",
        )
    if stored_bytes > directory_start:
        raise ArchiveRefused(
            "zip_bomb",
            f"the archive's entries overlap: they declare {stored_bytes} bytes of data in the {directory_start} "
            "bytes before the central directory; this is how zip bombs are built",
        )
