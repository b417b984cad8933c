"""Property-based fuzzing of the HTTP API against its own /openapi.json, with schemathesis 4.

Both tests run in process against the ASGI app (schemathesis' ASGI transport: no server, no socket), over a
migrated SQLite database in a temporary data dir, with the embedded SQLite broker (uploads and job submissions
enqueue without Redis) and no worker: generated uploads stay `inspecting`, generated jobs stay `queued`. The
ASGI transport hands the app the whole multipart body at once, which the streamed upload routes read through
`request.stream()` like any other body, so a live uvicorn is not needed.

- `test_api_conforms_to_its_schema`: every operation (one subtest each) through schemathesis' examples,
  coverage and fuzzing phases, with positive and negative data and every built-in check.
- `test_stateful_scenarios`: call sequences along OpenAPI links. The app declares no `links` (yet): schemathesis
  infers them from the schema (dependency analysis: `POST /v1/models` 201 `id` feeds the `model_id` of
  `GET /v1/models/{model_id}`, `POST /v1/jobs`, ...), which lets `use_after_free` and
  `ensure_resource_availability` run.

Seed data gives the scenarios and list operations something real: a ready model with a queued job and a
succeeded job (metrics, report page, one artifact), and a ready dataset.

Bounded and reproducible: few examples per operation, derandomized generation, a fixed seed, no Hypothesis
example database (nothing is written into the repository). QAAS_FUZZ_EXAMPLES / QAAS_FUZZ_SCENARIOS raise
the budget for a longer local run.

With `app.services.auth` present (providing `create_key`), the app runs with QAAS_AUTH=required and every
generated request carries a valid `Authorization: Bearer` key; `ignored_auth` then replays successful requests
without a key and with a wrong one. Without that module (before API keys land) the app runs with auth off.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from tests.conftest import IN_CI, reset_caches

try:
    import hypothesis
    import hypothesis.configuration
    import jsonschema_rs
    import schemathesis
except ImportError:  # not yet in pyproject's dev extras
    if IN_CI:
        raise
    pytest.skip("schemathesis is not installed (pip install schemathesis==4.32.5)", allow_module_level=True)

# Even without an example database, Hypothesis caches things under ./.hypothesis (the constants its pytest
# plugin collects from the code while collecting, Unicode tables): a temporary directory keeps them out of the
# repository. Set on import because the collection hook runs before any fixture.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    _hypothesis_home = tempfile.mkdtemp(prefix="qaas-hypothesis-")
    atexit.register(shutil.rmtree, _hypothesis_home, ignore_errors=True)
    hypothesis.configuration.set_hypothesis_home_dir(_hypothesis_home)

from app.core.config import get_settings
from app.core.db import get_engine, session_scope
from app.main import create_app
from tests.api.conftest import MLP_INSPECTION, make_ready_dataset, make_ready_model
from tests.api.test_reports import METRICS, finish_job, submit

# Examples per operation in the fuzzing phase (the examples and coverage phases add their own bounded cases),
# and scenarios of up to STATEFUL_STEPS calls in the stateful test: the file runs in well under 90 s on 2 cores.
MAX_EXAMPLES = int(os.environ.get("QAAS_FUZZ_EXAMPLES", "50"))
STATEFUL_SCENARIOS = int(os.environ.get("QAAS_FUZZ_SCENARIOS", "50"))
STATEFUL_STEPS = 8
SEED = 20261127

CONFIG: dict[str, Any] = {
    "seed": SEED,
    "generation": {
        "mode": "all",  # positive and negative data
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,  # Hypothesis' derandomize
        "database": "none",  # no example database (nothing replayed from, or written to, .hypothesis/)
    },
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": True, "max-steps": STATEFUL_STEPS},
    },
    # Every built-in check is on by default; said here so that no schemathesis.toml can turn one off.
    "checks": {"enabled": True},
}


def auth_service() -> ModuleType | None:
    """`app.services.auth` once API keys exist; None before that (auth stays disabled). Only the module's
    absence falls back: a module that exists but fails to import fails the test."""
    try:
        auth = importlib.import_module("app.services.auth")
    except ModuleNotFoundError as exc:
        if exc.name != "app.services.auth":
            raise
        return None
    return auth if hasattr(auth, "create_key") else None


@pytest.fixture
def db_backend() -> str:
    """SQLite only: this tests the HTTP contract; the PostgreSQL paths are covered by the other API tests."""
    return "sqlite"


def seed(client: TestClient, data_dir: Path) -> None:
    model_id = make_ready_model(client, MLP_INSPECTION)
    make_ready_dataset(client, {"x": {"shape": [8, 16], "dtype": "float32"}}, has_labels=True)
    finish_job(submit(client, model_id), data_dir, METRICS)
    submit(client, model_id, backend="fbgemm")


def auth_headers(authorization: str | None) -> dict[str, str]:
    # A fresh dict each time: the TestClient and schemathesis' loader add their user-agent to the one given.
    return {"Authorization": authorization} if authorization else {}


class SeededState:
    """A copy of the seeded database and stored files, put back before each stateful scenario: every scenario,
    and Hypothesis' replay of a failing one, then starts from the same objects. (A replay that met the jobs an
    earlier scenario created would draw differently and end in FlakyStrategyDefinition, hiding the failure.)"""

    def __init__(self, data_dir: Path) -> None:
        database = make_url(get_settings().resolved_database_url).database
        assert database, "the fuzz tests run on SQLite"
        self.data_dir = data_dir
        self.database = database
        self.snapshot = data_dir.parent / "seeded"
        self.snapshot.mkdir()
        self._copy_database(self.database, str(self.snapshot / "qaas.sqlite"))
        for folder in self._folders(data_dir):  # uploads/, artifacts/, ...
            shutil.copytree(folder, self.snapshot / folder.name)

    def restore(self) -> None:
        self._copy_database(str(self.snapshot / "qaas.sqlite"), self.database)
        for folder in self._folders(self.data_dir):
            shutil.rmtree(folder)
        for folder in self._folders(self.snapshot):
            shutil.copytree(folder, self.data_dir / folder.name)

    @staticmethod
    def _folders(root: Path) -> list[Path]:
        return [path for path in root.iterdir() if path.is_dir()]

    @staticmethod
    def _copy_database(source: str, target: str) -> None:
        get_engine().dispose()  # no pooled connection keeps the old state
        src, dst = sqlite3.connect(source), sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()


@dataclass
class FuzzTarget:
    app: FastAPI
    authorization: str | None  # the `Authorization` value every request carries; None: auth disabled
    seeded: SeededState


@pytest.fixture
def fuzz_app(service_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FuzzTarget]:
    """The app over the seed data."""
    # A per-key request rate would turn answers into 429s depending on how fast this machine is: the results
    # must not depend on timing. (The quotas stay on: they depend only on what the requests did.) Likewise the
    # wrong keys `ignored_auth` sends would lock the test client's address out for the rest of the minute.
    monkeypatch.setenv("QAAS_RATE_LIMIT_RPS", "0")
    monkeypatch.setenv("QAAS_AUTH_FAILURES_PER_MINUTE", "0")
    authorization = None
    auth = auth_service()
    if auth is not None:
        monkeypatch.setenv("QAAS_AUTH", "required")
    reset_caches()
    if auth is not None:
        with session_scope() as session:
            _key, plaintext = auth.create_key(session, "fuzz", "schemathesis")
        authorization = f"Bearer {plaintext}"
    app = create_app()
    with TestClient(app, headers=auth_headers(authorization)) as client:
        seed(client, service_env)
    yield FuzzTarget(app, authorization, SeededState(service_env))


def sent_multipart_is_valid(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """Whether a multipart request, as it went over the wire, satisfies the operation's body schema."""
    content_type = str(response.request.headers.get("Content-Type", ""))
    body = response.request.body
    if not content_type.startswith("multipart/form-data") or not isinstance(body, bytes):
        return False
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    sent: dict[str, Any] = {}
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        value: Any = payload.decode(errors="replace") if isinstance(payload, bytes) else ""
        if part.get_filename() is None and part.get_content_type() == "application/json":
            with contextlib.suppress(ValueError):  # a part the schema's `encoding` declares as JSON
                value = json.loads(value)
        sent[str(part.get_param("name", header="content-disposition"))] = value
    schema = case.operation.definition.raw["requestBody"]["content"]["multipart/form-data"]["schema"]
    return bool(jsonschema_rs.validator_for(schema).is_valid(sent))


# Refusals the schema cannot express, by design. An upload's content (a zip's central directory, a safetensors
# header) and the JSON inside its text fields are checked by the API after streaming: no JSON Schema says what a
# safe zip is, so "valid per the schema" does not mean "acceptable". Each is a 422 with a stable code.
CONTENT_REFUSALS = {"invalid_input_shapes", "invalid_preprocess"} | {
    "zip_too_many_entries",
    "zip_too_large",
    "zip_bomb",
    "zip_unsafe_path",
    "zip_link_entry",
    "zip_encrypted",
    "zip_corrupt",
    "safetensors_header_too_large",
    "invalid_safetensors",
}


def refused_by_policy(code: str, case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """A documented refusal reported as a failure: the content checks above on the two upload routes, and a
    job's report before the job has one (404 `report_not_found`: the report does not exist until the job has
    metrics, while schemathesis expects it to exist once the job does)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    path, method = case.operation.path, case.operation.method.upper()
    if code == "ST202" and method == "POST" and path in ("/v1/models", "/v1/datasets"):
        return response.status_code == 422 and error in CONTENT_REFUSALS
    if code == "ST302" and path.startswith("/v1/jobs/{job_id}/report"):
        return response.status_code == 404 and error == "report_not_found"
    return False


@pytest.fixture
def fuzz_schema(fuzz_app: FuzzTarget) -> Any:
    authorization = fuzz_app.authorization
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json",
        fuzz_app.app,
        config=schemathesis.Config.from_dict(CONFIG),
        headers=auth_headers(authorization),
    )
    if authorization is not None:
        key = authorization

        # A registered provider marks the key as explicit credentials: `ignored_auth` then replays each
        # successful request without them and with a wrong key, and expects 401 or 403.
        @schema.auth(refresh_interval=None)
        class ApiKey:
            def get(self, case: Any, ctx: Any) -> str:
                return key

            def set(self, case: Any, data: str, ctx: Any) -> None:
                case.headers = {**(case.headers or {}), "Authorization": data}

    @schema.hook
    def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
        # schemathesis 4.32.5 cannot tell that a negative multipart body turned valid on the wire (a `name`
        # generated as 3 is sent as the text "3"; an empty list is not sent at all): its own exemption for
        # that (`_form_body_is_valid_as_sent`) fails on the generated file part ("Unsupported type: 'Binary'")
        # and every such upload is reported as negative data accepted. Drop exactly those reports: ST201 on a
        # multipart request whose parts, as sent, satisfy the schema. Any other failure is kept.
        if failure.code == "ST201" and sent_multipart_is_valid(case, response):
            return False
        return not refused_by_policy(failure.code, case, response)

    return schema


@pytest.fixture
def pytest_node_id_shim(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32.5's `from_fixture` relabels the test item through `item._nodeid`, which pytest 9.2's
    items no longer have (they keep a structured `_id`): give it the plain attribute, which only labels the
    per-operation subtests."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.mark.usefixtures("pytest_node_id_shim")
@schema.parametrize()
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate()


def test_stateful_scenarios(fuzz_schema: Any, fuzz_app: FuzzTarget) -> None:
    workflow = fuzz_schema.as_state_machine()
    # The app declares no links: without the ones schemathesis infers, this test would test nothing.
    assert fuzz_schema.statistic.transitions.total > 0

    class Scenario(workflow):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            fuzz_app.seeded.restore()

    settings = hypothesis.settings(
        fuzz_schema.config.get_hypothesis_settings(phase="stateful"),
        max_examples=STATEFUL_SCENARIOS,
        stateful_step_count=STATEFUL_STEPS,
    )
    Scenario.run(settings=settings)
