"""Reading an upload: a path or a seekable binary file object, at given offsets, a chunk at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

Source = str | os.PathLike[str] | IO[bytes]

# The most any check reads (or decompresses) at once.
CHUNK = 256 * 1024


@contextmanager
def opened(source: Source) -> Iterator[IO[bytes]]:
    """The source opened for reading: a path is opened and closed, a file object's position is kept."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield f
        return
    position = source.tell()
    try:
        yield source
    finally:
        source.seek(position)


def file_size(f: IO[bytes]) -> int:
    return f.seek(0, os.SEEK_END)


def read_at(f: IO[bytes], offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def raw_chunks(f: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    """The `length` bytes from `start`, a chunk at a time (fewer when the file ends first)."""
    position, end = start, start + length
    while position < end:
        data = read_at(f, position, min(CHUNK, end - position))
        if not data:
            return
        position += len(data)
        yield data
