"""Every error code qaas gives out, defined once: its HTTP status and what it means.

A code is one of three kinds, and some codes are two at once:

- an API answer: the `error` of the JSON body `{"error": "<code>", "detail": "<what to fix>"}`, sent with
  one of the entry's HTTP statuses (`http`);
- a job code (`job`): the `error.code` of a failed job, or of an upload whose inspection failed, written by
  the worker or by the sandboxed runner. It is no HTTP status: the API answers 200 with the failed job;
- a client code (`client`): raised by `qaas.client` itself as `QaasError.code`, with no answer behind it.

An HTTP error that has no code of its own (a status qaas never answers on purpose) comes as `http_<status>`,
and the client names an answer that is not this JSON the same way.

Pure Python, so that every layer may import it. The table is rendered into docs/errors.md:

    python -m qaas.contract.errors > docs/errors.md
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "CATALOGUE",
    "JOB_CODES",
    "ErrorCode",
    "ErrorEntry",
    "Kind",
    "api_codes",
    "codes_with_status",
    "http_status",
    "render_markdown",
]


class Kind(StrEnum):
    API = "api"
    JOB = "job"
    CLIENT = "client"


class ErrorCode(StrEnum):
    # Generic answers: a class of app.core.errors without a code of its own, and Starlette's own errors.
    BAD_REQUEST = "bad_request"
    VALIDATION_ERROR = "validation_error"
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    CONFLICT = "conflict"
    GONE = "gone"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    TOO_MANY_REQUESTS = "too_many_requests"
    INTERNAL_ERROR = "internal_error"
    DEPENDENCY_UNAVAILABLE = "dependency_unavailable"
    # Who is calling, and how often
    UNAUTHENTICATED = "unauthenticated"
    INVALID_API_KEY = "invalid_api_key"
    TOO_MANY_FAILED_ATTEMPTS = "too_many_failed_attempts"
    RATE_LIMITED = "rate_limited"
    JOB_QUOTA_EXCEEDED = "job_quota_exceeded"
    STORAGE_QUOTA_EXCEEDED = "storage_quota_exceeded"
    INSPECTION_QUOTA_EXCEEDED = "inspection_quota_exceeded"
    INVALID_TENANT_NAME = "invalid_tenant_name"
    KEY_NOT_FOUND = "key_not_found"
    # Objects
    JOB_NOT_FOUND = "job_not_found"
    MODEL_NOT_FOUND = "model_not_found"
    DATASET_NOT_FOUND = "dataset_not_found"
    ARTIFACT_NOT_FOUND = "artifact_not_found"
    REPORT_NOT_FOUND = "report_not_found"
    INVALID_CURSOR = "invalid_cursor"
    MODEL_NOT_READY = "model_not_ready"
    DATASET_NOT_READY = "dataset_not_ready"
    MODEL_EXPIRED = "model_expired"
    DATASET_EXPIRED = "dataset_expired"
    ARTIFACT_EXPIRED = "artifact_expired"
    MODEL_IN_USE = "model_in_use"
    DATASET_IN_USE = "dataset_in_use"
    JOB_FINISHED = "job_finished"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    FILE_MISSING = "file_missing"
    MALFORMED_RANGE = "malformed_range"
    # Uploads: the multipart form
    INVALID_CONTENT_LENGTH = "invalid_content_length"
    MALFORMED_MULTIPART = "malformed_multipart"
    FILE_PART_MISSING = "file_part_missing"
    MULTIPLE_FILES = "multiple_files"
    EMPTY_FILE = "empty_file"
    UNKNOWN_FIELD = "unknown_field"
    DUPLICATE_FIELD = "duplicate_field"
    FIELD_TOO_LARGE = "field_too_large"
    TOO_MANY_PARTS = "too_many_parts"
    FORM_TOO_LARGE = "form_too_large"
    UPLOAD_TOO_LARGE = "upload_too_large"
    INVALID_PREPROCESS = "invalid_preprocess"
    # Uploads: the file's own checks (qaas.contract.archives)
    ZIP_TOO_MANY_ENTRIES = "zip_too_many_entries"
    ZIP_TOO_LARGE = "zip_too_large"
    ZIP_BOMB = "zip_bomb"
    ZIP_UNSAFE_PATH = "zip_unsafe_path"
    ZIP_LINK_ENTRY = "zip_link_entry"
    ZIP_ENCRYPTED = "zip_encrypted"
    ZIP_CORRUPT = "zip_corrupt"
    SAFETENSORS_HEADER_TOO_LARGE = "safetensors_header_too_large"
    INVALID_SAFETENSORS = "invalid_safetensors"
    # The job request, checked by the API and again by the engine
    UNSUPPORTED_COMBINATION = "unsupported_combination"
    DATASET_REQUIRED = "dataset_required"
    DATASET_MISMATCH = "dataset_mismatch"
    LABELS_REQUIRED = "labels_required"
    INVALID_INPUT_SHAPES = "invalid_input_shapes"
    # The engine (workers.engine.errors.EngineError)
    NOT_A_MODEL = "not_a_model"
    PICKLE_NOT_ALLOWED = "pickle_not_allowed"
    NATIVE_CODE_NOT_ALLOWED = "native_code_not_allowed"
    UNSUPPORTED_FORMAT = "unsupported_format"
    INPUT_SHAPES_REQUIRED = "input_shapes_required"
    INVALID_DATASET = "invalid_dataset"
    INVALID_CONFIG = "invalid_config"
    MODEL_LOAD_FAILED = "model_load_failed"
    NOTHING_QUANTIZED = "nothing_quantized"
    VERIFICATION_FAILED = "verification_failed"
    # The runner's limits, the supervisor, the worker and the reaper
    TIME_LIMIT = "time_limit"
    MEMORY_LIMIT = "memory_limit"
    FILE_SIZE_LIMIT = "file_size_limit"
    RUNNER_CRASHED = "runner_crashed"
    INVALID_RUNNER_OUTPUT = "invalid_runner_output"
    WORKER_LOST = "worker_lost"
    # The client (qaas.client.QaasError)
    CONNECTION_FAILED = "connection_failed"
    WAIT_TIMEOUT = "wait_timeout"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    UNSAFE_ARTIFACT_NAME = "unsafe_artifact_name"


@dataclass(frozen=True)
class ErrorEntry:
    """One code: `http` the statuses the API answers it with (none: never an API answer), `job` whether a
    failed job or upload carries it, `client` whether qaas.client raises it; `meaning` one line, what it
    means and what to do."""

    code: ErrorCode
    meaning: str
    http: tuple[int, ...] = ()
    job: bool = False
    client: bool = False

    def __post_init__(self) -> None:
        if not (self.http or self.job or self.client):
            raise ValueError(f"{self.code}: give its HTTP status, or job=True, or client=True")
        if any(not 400 <= status <= 599 for status in self.http) or list(self.http) != sorted(set(self.http)):
            raise ValueError(f"{self.code}: http lists error statuses (400-599), ascending, e.g. (409, 410)")
        if not self.meaning or "\n" in self.meaning or "|" in self.meaning:
            raise ValueError(f"{self.code}: the meaning is one line of text without '|'")

    @property
    def kinds(self) -> frozenset[Kind]:
        named = {Kind.API: bool(self.http), Kind.JOB: self.job, Kind.CLIENT: self.client}
        return frozenset(kind for kind, applies in named.items() if applies)

    @property
    def status_text(self) -> str:
        """The docs' column: "422", "409, 410", "422, job", "job", "client"."""
        words = [str(status) for status in self.http]
        words += [kind.value for kind in (Kind.JOB, Kind.CLIENT) if kind in self.kinds]
        return ", ".join(words)


E = ErrorCode
# One entry a line, kept so by hand: the table reads as the table it renders (docs/errors.md).
# fmt: off
_ENTRIES = (
    ErrorEntry(E.BAD_REQUEST, "The request cannot be read (e.g. a body that is not JSON): fix it.", (400,)),
    ErrorEntry(E.VALIDATION_ERROR, "A field of the request is missing or invalid: the detail names it.", (422,)),
    ErrorEntry(E.INVALID_REQUEST, "The request cannot work as asked: the detail says what to change.", (422,)),
    ErrorEntry(E.NOT_FOUND, "No such path: check the URL against /docs.", (404,)),
    ErrorEntry(E.METHOD_NOT_ALLOWED, "The path exists, not with this method: the Allow header lists them.", (405,)),
    ErrorEntry(E.REQUEST_TIMEOUT, "The body stopped arriving for QAAS_READ_TIMEOUT_S: send it again.", (408,)),
    ErrorEntry(E.CONFLICT, "The request conflicts with the object's state: the detail says which.", (409,)),
    ErrorEntry(E.GONE, "The object's file was deleted: upload it or run the job again.", (410,)),
    ErrorEntry(E.PAYLOAD_TOO_LARGE, "The body is over a size limit: send less.", (413,)),
    ErrorEntry(E.BODY_TOO_LARGE, "A non-upload body is over QAAS_MAX_JSON_BYTES: send a smaller request.", (413,)),
    ErrorEntry(E.UNSUPPORTED_MEDIA_TYPE, "Wrong Content-Type: uploads are multipart/form-data.", (415,)),
    ErrorEntry(E.RANGE_NOT_SATISFIABLE, "No part of the Range lies within the file: ask within its size (see Content-Range).", (416,)),
    ErrorEntry(E.TOO_MANY_REQUESTS, "Over a limit: retry after the Retry-After seconds.", (429,)),
    ErrorEntry(E.INTERNAL_ERROR, "A bug in qaas, logged by the server or the worker: retry, and report it if it stays.", (500,), job=True),
    ErrorEntry(E.DEPENDENCY_UNAVAILABLE, "The database or the job broker does not answer: nothing was done; retry after Retry-After.", (503,)),
    ErrorEntry(E.UNAUTHENTICATED, "No API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.", (401,)),
    ErrorEntry(E.INVALID_API_KEY, "The API key is unknown or revoked: ask an operator for a new one.", (401,)),
    ErrorEntry(E.TOO_MANY_FAILED_ATTEMPTS, "Too many wrong keys from this address this minute (QAAS_AUTH_FAILURES_PER_MINUTE): wait.", (429,)),
    ErrorEntry(E.RATE_LIMITED, "Over QAAS_RATE_LIMIT_RPS with this key: slow down, retry after Retry-After.", (429,)),
    ErrorEntry(E.JOB_QUOTA_EXCEEDED, "The tenant has its limit of jobs queued or running: wait, or cancel one.", (429,)),
    ErrorEntry(E.STORAGE_QUOTA_EXCEEDED, "The tenant's storage quota is used up: delete models, datasets or jobs.", (429,)),
    ErrorEntry(E.INSPECTION_QUOTA_EXCEEDED, "The tenant has its limit of uploads being inspected: wait until they are ready, then upload.", (429,)),
    ErrorEntry(E.INVALID_TENANT_NAME, "`qaas keys create`: a tenant name is 1-100 lower-case letters, digits, '.', '_', '-'.", (422,)),
    ErrorEntry(E.KEY_NOT_FOUND, "`qaas keys revoke`: no API key with this id; list them with `qaas keys list`.", (404,)),
    ErrorEntry(E.JOB_NOT_FOUND, "No job with this id for this tenant: list them with GET /v1/jobs.", (404,)),
    ErrorEntry(E.MODEL_NOT_FOUND, "No model with this id for this tenant: list them with GET /v1/models.", (404,)),
    ErrorEntry(E.DATASET_NOT_FOUND, "No dataset with this id for this tenant: list them with GET /v1/datasets.", (404,)),
    ErrorEntry(E.ARTIFACT_NOT_FOUND, "The job has no artifact of this name: the detail lists its artifacts.", (404,)),
    ErrorEntry(E.REPORT_NOT_FOUND, "The job has no report until it finishes: poll the job.", (404,)),
    ErrorEntry(E.INVALID_CURSOR, "Not a cursor this API gave out: pass next_cursor from the previous page.", (422,)),
    ErrorEntry(E.MODEL_NOT_READY, "The model is still being inspected, or invalid: poll it, or upload a fixed one.", (409,)),
    ErrorEntry(E.DATASET_NOT_READY, "The dataset is still being inspected, or invalid: poll it, or upload a fixed one.", (409,)),
    ErrorEntry(E.MODEL_EXPIRED, "The retention policy deleted the model's file: upload it again (409 to a job, 410 to a download).", (409, 410)),
    ErrorEntry(E.DATASET_EXPIRED, "The retention policy deleted the dataset's file: upload it again.", (409,)),
    ErrorEntry(E.ARTIFACT_EXPIRED, "The retention policy deleted the artifact: run the job again.", (410,)),
    ErrorEntry(E.MODEL_IN_USE, "The model has a job in progress: cancel it or wait, then delete.", (409,)),
    ErrorEntry(E.DATASET_IN_USE, "The dataset is used by a job in progress: cancel it or wait, then delete.", (409,)),
    ErrorEntry(E.JOB_FINISHED, "The job has already finished: there is nothing to cancel.", (409,)),
    ErrorEntry(E.IDEMPOTENCY_KEY_REUSED, "This Idempotency-Key came with another body before: use a new key.", (409,)),
    ErrorEntry(E.FILE_MISSING, "A stored file was removed outside qaas: upload it or run the job again, and tell the operator.", (410,), job=True),
    ErrorEntry(E.MALFORMED_RANGE, "The Range header cannot be read: use e.g. 'bytes=0-1023'.", (400,)),
    ErrorEntry(E.INVALID_CONTENT_LENGTH, "The Content-Length header is not a number.", (422,)),
    ErrorEntry(E.MALFORMED_MULTIPART, "The multipart body cannot be parsed: send it with curl -F or the client.", (422,)),
    ErrorEntry(E.FILE_PART_MISSING, "The upload has no part named 'file': send it with -F file=@PATH.", (422,)),
    ErrorEntry(E.MULTIPLE_FILES, "The upload has more than one part named 'file': send exactly one.", (422,)),
    ErrorEntry(E.EMPTY_FILE, "The uploaded file is empty.", (422,)),
    ErrorEntry(E.UNKNOWN_FIELD, "A form field this upload does not take: the detail lists the allowed ones.", (422,)),
    ErrorEntry(E.DUPLICATE_FIELD, "A form field is sent more than once: send each at most once.", (422,)),
    ErrorEntry(E.FIELD_TOO_LARGE, "A form field is over 64 KiB: shorten it.", (422,)),
    ErrorEntry(E.TOO_MANY_PARTS, "The upload has too many parts: one 'file' and at most one of each field.", (422,)),
    ErrorEntry(E.FORM_TOO_LARGE, "The part headers and form fields are too large together: shorten them.", (413,)),
    ErrorEntry(E.UPLOAD_TOO_LARGE, "The upload is over QAAS_MAX_UPLOAD_BYTES: send a smaller file, or ask the operator.", (413,)),
    ErrorEntry(E.INVALID_PREPROCESS, "The dataset's preprocess field is not valid: the detail shows an example.", (422,)),
    ErrorEntry(E.ZIP_TOO_MANY_ENTRIES, "The zip has too many entries: zip only the files needed.", (422,)),
    ErrorEntry(E.ZIP_TOO_LARGE, "The zip expands past the size limit: upload less.", (422,)),
    ErrorEntry(E.ZIP_BOMB, "A zip entry expands far more than real data, or entries overlap: zip the files normally.", (422,)),
    ErrorEntry(E.ZIP_UNSAFE_PATH, "A zip entry's path is absolute or has '..', a drive or NUL: zip the folder from inside it.", (422,)),
    ErrorEntry(E.ZIP_LINK_ENTRY, "The zip holds a symbolic link: zip the files themselves.", (422,)),
    ErrorEntry(E.ZIP_ENCRYPTED, "A zip entry is encrypted: zip it without a password.", (422,)),
    ErrorEntry(E.ZIP_CORRUPT, "The zip is truncated, damaged, split or has data before it: upload one plain zip.", (422,)),
    ErrorEntry(E.SAFETENSORS_HEADER_TOO_LARGE, "A safetensors header is over the limit: the file is damaged or not safetensors.", (422,)),
    ErrorEntry(E.INVALID_SAFETENSORS, "A safetensors file is malformed: save it again with safetensors.", (422,)),
    ErrorEntry(E.UNSUPPORTED_COMBINATION, "This format, mode and backend do not go together: see GET /v1/capabilities.", (422,), job=True),
    ErrorEntry(E.DATASET_REQUIRED, "The mode needs a dataset (static: calibration, qat: train).", (422,), job=True),
    ErrorEntry(E.DATASET_MISMATCH, "The dataset does not fit the model (names, shapes or kind): the text says what it expects.", (422,), job=True),
    ErrorEntry(E.LABELS_REQUIRED, "QAT needs a train dataset with a 'labels' array.", (422,), job=True),
    ErrorEntry(E.INVALID_INPUT_SHAPES, "input_shapes is not a JSON object of lists of sizes and nulls: the text shows an example.", (422,), job=True),
    ErrorEntry(E.NOT_A_MODEL, "The file is not a model qaas can read: save it with torch.export.save.", job=True),
    ErrorEntry(E.PICKLE_NOT_ALLOWED, "The model holds pickled objects, refused unread: keep only tensors.", job=True),
    ErrorEntry(E.NATIVE_CODE_NOT_ALLOWED, "The upload holds native code (AOTInductor, libraries): upload the torch.export program.", job=True),
    ErrorEntry(E.UNSUPPORTED_FORMAT, "A format or construct qaas does not read: the message names it and the supported ones.", job=True),
    ErrorEntry(E.INPUT_SHAPES_REQUIRED, "TorchScript has no input shapes: upload it with input_shapes.", job=True),
    ErrorEntry(E.INVALID_DATASET, "The dataset cannot be read as data: the message names the entry and the fix.", job=True),
    ErrorEntry(E.INVALID_CONFIG, "A job option is out of range for this model or data: the message says which.", job=True),
    ErrorEntry(E.MODEL_LOAD_FAILED, "torch cannot load the model on this worker (often another torch version): re-export it.", job=True),
    ErrorEntry(E.NOTHING_QUANTIZED, "No layer could be quantized: the message lists the model's layers.", job=True),
    ErrorEntry(E.VERIFICATION_FAILED, "The int8 model did not run or did not match the original closely enough: try another backend or mode.", job=True),
    ErrorEntry(E.TIME_LIMIT, "The run passed its wall-clock or CPU-time limit: use a smaller model or data, or a longer timeout_s.", job=True),
    ErrorEntry(E.MEMORY_LIMIT, "The run used up QAAS_RUNNER_MEMORY_MB: use a smaller model, batch or dataset.", job=True),
    ErrorEntry(E.FILE_SIZE_LIMIT, "The run wrote a file over QAAS_RUNNER_FILE_SIZE_MB: ask for a larger limit.", job=True),
    ErrorEntry(E.RUNNER_CRASHED, "The runner died without a result (a signal or a crash): the message has its output.", job=True),
    ErrorEntry(E.INVALID_RUNNER_OUTPUT, "The runner left files qaas does not store (names, kinds, sizes): nothing was kept.", job=True),
    ErrorEntry(E.WORKER_LOST, "The job's worker stopped answering QAAS_MAX_ATTEMPTS times (killed for memory?): use a smaller model.", job=True),
    ErrorEntry(E.CONNECTION_FAILED, "The server did not answer (refused, unreachable, timed out).", client=True),
    ErrorEntry(E.WAIT_TIMEOUT, "wait() gave up after its timeout: the job goes on, wait again.", client=True),
    ErrorEntry(E.CHECKSUM_MISMATCH, "A download's sha256 is not the artifact's: download it again.", client=True),
    ErrorEntry(E.UNSAFE_ARTIFACT_NAME, "An artifact name would leave the target folder: nothing was written.", client=True),
)
# fmt: on
del E

CATALOGUE: Mapping[ErrorCode, ErrorEntry] = MappingProxyType({entry.code: entry for entry in _ENTRIES})
if set(CATALOGUE) != set(ErrorCode) or len(CATALOGUE) != len(_ENTRIES):
    raise RuntimeError("qaas.contract.errors: each ErrorCode needs exactly one entry")

# A failed job's or upload's error.code comes from these (app.services.metrics labels its runs with them).
JOB_CODES = frozenset(code for code, entry in CATALOGUE.items() if entry.job)


def api_codes() -> list[ErrorCode]:
    """The codes the API answers with, sorted."""
    return sorted(code for code, entry in CATALOGUE.items() if entry.http)


def codes_with_status(status: int) -> list[ErrorCode]:
    """The codes the API answers with this HTTP status, sorted."""
    return sorted(code for code, entry in CATALOGUE.items() if status in entry.http)


def http_status(code: str) -> int:
    """The one HTTP status of an API code. Raises ValueError for a code with none or several (model_expired)."""
    statuses = CATALOGUE[ErrorCode(code)].http
    if len(statuses) != 1:
        raise ValueError(f"{code} is answered with {len(statuses)} HTTP statuses ({statuses}), not one")
    return statuses[0]


def _order(entry: ErrorEntry) -> tuple[int, int, str]:
    # API codes by status, then job-only codes, then client-only ones.
    kind = 0 if entry.http else 1 if entry.job else 2
    return kind, entry.http[0] if entry.http else 0, entry.code.value


def render_markdown() -> str:
    """docs/errors.md: the catalogue as one table."""
    rows = sorted(CATALOGUE.values(), key=_order)
    lines = [
        "# Error codes",
        "",
        "<!-- Generated from qaas/contract/errors.py: edit that file, then run",
        "     python -m qaas.contract.errors > docs/errors.md -->",
        "",
        'Every error answer of the API is `{"error": "<code>", "detail": "<what to fix>"}` with the HTTP status',
        "below. A code marked `job` is a failed job's or upload's `error.code` (GET /v1/jobs/{id},",
        "GET /v1/models/{id}, GET /v1/datasets/{id}; the request itself answered 200); `client` codes are raised",
        "by `qaas.client` as `QaasError.code` without an answer from the server. An HTTP error with no code of its",
        "own comes as `http_<status>`. Codes are stable: branch on them, not on the detail.",
        "",
        "| code | HTTP status | meaning |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{entry.code.value}` | {entry.status_text} | {entry.meaning} |" for entry in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
