"""The end-of-central-directory record: found where zipfile finds it, and checked before anything else."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import IO

from qaas.contract.archives.layout import (
    EOCD,
    EOCD_SIGNATURE,
    MAX_COMMENT,
    ZIP64_EOCD,
    ZIP64_EOCD_SIGNATURE,
    ZIP64_LOCATOR,
    ZIP64_LOCATOR_SIGNATURE,
)
from qaas.contract.archives.refusal import LISTING_HINT, ArchiveLimits, ArchiveRefused, corrupt
from qaas.contract.archives.source import read_at


@dataclass(frozen=True)
class EndRecord:
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


def find_end_record(f: IO[bytes], size: int) -> EndRecord | None:
    """The end record exactly where zipfile finds it (so both see one archive), or None when there is none.

    Raises:
        ArchiveRefused: zip_corrupt when the ZIP64 locator says the archive spans several disks.
    """
    if size < EOCD.size:
        return None
    tail_start = max(size - MAX_COMMENT - EOCD.size, 0)
    tail = read_at(f, tail_start, size - tail_start)
    last = tail[-EOCD.size :]
    if last[:4] == EOCD_SIGNATURE and last[-2:] == b"\x00\x00":
        start = len(tail) - EOCD.size
    else:
        start = tail.rfind(EOCD_SIGNATURE)
        if start < 0 or len(tail) - start < EOCD.size:
            return None
    _, disk, directory_disk, on_disk, entries, directory_size, offset, _ = EOCD.unpack_from(tail, start)
    position = tail_start + start
    record = EndRecord(
        position, position, disk, directory_disk, on_disk, entries, directory_size, offset, zip64=False
    )
    return _with_zip64_record(f, record)


def _with_zip64_record(f: IO[bytes], record: EndRecord) -> EndRecord:
    """The record with the ZIP64 record's values when a locator right before it points at one."""
    position = record.position
    if position < ZIP64_LOCATOR.size:
        return record
    locator = read_at(f, position - ZIP64_LOCATOR.size, ZIP64_LOCATOR.size)
    signature, locator_disk, _, disks = ZIP64_LOCATOR.unpack(locator)
    if signature != ZIP64_LOCATOR_SIGNATURE:
        return record
    if locator_disk != 0 or disks > 1:
        raise ArchiveRefused(
            "zip_corrupt", f"the archive spans {disks} disks; upload a single-file zip ({LISTING_HINT})"
        )
    zip64_at = position - ZIP64_LOCATOR.size - ZIP64_EOCD.size
    if zip64_at < 0:
        return record
    (signature, _, _, _, disk, directory_disk, on_disk, entries, directory_size, offset) = ZIP64_EOCD.unpack(
        read_at(f, zip64_at, ZIP64_EOCD.size)
    )
    if signature != ZIP64_EOCD_SIGNATURE:
        return record
    return replace(
        record,
        directory_end=zip64_at,
        disk=disk,
        directory_disk=directory_disk,
        entries_on_disk=on_disk,
        entries=entries,
        directory_size=directory_size,
        directory_offset=offset,
        zip64=True,
    )


def check_end_record(end: EndRecord, limits: ArchiveLimits) -> None:
    """Refuse an archive by its end record alone: too many entries, a directory too large or misplaced.

    Raises:
        ArchiveRefused: zip_too_many_entries, zip_corrupt.
    """
    if max(end.entries, end.entries_on_disk) > limits.max_entries:
        raise ArchiveRefused(
            "zip_too_many_entries",
            f"the archive has {max(end.entries, end.entries_on_disk)} entries; at most {limits.max_entries} "
            "are accepted: zip only the files the model or data set needs",
        )
    if end.disk != 0 or end.directory_disk != 0 or end.entries_on_disk != end.entries:
        raise corrupt(
            f"the archive's end record is inconsistent (disk {end.disk}, directory on disk "
            f"{end.directory_disk}, {end.entries_on_disk} of {end.entries} entries on this disk)"
        )
    gap = end.directory_end - end.directory_size - end.directory_offset
    if gap < 0:
        raise corrupt(
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
            f"concatenated file, or data written before the zip): upload a plain zip; {LISTING_HINT}",
        )
