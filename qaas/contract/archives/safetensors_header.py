"""A safetensors header checked from its first bytes: the 8-byte length, then a JSON object that fits the file.

Headers up to _FULL_PARSE_MAX are parsed as JSON; larger ones (up to the safetensors limit) are checked as they
stream (UTF-8, an object's braces) so that a hostile 100 MB header costs no more than a chunk of memory.
"""

from __future__ import annotations

import codecs
import json
import struct

from qaas.contract.archives.refusal import ArchiveLimits, ArchiveRefused
from qaas.contract.archives.source import CHUNK
from qaas.contract.archives.streams import Pull

_FULL_PARSE_MAX = 16 * 1024**2
_JSON_SPACE = " \t\n\r"
_FIX = "save it again with safetensors' save_file (safetensors.torch.save_file)"


def check_header(pull: Pull, size: int, where: str, limits: ArchiveLimits) -> None:
    """Check a safetensors header read from `pull`: `size` bytes in all, the 8-byte length first.

    `where` names the file in messages ("the safetensors file", "the archive entry 'model.safetensors'").

    Raises:
        ArchiveRefused: safetensors_header_too_large, invalid_safetensors.
    """
    length = _header_length(pull, size, where, limits)
    if length <= _FULL_PARSE_MAX:
        _parse_header(pull, length, where)
    else:
        _stream_header(pull, length, where)


def _header_length(pull: Pull, size: int, where: str, limits: ArchiveLimits) -> int:
    """The declared header length, refused when it is over the limit or does not fit the file."""
    head = pull.read(8)
    if len(head) < 8:
        raise ArchiveRefused(
            "invalid_safetensors",
            f"{where} is {size} bytes; a safetensors file starts with an 8-byte header length: {_FIX}",
        )
    (length,) = struct.unpack("<Q", head)
    if length > limits.max_safetensors_header_bytes:
        raise ArchiveRefused(
            "safetensors_header_too_large",
            f"{where} declares a header of {length} bytes; at most {limits.max_safetensors_header_bytes} "
            f"are accepted (the safetensors library's limit): the file is damaged or not safetensors; {_FIX}",
        )
    if length < 2 or length > size - 8:
        raise ArchiveRefused(
            "invalid_safetensors",
            f"{where} declares a header of {length} bytes but holds {size - 8} bytes after the length: "
            f"the file is truncated or not safetensors; upload the whole file, or {_FIX}",
        )
    return length


def _parse_header(pull: Pull, length: int, where: str) -> None:
    """Read the whole header and parse it: it must be a JSON object."""
    raw = pull.read(length)
    if len(raw) < length:
        raise _ends_inside(where)
    if raw[:1] != b"{":
        raise _not_json(where)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _not_utf8(where) from None
    except (ValueError, RecursionError):
        raise _not_json(where) from None
    if not isinstance(header, dict):
        raise _not_json(where)


def _stream_header(pull: Pull, length: int, where: str) -> None:
    """Too large to parse here: UTF-8 and an object's braces, checked a chunk at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    remaining, last = length, ""
    try:
        while remaining:
            raw = pull.read(min(CHUNK, remaining))
            if not raw:
                raise _ends_inside(where)
            if remaining == length and raw[:1] != b"{":
                raise _not_json(where)
            remaining -= len(raw)
            last = decoder.decode(raw, final=not remaining).rstrip(_JSON_SPACE)[-1:] or last
    except UnicodeDecodeError:
        raise _not_utf8(where) from None
    if last != "}":
        raise _not_json(where)


def _ends_inside(where: str) -> ArchiveRefused:
    return ArchiveRefused("invalid_safetensors", f"{where} ends inside its header; {_FIX}")


def _not_json(where: str) -> ArchiveRefused:
    return ArchiveRefused("invalid_safetensors", f"{where} has a header that is not a JSON object; {_FIX}")


def _not_utf8(where: str) -> ArchiveRefused:
    return ArchiveRefused("invalid_safetensors", f"{where} has a header that is not UTF-8; {_FIX}")
