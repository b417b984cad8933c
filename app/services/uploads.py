"""Streaming multipart uploads: size-checked before reading, written to disk in chunks, hashed while
streaming, stopped at the byte limit with nothing left behind.

Starlette's `UploadFile` reads the whole body before any dependency runs, so upload routes hand
`request.stream()` to `receive_upload` instead. Form fields are kept in memory, so their number and size are
bounded while streaming: one part per allowed name (a repeated field or a second file is refused), each field
under MAX_FIELD_BYTES, and all part headers and field values together under MAX_FORM_BYTES (3,000 fields of
60 kB once doubled the API's memory and were accepted).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from app.core.storage import Storage

MAX_FIELD_BYTES = 64 * 1024
# Every part's headers and the form fields' values: the routes take two or three small fields beside the file.
MAX_FORM_BYTES = 256 * 1024
# What a valid body may hold beside the file's bytes: the form, plus boundaries and line breaks (a few hundred).
MULTIPART_OVERHEAD_BYTES = MAX_FORM_BYTES + 64 * 1024


@dataclass
class ReceivedFile:
    tmp_path: Path
    filename: str
    size_bytes: int
    sha256: str


@dataclass
class ReceivedUpload:
    fields: dict[str, str] = field(default_factory=dict)
    file: ReceivedFile | None = None


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.filename: str | None = None
        self.value = bytearray()
        self.handle: BinaryIO | None = None
        self.tmp_path: Path | None = None
        self.digest = hashlib.sha256()
        self.size = 0


async def receive_upload(
    stream: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    max_bytes: int,
    allowed_fields: set[str],
    storage: Storage,
) -> ReceivedUpload:
    """Parse a multipart body with one `file` part. The caller owns `result.file.tmp_path` on success."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMediaType(
            "send the upload as multipart/form-data with the file in a part named 'file' (curl -F file=@model.pt2)"
        )
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidRequest(
                "the Content-Length header is not a number", code="invalid_content_length"
            ) from None
        if declared > max_bytes + MULTIPART_OVERHEAD_BYTES:
            raise _too_large(max_bytes)

    result = ReceivedUpload()
    parts: list[_Part] = []
    header_field = bytearray()
    header_value = bytearray()
    errors: list[Exception] = []
    max_parts = len(allowed_fields | {"file"})
    form_bytes = 0

    def count_form_bytes(size: int) -> bool:
        """Add to the in-memory bytes; False (and the error recorded) once past MAX_FORM_BYTES."""
        nonlocal form_bytes
        form_bytes += size
        if form_bytes > MAX_FORM_BYTES:
            errors.append(_form_too_large(allowed_fields))
            return False
        return True

    # After the first error the rest of the chunk at hand is parsed, but nothing more is kept.
    def on_part_begin() -> None:
        if errors:
            return
        if len(parts) == max_parts:
            errors.append(_too_many_parts(max_parts, allowed_fields))
            return
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        if not errors and count_form_bytes(end - start):
            header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        if not errors and count_form_bytes(end - start):
            header_value.extend(data[start:end])

    def on_header_end() -> None:
        if not errors:
            parts[-1].headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        if errors:
            return
        part = parts[-1]
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            part.filename = options[b"filename"].decode("utf-8", "replace")
        if part.name == "file":
            if any(earlier.name == "file" for earlier in parts[:-1]):
                errors.append(InvalidRequest("send exactly one part named 'file'", code="multiple_files"))
                return
            part.tmp_path = storage.temp_path()
            part.handle = open(part.tmp_path, "wb")  # noqa: SIM115 (closed in on_part_end or cleanup)
        elif part.name not in allowed_fields:
            allowed = ", ".join(sorted(allowed_fields | {"file"}))
            errors.append(
                InvalidRequest(
                    f"unknown form field '{part.name}': allowed are {allowed}", code="unknown_field"
                )
            )
        elif any(earlier.name == part.name for earlier in parts[:-1]):
            errors.append(
                InvalidRequest(
                    f"form field '{part.name}' is sent more than once: send each field at most once",
                    code="duplicate_field",
                )
            )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if errors:
            return
        part = parts[-1]
        chunk = data[start:end]
        if part.handle is not None:
            part.size += len(chunk)
            if part.size > max_bytes:
                errors.append(_too_large(max_bytes))
                return
            part.digest.update(chunk)
            part.handle.write(chunk)
            return
        if len(part.value) + len(chunk) > MAX_FIELD_BYTES:
            errors.append(
                InvalidRequest(
                    f"form field '{part.name}' is over {MAX_FIELD_BYTES} bytes", code="field_too_large"
                )
            )
            return
        if count_form_bytes(len(chunk)):
            part.value.extend(chunk)

    def on_part_end() -> None:
        if errors:
            return
        part = parts[-1]
        if part.handle is not None:
            part.handle.close()
            part.handle = None
            result.file = ReceivedFile(
                tmp_path=part.tmp_path,  # type: ignore[arg-type]
                filename=(part.filename or "upload")[:200],
                size_bytes=part.size,
                sha256=part.digest.hexdigest(),
            )
        elif part.name:
            result.fields[part.name] = part.value.decode("utf-8", "replace")

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )

    def cleanup() -> None:
        for part in parts:
            if part.handle is not None:
                part.handle.close()
            if part.tmp_path is not None:
                part.tmp_path.unlink(missing_ok=True)

    try:
        async for chunk in stream:
            parser.write(chunk)
            if errors:
                raise errors[0]
        parser.finalize()
        if errors:
            raise errors[0]
    except BaseException as exc:
        cleanup()  # a cancelled request (client gone, server stopping) leaves no temporary file either
        if isinstance(exc, (InvalidRequest, PayloadTooLarge)) or not isinstance(exc, Exception):
            raise
        raise InvalidRequest(
            f"the multipart body could not be parsed: {exc}", code="malformed_multipart"
        ) from exc
    if result.file is None:
        cleanup()
        raise InvalidRequest(
            "the upload has no part named 'file': send it with -F file=@PATH", code="file_missing"
        )
    if result.file.size_bytes == 0:
        cleanup()
        raise InvalidRequest("the uploaded file is empty", code="empty_file")
    return result


def _form_fields(allowed_fields: set[str]) -> str:
    return ", ".join(sorted(allowed_fields)) or "none"


def _too_many_parts(max_parts: int, allowed_fields: set[str]) -> InvalidRequest:
    return InvalidRequest(
        f"the upload has more than {max_parts} parts: send one part named 'file' and at most one "
        f"of each form field ({_form_fields(allowed_fields)})",
        code="too_many_parts",
    )


def _form_too_large(allowed_fields: set[str]) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the upload's part headers and form fields are over {MAX_FORM_BYTES} bytes together: send the file "
        f"with short headers and at most one of each form field ({_form_fields(allowed_fields)}), each under "
        f"{MAX_FIELD_BYTES} bytes",
        code="form_too_large",
    )


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the upload is larger than the limit of {max_bytes} bytes (QAAS_MAX_UPLOAD_BYTES): send a smaller file "
        "or ask the operator to raise the limit",
        code="upload_too_large",
    )
