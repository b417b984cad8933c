"""The Python client for qaas (httpx only: no torch, no server code).

Example:
    from qaas.client import Client
    with Client("http://127.0.0.1:8000") as qaas:  # default: $QAAS_SERVER, key from $QAAS_API_KEY
        model = qaas.wait_model(qaas.upload_model("model.pt2"))
        calib = qaas.wait_dataset(qaas.upload_dataset("calib.npz"))
        job = qaas.wait(qaas.submit(model, mode="static", calibration_dataset_id=calib.id), callback=print)
        print(job.status, job.metrics.size.ratio if job.metrics else job.error)
        qaas.download_all(job, "out/")  # every artifact, each checked against its sha256

Results are the small frozen records of qaas.records (`Model`, `Dataset`, `Job`, and `JobSummary` from the job
lists); `job.metrics` is typed by the job contract (qaas.contract.metrics.JobMetrics).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from qaas.contract.vocab import TERMINAL, UploadStatus
from qaas.records import Artifact, Dataset, Error, Job, JobSummary, Model, Progress

__all__ = [
    "Artifact", "Client", "Dataset", "Error", "Job", "JobSummary", "Model", "Progress",
    "QaasConnectionError", "QaasError", "WaitTimeout",
]  # fmt: skip

DEFAULT_SERVER = "http://127.0.0.1:8000"
INSPECTED = frozenset({UploadStatus.READY, UploadStatus.INVALID, UploadStatus.EXPIRED})
UPLOAD_CHUNK_BYTES = 1 << 20
FIRST_POLL_S = 0.5
# Answers worth asking again: the server or a proxy is restarting, or the request rate is over its limit.
RETRY_STATUSES = frozenset({502, 503, 504})
ProgressCallback = Callable[[int, int], None]


class QaasError(Exception):
    """An error answer of the API: `code` is stable, `detail` says what to fix. `status` 0: no answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}" if status else f"{code}: {detail}")
        self.status, self.code, self.detail = status, code, detail

    @property
    def retryable(self) -> bool:
        return self.status in RETRY_STATUSES or self.status == 0 or self.code == "rate_limited"


class QaasConnectionError(QaasError):
    """The server did not answer (refused, unreachable, timed out): status 0, code connection_failed."""


class WaitTimeout(QaasError, TimeoutError):
    """`wait` gave up; the job goes on (cancel it with Client.cancel)."""


ObjectT = TypeVar("ObjectT", Model, Dataset, Job)


def _id(value: str | Mapping[str, Any]) -> str:
    return value if isinstance(value, str) else str(value["id"])


def _quoted(name: str) -> str:
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def check_server_url(url: str) -> str:
    """The URL without a trailing slash, or ValueError saying what is wrong with it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"{url!r} is not a URL ({exc}): use e.g. {DEFAULT_SERVER}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not an http(s) URL with a host: use e.g. {DEFAULT_SERVER}")
    return url.rstrip("/")


class Client:
    """One qaas server. `base_url` defaults to $QAAS_SERVER (else 127.0.0.1:8000), `api_key` to
    $QAAS_API_KEY; `http` replaces the underlying httpx client (tests pass FastAPI's TestClient)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 60,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = check_server_url(base_url or os.environ.get("QAAS_SERVER") or DEFAULT_SERVER)
        key = api_key if api_key is not None else os.environ.get("QAAS_API_KEY", "")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- transport ----------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = self._headers | kwargs.pop("headers", {})
        try:
            return self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise QaasConnectionError(
                0, "connection_failed", f"no answer from {self.url} ({type(exc).__name__}: {exc})"
            ) from exc

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
                code, detail = body["error"], body["detail"]
            except (ValueError, KeyError, TypeError):
                code, detail = f"http_{response.status_code}", response.text[:500]
            raise QaasError(response.status_code, code, detail)
        return response.json() if response.content else None

    def _call(self, method: str, path: str, *, attempts: int = 3, **kwargs: Any) -> Any:
        """One request; retried (after 0.5, 1 s) while the answer says to ask again. Only for requests that
        may repeat: reads, and submissions that carry an Idempotency-Key."""
        for attempt in range(attempts):
            try:
                return self._check(self._send(method, path, **kwargs))
            except QaasError as exc:
                if not exc.retryable or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def health(self) -> dict[str, Any]:
        """`GET /healthz` (no key needed): raises QaasConnectionError when nothing answers at the URL."""
        result: dict[str, Any] = self._call("GET", "/healthz", attempts=1)
        return result

    def capabilities(self) -> dict[str, Any]:
        """The support matrix, the server's limits, the caller's tenant with its quotas and usage."""
        result: dict[str, Any] = self._call("GET", "/v1/capabilities")
        return result

    # --- uploads ------------------------------------------------------------------------------------------

    def _upload(
        self, path: str, file: str | Path, fields: dict[str, str], progress: ProgressCallback | None
    ) -> dict[str, Any]:
        """Stream a multipart body from disk, a chunk at a time (a 2 GB file is never in memory), with an
        exact Content-Length: the server refuses a file over its limit (413) from the headers alone."""
        file = Path(file)
        total = file.stat().st_size
        boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields.items()
        )
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_quoted(file.name)}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            sent = 0
            if progress:
                progress(0, total)
            with open(file, "rb") as handle:
                while sent < total and (chunk := handle.read(min(UPLOAD_CHUNK_BYTES, total - sent))):
                    sent += len(chunk)
                    yield chunk
                    if progress:
                        progress(sent, total)
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + total + len(tail)),
        }
        result: dict[str, Any] = self._check(self._send("POST", path, content=body(), headers=headers))
        return result

    def upload_model(
        self,
        file: str | Path,
        *,
        name: str | None = None,
        input_shapes: dict[str, list[int | None]] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Model:
        """Upload a .pt2, a TorchScript file (with `input_shapes`, None for a dynamic dimension) or a zipped
        Hugging Face folder; `progress(bytes_sent, total)` follows the upload. A worker then inspects it."""
        fields = {"name": name} if name else {}
        if input_shapes is not None:
            fields["input_shapes"] = json.dumps(input_shapes)
        return Model.from_json(self._upload("/v1/models", file, fields, progress))

    def upload_dataset(
        self,
        file: str | Path,
        *,
        name: str | None = None,
        preprocess: dict[str, Any] | None = None,
        progress: ProgressCallback | None = None,
    ) -> Dataset:
        """Upload .npz / .safetensors arrays named after the model's inputs (+ `labels`), an image-folder zip
        (with `preprocess`) or JSONL text; `progress(bytes_sent, total)` follows the upload."""
        fields = {"name": name} if name else {}
        if preprocess is not None:
            fields["preprocess"] = json.dumps(preprocess)
        return Dataset.from_json(self._upload("/v1/datasets", file, fields, progress))

    # --- reading ------------------------------------------------------------------------------------------

    def model(self, model: str | Mapping[str, Any]) -> Model:
        return Model.from_json(self._call("GET", f"/v1/models/{_id(model)}"))

    def dataset(self, dataset: str | Mapping[str, Any]) -> Dataset:
        return Dataset.from_json(self._call("GET", f"/v1/datasets/{_id(dataset)}"))

    def job(self, job: str | Mapping[str, Any]) -> Job:
        return Job.from_json(self._call("GET", f"/v1/jobs/{_id(job)}"))

    def _pages(self, path: str, params: dict[str, Any], page_size: int) -> Iterator[dict[str, Any]]:
        query = {k: v for k, v in params.items() if v is not None} | {"limit": min(max(page_size, 1), 100)}
        while True:
            page = self._call("GET", path, params=query)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    def iter_jobs(
        self, *, status: str | None = None, model_id: str | None = None, page_size: int = 100
    ) -> Iterator[JobSummary]:
        """Every job, newest first, fetched a page at a time as the iteration goes on. Summaries:
        `job(summary)` fetches one whole (config, metrics, artifacts)."""
        for raw in self._pages("/v1/jobs", {"status": status, "model_id": model_id}, page_size):
            yield JobSummary.from_json(raw)

    def jobs(
        self, *, status: str | None = None, model_id: str | None = None, limit: int | None = 20
    ) -> list[JobSummary]:
        """The newest `limit` jobs (None: all) as summaries, following the pages; filter by status or model.
        `job(summary)` fetches one whole."""
        pages = self.iter_jobs(status=status, model_id=model_id, page_size=limit or 100)
        return list(itertools.islice(pages, limit))

    def models(self, *, status: str | None = None, limit: int | None = 20) -> list[Model]:
        pages = self._pages("/v1/models", {"status": status}, limit or 100)
        return [Model.from_json(raw) for raw in itertools.islice(pages, limit)]

    def datasets(self, *, status: str | None = None, limit: int | None = 20) -> list[Dataset]:
        pages = self._pages("/v1/datasets", {"status": status}, limit or 100)
        return [Dataset.from_json(raw) for raw in itertools.islice(pages, limit)]

    def report(self, job: str | Mapping[str, Any]) -> dict[str, Any]:
        """The finished job's full metrics, configuration and manifest (404 report_not_found before)."""
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{_id(job)}/report")
        return result

    def report_html(self, job: str | Mapping[str, Any]) -> str:
        """The report page (self-contained HTML: charts inline, no external resources)."""
        response = self._send("GET", f"/v1/jobs/{_id(job)}/report.html")
        if response.status_code >= 400:
            self._check(response)
        return response.text

    # --- jobs ---------------------------------------------------------------------------------------------

    def submit(
        self,
        model: str | Mapping[str, Any],
        *,
        mode: str = "dynamic",
        backend: str | None = None,
        calibration_dataset_id: str | Mapping[str, Any] | None = None,
        train_dataset_id: str | Mapping[str, Any] | None = None,
        eval_dataset_id: str | Mapping[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        benchmark: dict[str, Any] | None = None,
        timeout_s: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> Job:
        """Submit a job (an unset field takes the server's default: the job contract, qaas.contract.jobs).

        Every submission carries an Idempotency-Key (a new one when not given), so a retry after a lost
        answer returns the same job instead of starting a second one.
        """
        datasets = {
            "calibration_dataset_id": calibration_dataset_id,
            "train_dataset_id": train_dataset_id,
            "eval_dataset_id": eval_dataset_id,
        }
        body = {"model_id": _id(model), "mode": mode, "backend": backend} | {
            key: _id(value) for key, value in datasets.items() if value is not None
        }
        body |= {"options": options, "benchmark": benchmark, "timeout_s": timeout_s} | extra
        headers = {"Idempotency-Key": idempotency_key or f"qaas-client-{uuid.uuid4()}"}
        request = {key: value for key, value in body.items() if value is not None}
        return Job.from_json(self._call("POST", "/v1/jobs", json=request, headers=headers))

    def cancel(self, job: str | Mapping[str, Any]) -> Job:
        """Cancel a queued or running job (409 job_finished once it has ended)."""
        return Job.from_json(self._call("POST", f"/v1/jobs/{_id(job)}/cancel", attempts=1))

    def _poll(
        self,
        fetch: Callable[[], ObjectT],
        done: frozenset[str],
        timeout: float | None,
        interval: float | None,
        max_interval: float,
        callback: Callable[[ObjectT], None] | None,
    ) -> ObjectT:
        """Poll until `status` is in `done`: every `interval` seconds when given, else from 0.5 s backing off
        to `max_interval` while nothing changes. Rides out answers worth retrying (a restarting server) for
        up to 5 minutes in a row."""
        first, longest = (interval, interval) if interval is not None else (FIRST_POLL_S, max_interval)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple[Any, ...] | None = None
        failing_since: float | None = None
        delay = first
        while True:
            try:
                current = fetch()
                failing_since = None
            except QaasError as exc:
                failing_since = failing_since or time.monotonic()
                if not exc.retryable or time.monotonic() - failing_since > 300:
                    raise
            else:
                state = (current.status, current.raw.get("progress"))
                if state != last:
                    last, delay = state, first
                    if callback:
                        callback(current)
                if current.status in done:
                    return current
            if deadline is not None and time.monotonic() >= deadline:
                status = last[0] if last else "unknown"
                raise WaitTimeout(0, "wait_timeout", f"still {status} after {timeout:.0f} s")
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, max(longest, first))

    def wait_model(
        self, model: str | Mapping[str, Any], *, timeout: float | None = 600, interval: float | None = None
    ) -> Model:
        """Poll until the model is inspected: status ready, or invalid with `error` saying why."""
        return self._poll(lambda: self.model(model), INSPECTED, timeout, interval, 2.0, None)

    def wait_dataset(
        self, dataset: str | Mapping[str, Any], *, timeout: float | None = 600, interval: float | None = None
    ) -> Dataset:
        """Poll until the dataset is inspected: status ready, or invalid with `error` saying why."""
        return self._poll(lambda: self.dataset(dataset), INSPECTED, timeout, interval, 2.0, None)

    def wait(
        self,
        job: str | Mapping[str, Any],
        *,
        timeout: float | None = 3600,
        interval: float | None = None,
        max_interval: float = 5.0,
        callback: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job succeeded, failed or was cancelled; `callback` sees each change of status or
        progress. Polls every `interval` seconds when given (a benchmark timing the end of a job), else
        from 0.5 s up to `max_interval` while nothing changes. Raises WaitTimeout after `timeout` seconds
        (None: no limit); the job goes on."""
        return self._poll(lambda: self.job(job), TERMINAL, timeout, interval, max_interval, callback)

    # --- downloads ----------------------------------------------------------------------------------------

    def download(self, job: str | Mapping[str, Any], name: str, dest: str | Path) -> Path:
        """Stream an artifact to `dest` (a file, or an existing folder to put it in) and check its sha256
        against the ETag (else the job's listing); nothing is left at `dest` when they differ."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with self._http.stream(
                "GET", f"/v1/jobs/{_id(job)}/artifacts/{name}", headers=self._headers
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                with open(tmp, "wb") as handle:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        handle.write(chunk)
                expected = _sha256_header(response.headers)
        except httpx.TransportError as exc:
            tmp.unlink(missing_ok=True)
            raise QaasConnectionError(0, "connection_failed", f"download of {name} broke off: {exc}") from exc
        if expected is None:
            listed = job if isinstance(job, Job) else self.job(job)
            expected = listed.artifact(name).sha256
        if expected != digest.hexdigest():
            tmp.unlink(missing_ok=True)
            raise QaasError(
                200,
                "checksum_mismatch",
                f"{name} arrived with sha256 {digest.hexdigest()}, expected {expected}: retry",
            )
        tmp.replace(dest)
        return dest

    def download_all(self, job: str | Mapping[str, Any], folder: str | Path) -> list[Path]:
        """Every artifact of a finished job into `folder` (created), each checked against its sha256."""
        listed = job if isinstance(job, Job) else self.job(job)
        for artifact in listed.artifacts:  # names come from the server: none may leave the folder
            if Path(artifact.name).name != artifact.name or artifact.name in ("", ".", ".."):
                raise QaasError(200, "unsafe_artifact_name", f"refusing to write artifact {artifact.name!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [self.download(listed, artifact.name, folder / artifact.name) for artifact in listed.artifacts]


def _sha256_header(headers: httpx.Headers) -> str | None:
    """The sha256 in hex from the ETag, else from Repr-Digest (RFC 9530); None when neither has one."""
    etag = headers.get("etag", "").removeprefix("W/").strip('"')
    if len(etag) == 64:
        return etag.lower()
    for item in headers.get("repr-digest", "").split(","):
        algorithm, _, value = item.strip().partition("=")
        if algorithm == "sha-256" and value.startswith(":") and value.endswith(":"):
            return base64.b64decode(value.strip(":")).hex()
    return None
