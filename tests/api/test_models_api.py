from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.services import models as model_service
from tests.api.conftest import make_ready_model, upload


def test_upload_streams_to_disk_with_hash_and_generated_name(client: TestClient, service_env: Path) -> None:
    content = b"\x00model bytes\xff" * 1000
    response = upload(client, "/v1/models", content, name="my model")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("mdl_")
    assert body["status"] == "inspecting"
    assert body["name"] == "my model"
    assert body["size_bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    stored = list((service_env / "uploads").iterdir())
    assert [p.name for p in stored] == [f"{body['id']}.bin"]  # generated name, not the client's
    assert stored[0].read_bytes() == content
    assert list((service_env / "tmp").iterdir()) == []

    file_response = client.get(f"/v1/models/{body['id']}/file")
    assert file_response.status_code == 200
    assert file_response.content == content


def test_upload_over_limit_is_413_and_leaves_nothing(
    client: TestClient, service_env: Path, monkeypatch
) -> None:
    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 4096)
    response = upload(client, "/v1/models", b"x" * 10_000)
    assert response.status_code == 413
    assert response.json()["error"] == "upload_too_large"
    assert "QAAS_MAX_UPLOAD_BYTES" in response.json()["detail"]
    assert client.get("/v1/models").json()["items"] == []
    assert not (service_env / "uploads").exists() or list((service_env / "uploads").iterdir()) == []
    assert list((service_env / "tmp").iterdir()) == []


def test_declared_content_length_over_limit_is_refused_before_reading(
    client: TestClient, monkeypatch
) -> None:
    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "max_upload_bytes", 4096)
    response = client.post(
        "/v1/models",
        content=b"--b\r\n",
        headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(10**9)},
    )
    assert response.status_code == 413


def test_upload_errors_have_codes(client: TestClient) -> None:
    no_file = client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"1")})
    assert no_file.status_code == 422
    assert no_file.json()["error"] == "unknown_field"
    not_multipart = client.post(
        "/v1/models", content=b"raw", headers={"content-type": "application/octet-stream"}
    )
    assert not_multipart.status_code == 415
    assert not_multipart.json()["error"] == "unsupported_media_type"
    empty = upload(client, "/v1/models", b"")
    assert empty.status_code == 422 and empty.json()["error"] == "empty_file"
    bad_shapes = upload(client, "/v1/models", b"abc", input_shapes='{"x": [0, "a"]}')
    assert bad_shapes.status_code == 422 and bad_shapes.json()["error"] == "invalid_input_shapes"
    not_json = upload(client, "/v1/models", b"abc", input_shapes="{x")
    assert not_json.status_code == 422 and "not valid JSON" in not_json.json()["detail"]


def test_input_shapes_are_stored(client: TestClient) -> None:
    response = upload(client, "/v1/models", b"abc", input_shapes='{"x": [null, 3, 32, 32]}')
    assert response.status_code == 201
    assert response.json()["input_shapes"] == {"x": [None, 3, 32, 32]}


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in (
        "/v1/models/mdl_nope",
        "/v1/models/mdl_nope/file",
        "/v1/datasets/ds_nope",
        "/v1/jobs/job_nope",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        body = response.json()
        assert (
            body["error"].endswith("_not_found") and "mdl_nope" in body["detail"] or "nope" in body["detail"]
        )
    assert client.delete("/v1/models/mdl_nope").status_code == 404
    assert client.get("/v1/nothing-here").json()["error"] == "not_found"


def test_list_paginates_with_cursor(client: TestClient) -> None:
    ids = [upload(client, "/v1/models", f"m{i}".encode()).json()["id"] for i in range(5)]
    seen = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/models", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert client.get("/v1/models", params={"cursor": "!!!"}).json()["error"] == "validation_error"
    assert client.get("/v1/models", params={"limit": 0}).status_code == 422


def test_inspection_result_and_invalid_model(client: TestClient) -> None:
    model_id = make_ready_model(client)
    body = client.get(f"/v1/models/{model_id}").json()
    assert body["status"] == "ready"
    assert body["format"] == "pt2"
    assert body["inspection"]["inputs"] == [{"name": "x", "shape": [None, 16], "dtype": "float32"}]

    bad = upload(client, "/v1/models", b"junk").json()["id"]
    with session_scope() as session:
        model_service.record_inspection(session, bad, result=None, error=("not_a_model", "found 4 bytes"))
    body = client.get(f"/v1/models/{bad}").json()
    assert body["status"] == "invalid"
    assert body["error"] == {"code": "not_a_model", "message": "found 4 bytes"}
    assert client.get("/v1/models", params={"status": "invalid"}).json()["items"][0]["id"] == bad


def test_delete_model_removes_file(client: TestClient, service_env: Path) -> None:
    model_id = upload(client, "/v1/models", b"abc").json()["id"]
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert client.get(f"/v1/models/{model_id}").status_code == 404
    assert list((service_env / "uploads").iterdir()) == []


def test_a_file_removed_outside_qaas_is_410_not_500(client: TestClient, service_env) -> None:
    model_id = client.post("/v1/models", files={"file": ("m.pt2", b"model")}).json()["id"]
    (service_env / "uploads" / f"{model_id}.bin").unlink()
    response = client.get(f"/v1/models/{model_id}/file")
    assert response.status_code == 410 and response.json()["error"] == "file_missing"


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    response = client.request("OPTIONS", "/v1/models/mdl_x")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
