"""An entry's content, decompressed a chunk at a time, and exact byte counts taken from it: a check reads the
first bytes of a `.safetensors` entry without extracting it, and never holds more than a chunk ahead."""

from __future__ import annotations

import bz2
import itertools
import lzma
import struct
import zlib
from collections.abc import Iterator

from qaas.contract.archives.layout import BZIP2, DEFLATED, STORED
from qaas.contract.archives.source import CHUNK


class Pull:
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


def inflated(raw: Iterator[bytes], method: int) -> Iterator[bytes]:
    """The entry's content, a chunk at a time: never more than one chunk is decompressed ahead.

    `method` is stored, deflated, bzip2 or LZMA. Nothing is read before the first chunk is asked for; a
    damaged stream raises what its decompressor raises (zlib.error, OSError, EOFError, lzma.LZMAError).
    """
    if method == STORED:
        yield from raw
    elif method == DEFLATED:
        yield from _inflate(raw)
    elif method == BZIP2:
        yield from _decompress(raw, bz2.BZ2Decompressor())
    else:
        yield from _unlzma(raw)


def _inflate(raw: Iterator[bytes]) -> Iterator[bytes]:
    inflater = zlib.decompressobj(-15)
    for data in raw:
        while True:
            out = inflater.decompress(data, CHUNK)
            data = inflater.unconsumed_tail
            if out:
                yield out
            if inflater.eof or (not data and len(out) < CHUNK):
                break
        if inflater.eof:
            return


def _unlzma(raw: Iterator[bytes]) -> Iterator[bytes]:
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
    yield from _decompress(itertools.chain([buffer[4 + properties_size :]], raw), decompressor)


def _lzma_decompressor(properties: bytes) -> lzma.LZMADecompressor:
    # LZMA1 properties: one byte packing lc, lp and pb, then the dictionary size.
    (packed, dict_size) = struct.unpack_from("<BL", properties)
    lc, packed = packed % 9, packed // 9
    lp, pb = packed % 5, packed // 5
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)


def _decompress(
    raw: Iterator[bytes], decompressor: bz2.BZ2Decompressor | lzma.LZMADecompressor
) -> Iterator[bytes]:
    for data in raw:
        while True:
            out = decompressor.decompress(data, CHUNK)
            data = b""
            if out:
                yield out
            if decompressor.eof or decompressor.needs_input:
                break
        if decompressor.eof:
            return
