"""A small HTTP client for qaas (httpx only: no torch, no server code).

Example:
    from qaas.client import Client
    with Client("http://127.0.0.1:8000") as qaas:
        model = qaas.wait_model(qaas.upload_model("model.pt2")["id"])
        job = qaas.wait(qaas.submit(model["id"], mode="dynamic")["id"], callback=print)
        qaas.download(job["id"], "model.int8.ts", "out/model.int8.ts")
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

JobCallback = Callable[[dict[str, Any]], None]
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class QaasError(Exception):
    """An error answer of the API: `code` is stable, `detail` says what to fix."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60,
        http: httpx.Client | None = None,
    ) -> None:
        """`http` replaces the underlying httpx client (tests pass FastAPI's TestClient)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
                code, detail = body["error"], body["detail"]
            except (ValueError, KeyError, TypeError):
                code, detail = f"http_{response.status_code}", response.text[:500]
            raise QaasError(response.status_code, code, detail)
        return response.json() if response.content else None

    def _upload(self, path: str, file: str | Path, fields: dict[str, str]) -> dict[str, Any]:
        file = Path(file)
        with open(file, "rb") as handle:
            return self._check(self._http.post(path, files={"file": (file.name, handle)}, data=fields))

    def upload_model(
        self,
        file: str | Path,
        *,
        name: str | None = None,
        input_shapes: dict[str, list[int | None]] | None = None,
    ) -> dict[str, Any]:
        fields = {"name": name} if name else {}
        if input_shapes is not None:
            fields["input_shapes"] = json.dumps(input_shapes)
        return self._upload("/v1/models", file, fields)

    def upload_dataset(self, file: str | Path, *, name: str | None = None) -> dict[str, Any]:
        return self._upload("/v1/datasets", file, {"name": name} if name else {})

    def model(self, model_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/models/{model_id}"))

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/datasets/{dataset_id}"))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/jobs/{job_id}"))

    def submit(
        self, model_id: str, *, mode: str = "dynamic", idempotency_key: str | None = None, **request: Any
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"model_id": model_id, "mode": mode} | {k: v for k, v in request.items() if v is not None}
        return self._check(self._http.post("/v1/jobs", json=body, headers=headers))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.post(f"/v1/jobs/{job_id}/cancel"))

    def _poll(
        self,
        fetch: Callable[[], dict[str, Any]],
        done: frozenset[str],
        timeout: float,
        interval: float,
        callback: JobCallback | None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            current = fetch()
            if callback:
                callback(current)
            if current["status"] in done:
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {current['status']} after {timeout:.0f} s")
            time.sleep(interval)

    def wait_model(self, model_id: str, *, timeout: float = 600, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the model is ready or invalid."""
        return self._poll(
            lambda: self.model(model_id), frozenset({"ready", "invalid"}), timeout, interval, None
        )

    def wait_dataset(self, dataset_id: str, *, timeout: float = 600, interval: float = 0.5) -> dict[str, Any]:
        return self._poll(
            lambda: self.dataset(dataset_id), frozenset({"ready", "invalid"}), timeout, interval, None
        )

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 3600,
        interval: float = 0.5,
        callback: JobCallback | None = None,
    ) -> dict[str, Any]:
        """Poll until the job succeeded, failed or was cancelled; `callback` sees every poll."""
        return self._poll(lambda: self.job(job_id), TERMINAL, timeout, interval, callback)

    def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        """Stream an artifact to `dest` and check it against the sha256 in its ETag."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            with open(tmp, "wb") as handle:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    handle.write(chunk)
            expected = response.headers.get("etag", "").strip('"')
        if expected and expected != digest.hexdigest():
            tmp.unlink(missing_ok=True)
            raise QaasError(
                200,
                "checksum_mismatch",
                f"{name} arrived with sha256 {digest.hexdigest()}, expected {expected}: retry",
            )
        tmp.replace(dest)
        return dest
