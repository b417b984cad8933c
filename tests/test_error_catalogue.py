"""The error catalogue (qaas/contract/errors.py) against what the code raises, the OpenAPI document and
docs/errors.md: every code qaas gives out is in it once, with the status it is really answered with."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import STATUS, create_app
from qaas.contract.errors import (
    CATALOGUE,
    JOB_CODES,
    ErrorCode,
    ErrorEntry,
    Kind,
    api_codes,
    codes_with_status,
    http_status,
    render_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "errors.md"
REGENERATE = ".venv/bin/python -m qaas.contract.errors > docs/errors.md"
CODE = r'"(?P<code>[a-z][a-z0-9_]*)"'
_CLASS_STATUS = {cls.__name__: status for cls, status in STATUS.items()}
_ARGS = r"(?:[^()]|\((?:[^()]|\([^()]*\))*\))*?"  # a call's arguments, up to two levels of parentheses


@dataclass(frozen=True)
class Raised:
    """A code as the source gives it out: where, as which kind, and with which HTTP status if it says."""

    code: str
    where: str
    kind: Kind
    status: int | None = None


@dataclass(frozen=True)
class Form:
    """One way the sources give a code out: group `code` is the code (or `noun` of `{noun}_not_found`),
    group `status` an HTTP status or the name of an app.core.errors class; `status` fixes it otherwise."""

    pattern: str
    kind: Kind
    folders: tuple[str, ...]
    status: int | None = None


FORMS = (
    # the engine's, the runner's events, the supervisor's and the reaper's, the worker's (workers.tasks)
    Form(rf"\bEngineError\(\s*{CODE}", Kind.JOB, ("workers",)),
    Form(rf'\berror_code(?:\s*=\s*|"\s*:\s*){CODE}', Kind.JOB, ("workers", "app")),
    Form(r'\breturn "(?P<code>[a-z0-9_]+_limit)", \(', Kind.JOB, ("workers",)),
    Form(rf'\bfail_job\([^"()]*{CODE}', Kind.JOB, ("workers",)),
    Form(rf"\berror=\(\s*{CODE}", Kind.JOB, ("workers",)),
    Form(rf'"code":\s*{CODE}', Kind.JOB, ("workers",)),
    Form(rf"\bcode\s*=\s*{CODE}", Kind.JOB, ("workers",)),
    Form(rf'\bcode\s*=\s*"[a-z0-9_]+" if [^\n]+? else {CODE}', Kind.JOB, ("workers",)),
    Form(rf'\b_parse_json\([^"()]*{CODE}', Kind.JOB, ("workers",)),
    # the API: domain errors with their class, the guard's and the handlers' answers, the upload checks
    Form(rf"\b(?P<status>{'|'.join(_CLASS_STATUS)})\({_ARGS}\bcode\s*=\s*{CODE}", Kind.API, ("app",)),
    Form(rf"\bcode\s*=\s*{CODE}", Kind.API, ("app",)),
    Form(rf"\b(?:_json|_error|Refusal)\(\s*(?P<status>\d{{3}}),\s*{CODE}", Kind.API, ("app",)),
    Form(rf'"error":\s*{CODE}', Kind.API, ("app",)),
    Form(r'\bnot_found\(\s*"(?P<noun>[a-z]+)"', Kind.API, ("app",), 404),
    Form(
        rf"\bArchiveRefused\(\s*{CODE}", Kind.API, ("qaas",), 422
    ),  # InvalidRequest in app.api.routes.common
    # the client's own
    Form(rf"\b(?:QaasError|QaasConnectionError|WaitTimeout)\(\s*\d+,\s*{CODE}", Kind.CLIENT, ("qaas",)),
)


def _sources() -> Iterator[tuple[str, Path]]:
    for folder in ("app", "workers", "qaas"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != ROOT / "qaas" / "contract" / "errors.py":
                yield folder, path


def _found(form: Form, text: str, where: Path) -> Iterator[Raised]:
    for match in re.finditer(form.pattern, text, re.S):
        groups = match.groupdict()
        code = groups["code"] if "code" in groups else f"{groups['noun']}_not_found"
        status = groups.get("status")
        number = (_CLASS_STATUS.get(status) or int(status)) if status else form.status
        line = text.count("\n", 0, match.start()) + 1
        yield Raised(code, f"{where.relative_to(ROOT)}:{line}", form.kind, number)


def raised_codes() -> list[Raised]:
    """Every code the sources in app/, workers/ and qaas/ give out, in the forms they are given out in."""
    raised: list[Raised] = []
    for folder, path in _sources():
        text = path.read_text(encoding="utf-8")
        for form in FORMS:
            if folder in form.folders:
                raised += _found(form, text, path)
    return raised


def _given_by_construction() -> list[Raised]:
    """Codes that no literal shows: imported constants, and not_found(cls.__tablename__) for the uploads."""
    from app.api.timeouts import REQUEST_TIMEOUT
    from app.models import Dataset, Model

    stored = [f"{cls.__tablename__}_not_found" for cls in (Model, Dataset)]
    return [Raised(REQUEST_TIMEOUT, "app/api/timeouts.py", Kind.API, 408)] + [
        Raised(code, "app/services/stored.py", Kind.API, 404) for code in stored
    ]


def _mismatch(raised: Raised) -> str | None:
    if raised.code not in {code.value for code in ErrorCode}:
        return "is not in the catalogue"
    entry = CATALOGUE[ErrorCode(raised.code)]
    if raised.kind is Kind.JOB and not entry.job:
        return "is a job's code here, not one in the catalogue (job=True)"
    if raised.kind is Kind.CLIENT and not entry.client:
        return "is raised by the client here, not in the catalogue (client=True)"
    if raised.kind is Kind.API and not entry.http:
        return "is an API answer here; the catalogue gives it no HTTP status"
    if raised.status is not None and raised.status not in entry.http:
        return f"is answered with {raised.status} here; the catalogue says {entry.status_text}"
    return None


def test_every_code_raised_is_in_the_catalogue_with_its_status() -> None:
    raised = raised_codes() + _given_by_construction()
    # The scan still sees each form: a pattern that stopped matching would hide new codes.
    kinds = {(r.kind, r.code) for r in raised}
    assert {(Kind.JOB, "time_limit"), (Kind.JOB, "worker_lost"), (Kind.JOB, "verification_failed")} <= kinds
    assert {(Kind.API, "job_not_found"), (Kind.API, "invalid_api_key"), (Kind.API, "zip_bomb")} <= kinds
    assert (Kind.CLIENT, "connection_failed") in kinds
    problems = [f"{r.where}: {r.code!r} {why}" for r in raised if (why := _mismatch(r)) is not None]
    assert problems == [], "add the code to qaas/contract/errors.py, or use the right one:\n" + "\n".join(
        problems
    )


def test_every_form_of_the_scan_still_finds_codes() -> None:
    """A form that matches nothing any more would let codes given out in a new way pass unseen."""
    texts = [(folder, path, path.read_text(encoding="utf-8")) for folder, path in _sources()]
    unused = [
        form.pattern
        for form in FORMS
        if not any(
            folder in form.folders and next(_found(form, text, path), None) for folder, path, text in texts
        )
    ]
    assert unused == [], "these forms find nothing: remove them, or scan the form that replaced them"


def test_every_catalogue_code_is_given_out_somewhere() -> None:
    used = {r.code for r in raised_codes() + _given_by_construction()}
    for _, path in _sources():
        used |= {ErrorCode[name].value for name in re.findall(r"\bErrorCode\.([A-Z0-9_]+)", path.read_text())}
    assert sorted(set(CATALOGUE) - used) == [], "no source gives these out: remove them, or raise them"


def test_each_domain_error_answers_the_status_of_its_code() -> None:
    from app.core import errors

    assert set(_CLASS_STATUS) >= {"QaasError", "InvalidRequest", "NotFound", "Gone", "ServiceUnavailable"}
    assert STATUS[errors.InvalidRequest] == 422 and STATUS[errors.Gone] == 410
    assert list(STATUS)[-1] is errors.QaasError  # the catch-all comes last
    assert errors.not_found("model", "mdl_x").code == "model_not_found"
    with pytest.raises(ValueError):
        errors.not_found("widget", "w_1")  # no widget_not_found in the catalogue


def test_openapi_lists_the_codes_and_every_declared_status_has_one() -> None:
    spec = create_app().openapi()
    schemas = spec["components"]["schemas"]
    error_text = schemas["ErrorBody"]["properties"]["error"]["description"]
    assert "enum" not in schemas["ErrorBody"]["properties"]["error"]  # clients must read future codes
    assert [code for code in api_codes() if f"`{code}`" not in error_text] == []
    job_text = schemas["ObjectError"]["properties"]["code"]["description"]
    assert [code for code in JOB_CODES if f"`{code}`" not in job_text] == []
    declared = {
        int(status)
        for operations in spec["paths"].values()
        for operation in operations.values()
        for status in operation.get("responses", {})
        if status.isdigit() and int(status) >= 400
    }
    assert {401, 404, 409, 410, 413, 422, 429, 503} <= declared
    assert {status: codes_with_status(status) for status in declared if not codes_with_status(status)} == {}


def test_docs_errors_md_is_current() -> None:
    assert DOCS.is_file(), f"docs/errors.md is missing: run `{REGENERATE}`"
    assert DOCS.read_text(encoding="utf-8") == render_markdown(), (
        f"docs/errors.md is stale: run `{REGENERATE}`"
    )


def test_the_table_has_one_row_per_code_with_its_kind() -> None:
    rows = [line for line in render_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == len(ErrorCode)
    assert "| `model_expired` | 409, 410 |" in render_markdown()
    assert "| `internal_error` | 500, job |" in render_markdown()
    assert "| `worker_lost` | job |" in render_markdown()
    assert "| `connection_failed` | client |" in render_markdown()


def test_an_entry_must_say_where_it_is_given_out_and_mean_one_line() -> None:
    with pytest.raises(ValueError, match="job=True"):
        ErrorEntry(ErrorCode.GONE, "gone")
    with pytest.raises(ValueError, match="ascending"):
        ErrorEntry(ErrorCode.MODEL_EXPIRED, "expired", (410, 409))
    with pytest.raises(ValueError, match="400-599"):
        ErrorEntry(ErrorCode.GONE, "gone", (200,))
    with pytest.raises(ValueError, match="one line"):
        ErrorEntry(ErrorCode.GONE, "gone |", (410,))
    assert http_status("file_missing") == 410
    with pytest.raises(ValueError, match="2 HTTP statuses"):
        http_status("model_expired")  # same meaning, 409 to a job request and 410 to a download


@pytest.fixture
def client(service_env: Path) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


def test_an_upload_without_its_file_part_is_not_a_missing_stored_file(client: TestClient) -> None:
    """422 file_part_missing for the request; file_missing stays the 410 of a stored file removed outside
    qaas (tests/api/test_models_api.py)."""
    body = b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--b--\r\n'
    response = client.post(
        "/v1/models", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert (response.status_code, response.json()["error"]) == (422, "file_part_missing")
    assert "'file'" in response.json()["detail"]
