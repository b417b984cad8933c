"""Form fields of JSON nested deeper than any parser's stack are a clean 422, never a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.api.conftest import upload

DEEP = "[" * 5_000 + "]" * 5_000  # 10 KB, well within a form field's cap


@pytest.mark.parametrize(
    ("path", "field", "code"),
    [
        ("/v1/models", "input_shapes", "invalid_input_shapes"),
        ("/v1/datasets", "preprocess", "invalid_preprocess"),
    ],
)
def test_deeply_nested_json_fields_are_refused(service_env: Path, path: str, field: str, code: str) -> None:
    with TestClient(create_app()) as client:
        response = upload(client, path, b"content", **{field: DEEP})
        assert response.status_code == 422, response.text
        assert response.json()["error"] == code
        assert "nested too deeply" in response.json()["detail"]
