from __future__ import annotations

from fastapi.testclient import TestClient


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {
        "status": "ready",
        "database": "ok",
        "broker": "ok",
        "workers": [],
    }


def test_readiness_reports_a_broker_that_is_down(client: TestClient, monkeypatch) -> None:
    from app.core import queue

    def down(_timeout: float) -> None:
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(queue, "check_broker", down)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"] == "dependency_unavailable"
    assert "broker unreachable" in response.json()["detail"]
    upload = client.post("/v1/models", files={"file": ("m", b"abc")})
    assert upload.status_code == 503 and upload.json()["error"] == "dependency_unavailable"
    assert client.get("/v1/models").json()["items"] == []


def test_openapi_declares_one_error_schema_everywhere(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), (method, path)
            for status in ("422", "503"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    upload_body = spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"
    ]
    assert upload_body["properties"]["file"]["format"] == "binary"
    assert "examples" in spec["components"]["schemas"]["JobCreate"]


def test_docs_are_served_without_a_cdn(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    for line in page.text.splitlines():
        if "src=" in line or "href=" in line:
            assert "http://" not in line and "https://" not in line, line
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200


def test_capabilities(client: TestClient) -> None:
    body = client.get("/v1/capabilities").json()
    assert body["support"]["pt2"]["static"] == ["fbgemm", "x86", "auto"]
    assert "qat" not in body["support"]["torchscript"]


def test_database_down_is_503_not_500(tmp_path, monkeypatch) -> None:
    from app.main import create_app
    from tests.conftest import configure, reset_caches

    # Nothing listens on port 1: every connection is refused.
    configure(monkeypatch, tmp_path / "var", "postgresql+psycopg://postgres@127.0.0.1:1/none")
    try:
        with TestClient(create_app()) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "database unreachable" in ready.json()["detail"]
            listed = client.get("/v1/models")
            assert listed.status_code == 503
            assert listed.json()["error"] == "dependency_unavailable"
            assert listed.headers["retry-after"] == "5"
    finally:
        reset_caches()
