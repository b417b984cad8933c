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


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)
    handle: BinaryIO | None = None
    tmp_path: Path | None = None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0


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
    boundary = _boundary(content_type)
    _check_declared_length(content_length, max_bytes)
    form = _Form(boundary, max_bytes=max_bytes, allowed_fields=allowed_fields, storage=storage)
    try:
        await form.read(stream)
    except BaseException as exc:
        form.discard()  # a cancelled request (client gone, server stopping) leaves no temporary file either
        if isinstance(exc, (InvalidRequest, PayloadTooLarge)) or not isinstance(exc, Exception):
            raise
        raise InvalidRequest(
            f"the multipart body could not be parsed: {exc}", code="malformed_multipart"
        ) from exc
    return form.received()


def _boundary(content_type: str | None) -> bytes:
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMediaType(
            "send the upload as multipart/form-data with the file in a part named 'file' (curl -F file=@model.pt2)"
        )
    return params[b"boundary"]


def _check_declared_length(content_length: str | None, max_bytes: int) -> None:
    """Refuse a body whose Content-Length is already over the limit, before a byte of it is read."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise InvalidRequest(
            "the Content-Length header is not a number", code="invalid_content_length"
        ) from None
    if declared > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise _too_large(max_bytes)


class _Form:
    """One request's multipart body as the parser reports it: the parts seen so far, the file written to disk,
    the fields kept in memory, and the first refusal.

    The parser calls the `_on_*` methods. After the first refusal the rest of the chunk at hand is parsed, but
    nothing more is kept; `read` raises it once that chunk is done."""

    def __init__(
        self, boundary: bytes, *, max_bytes: int, allowed_fields: set[str], storage: Storage
    ) -> None:
        self.max_bytes = max_bytes
        self.allowed_fields = allowed_fields
        self.max_parts = len(allowed_fields | {"file"})
        self.storage = storage
        self.parts: list[_Part] = []
        self.result = ReceivedUpload()
        self.refusal: InvalidRequest | PayloadTooLarge | None = None
        self.form_bytes = 0
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
            },
        )

    async def read(self, stream: AsyncIterator[bytes]) -> None:
        """Feed the body to the parser, stopping at the first refusal."""
        async for chunk in stream:
            self.parser.write(chunk)
            if self.refusal is not None:
                raise self.refusal
        self.parser.finalize()
        if self.refusal is not None:
            raise self.refusal

    def received(self) -> ReceivedUpload:
        """The parsed upload, once the whole body is read: refused when it has no file or an empty one."""
        if self.result.file is None:
            self.discard()
            raise InvalidRequest(
                "the upload has no part named 'file': send it with -F file=@PATH", code="file_part_missing"
            )
        if self.result.file.size_bytes == 0:
            self.discard()
            raise InvalidRequest("the uploaded file is empty", code="empty_file")
        return self.result

    def discard(self) -> None:
        """Close and delete every temporary file this body was written to."""
        for part in self.parts:
            if part.handle is not None:
                part.handle.close()
            if part.tmp_path is not None:
                part.tmp_path.unlink(missing_ok=True)

    def _refuse(self, refusal: InvalidRequest | PayloadTooLarge) -> None:
        if self.refusal is None:  # the first one is the answer
            self.refusal = refusal

    def _count_form_bytes(self, size: int) -> bool:
        """Add to the in-memory bytes; False (and the refusal recorded) once past MAX_FORM_BYTES."""
        self.form_bytes += size
        if self.form_bytes > MAX_FORM_BYTES:
            self._refuse(_form_too_large(self.allowed_fields))
            return False
        return True

    def _on_part_begin(self) -> None:
        if self.refusal is not None:
            return
        if len(self.parts) == self.max_parts:
            self._refuse(_too_many_parts(self.max_parts, self.allowed_fields))
            return
        self.parts.append(_Part())

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        if self.refusal is None and self._count_form_bytes(end - start):
            self.header_field.extend(data[start:end])

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        if self.refusal is None and self._count_form_bytes(end - start):
            self.header_value.extend(data[start:end])

    def _on_header_end(self) -> None:
        if self.refusal is None:
            self.parts[-1].headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def _on_headers_finished(self) -> None:
        """The part's name is known: open its temporary file, or refuse a field that is unknown or repeated."""
        if self.refusal is not None:
            return
        part, earlier = self.parts[-1], self.parts[:-1]
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            part.filename = options[b"filename"].decode("utf-8", "replace")
        if part.name == "file":
            if any(other.name == "file" for other in earlier):
                self._refuse(InvalidRequest("send exactly one part named 'file'", code="multiple_files"))
                return
            part.tmp_path = self.storage.temp_path()
            part.handle = open(part.tmp_path, "wb")  # noqa: SIM115 (closed in _on_part_end or discard)
        elif part.name not in self.allowed_fields:
            allowed = ", ".join(sorted(self.allowed_fields | {"file"}))
            self._refuse(
                InvalidRequest(
                    f"unknown form field '{part.name}': allowed are {allowed}", code="unknown_field"
                )
            )
        elif any(other.name == part.name for other in earlier):
            self._refuse(
                InvalidRequest(
                    f"form field '{part.name}' is sent more than once: send each field at most once",
                    code="duplicate_field",
                )
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.refusal is not None:
            return
        part = self.parts[-1]
        chunk = data[start:end]
        if part.handle is not None:
            self._write_file(part, chunk)
        elif len(part.value) + len(chunk) > MAX_FIELD_BYTES:
            self._refuse(
                InvalidRequest(
                    f"form field '{part.name}' is over {MAX_FIELD_BYTES} bytes", code="field_too_large"
                )
            )
        elif self._count_form_bytes(len(chunk)):
            part.value.extend(chunk)

    def _write_file(self, part: _Part, chunk: bytes) -> None:
        """Hash and write a chunk of the file, refused once past the upload limit."""
        assert part.handle is not None
        part.size += len(chunk)
        if part.size > self.max_bytes:
            self._refuse(_too_large(self.max_bytes))
            return
        part.digest.update(chunk)
        part.handle.write(chunk)

    def _on_part_end(self) -> None:
        if self.refusal is not None:
            return
        part = self.parts[-1]
        if part.handle is not None:
            assert part.tmp_path is not None
            part.handle.close()
            part.handle = None
            self.result.file = ReceivedFile(
                tmp_path=part.tmp_path,
                filename=(part.filename or "upload")[:200],
                size_bytes=part.size,
                sha256=part.digest.hexdigest(),
            )
        elif part.name:
            self.result.fields[part.name] = part.value.decode("utf-8", "replace")


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
