"""The report page, the model's page and the comparison JSON, on jobs finished through the services."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.db import session_scope
from app.core.storage import get_storage
from app.models import JobMetrics as MetricsRow
from app.services import charts, reports
from app.services import jobs as job_service
from qaas.contract.formatting import PAGE, headline, worst_layers
from qaas.contract.metrics import JobMetrics
from tests.api.conftest import job_metrics, make_ready_model, upload

HOSTILE = "<script>alert(1)</script>"

# What a static job on a ResNet-18 reports (docs/architecture.md#the-metrics-document), plus an auto-mode
# comparison and a layer whose name came from a hostile upload.
METRICS: dict[str, Any] = {
    "size": {
        "fp32_bytes": 46_830_571,
        "int8_bytes": 11_792_385,
        "ratio": 3.971,
        "int8_weight_bytes": 11_690_112,
        "int8_code_bytes": 98_304,
    },
    "latency": [
        {
            "batch_size": 1,
            "threads": 1,
            "fp32_ms": {"p50": 12.482, "p95": 13.91},
            "int8_ms": {"p50": 3.104, "p95": 3.52},
            "speedup": 4.021,
            "fp32_same_build_ms": {"p50": 10.951, "p95": 11.8},
            "speedup_same_build": 3.528,
        },
        {
            "batch_size": 8,
            "threads": 1,
            "fp32_ms": {"p50": 88.31, "p95": 92.4},
            "int8_ms": {"p50": 19.87, "p95": 21.2},
            "speedup": 4.444,
            "fp32_same_build_ms": {"p50": 80.2, "p95": 83.0},
            "speedup_same_build": 4.036,
        },
    ],
    "fidelity": {"sqnr_db": 27.41, "cosine": 0.998871, "max_abs_error": 0.3127, "top1_agreement": 0.984},
    "verification": {"fresh_process": True, "batches": 8, "samples": 64},
    "accuracy": {"fp32": 69.76, "int8": 69.34, "delta": -0.42},
    "layers": {
        "quantized": 21,
        "float": 1,
        "per_layer": [
            {"name": "conv1", "type": "Conv2d", "sqnr_db": 31.2},
            {"name": "layer1.0.conv1", "type": "Conv2d", "sqnr_db": 38.5},
            {"name": "layer2.0.downsample.0", "type": "Conv2d", "sqnr_db": 33.9},
            {"name": "layer3.1.conv2", "type": "Conv2d", "sqnr_db": 26.3},
            {"name": "layer4.1.conv2", "type": "Conv2d", "sqnr_db": 17.9},
            {"name": HOSTILE, "type": "Linear", "sqnr_db": 24.7},
        ],
    },
    "environment": {
        "cpu": "Intel(R) Xeon(R) Platinum 8480+",
        "isa": ["avx2", "avx512_vnni", "amx_int8", "amx_tile"],
        "torch": "2.13.0+cpu",
        "engine": "x86",
        "threads": 1,
        "load_average": 0.42,
    },
    # As workers/engine/backends.py records them: one entry per candidate, an error for one that failed.
    "backends": {
        "fbgemm": {"int8_ms_p50": 4.21, "cosine": 0.99871, "artifact": "model.int8.ts"},
        "x86": {"int8_ms_p50": 3.104, "cosine": 0.998871, "artifact": "model.int8.ts"},
    },
    "backend_choice": "x86 is the fastest int8 model (x86 3.1 ms, fbgemm 4.21 ms)",
    "warnings": [
        "int8 is not faster than fp32 compiled the same way (TorchScript) at batch 64",
        "accuracy is measured on the first 1000 evaluation samples",
    ],
}
SNIPPET = 'import torch\ntorch.backends.quantized.engine = "x86"\nmodel = torch.jit.load("model.int8.ts")\ny = model(x)\n'


def submit(client: TestClient, model_id: str, **body: Any) -> str:
    response = client.post(
        "/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "auto"} | body
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def finish_job(job_id: str, data_dir: Path, metrics: dict[str, Any], backend: str = "x86") -> None:
    """Claim and succeed a job through the services, as a worker would, with one stored artifact."""
    source = data_dir / f"{job_id}.bin"
    source.write_bytes(b"int8 torchscript archive" * 400)
    key = f"artifacts/{job_id}/attempt-1/model.int8.ts"
    size, sha = get_storage().store_file(source, key)
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w1", 30) is not None
    with session_scope() as session:
        assert job_service.succeed_job(
            session,
            job_id,
            "w1",
            backend=backend,
            metrics=metrics,
            artifacts=[job_service.StoredArtifact("model.int8.ts", "torchscript", size, sha, key)],
            load_snippet=SNIPPET,
            manifest={"qaas_engine": "0.1.0", "mode": "dynamic", "torch": "2.13.0", "seed": 0},
            runner={"protections": ["rlimits", "no_network", "landlock"]},
        )


def test_report_page_shows_the_numbers_charts_and_escapes_values(
    client: TestClient, service_env: Path
) -> None:
    job_id = submit(client, make_ready_model(client))
    before = client.get(f"/v1/jobs/{job_id}/report.html")
    assert before.status_code == 404
    assert before.json()["error"] == "report_not_found" and before.json()["detail"]
    finish_job(job_id, service_env, METRICS)

    response = client.get(f"/v1/jobs/{job_id}/report.html")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert page.count("<svg") == 2
    # The headline numbers, formatted from the metrics (size ratio and batch-1 speedup 2 decimals, etc.).
    assert f"{METRICS['size']['ratio']:.2f}×" in page  # 3.97×
    assert f"{METRICS['latency'][0]['speedup']:.2f}×" in page  # 4.02×
    assert f"{METRICS['latency'][0]['speedup_same_build']:.2f}×" in page  # 3.53×
    assert f"{METRICS['accuracy']['delta']:+.2f} pp" in page  # -0.42 pp
    assert f"{METRICS['fidelity']['cosine']:.6f}" in page
    assert f"{METRICS['fidelity']['sqnr_db']:.1f} dB" in page
    assert "loaded in a fresh process, on 64 samples" in page
    # Both batch sizes are charted, with values on the bars; layers worst first.
    assert "int8 4.44× faster" in page and ">88.3<" in page and ">19.9<" in page
    names = re.findall(r'class="layer-name"[^>]*><title>([^<:]*)', page)
    assert names[:2] == ["layer4.1.conv2 (Conv2d)", "&lt;script&gt;alert(1)&lt;/script&gt; (Linear)"]
    # A hostile layer name is text, never markup.
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page
    # Warnings, auto-mode comparison, environment, artifacts and snippet.
    for text in METRICS["warnings"] + [
        METRICS["backend_choice"],
        "Intel(R) Xeon(R) Platinum 8480+",
        "amx_int8",
    ]:
        assert text in page
    assert "<th>int8_ms_p50</th>" in page and "<b>x86</b> (kept)" in page
    assert 'href="artifacts/model.int8.ts"' in page
    [artifact] = client.get(f"/v1/jobs/{job_id}").json()["artifacts"]
    assert artifact["sha256"] in page
    assert "torch.backends.quantized.engine = &#34;x86&#34;" in page
    # Self-contained: nothing is fetched from anywhere.
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img|iframe|object)\b", page)
    # Links are relative (/v1/jobs/{id}/ is the base), so that they work behind a proxy's path prefix.
    model_id = client.get(f"/v1/jobs/{job_id}").json()["model_id"]
    assert f'href="../../models/{model_id}/jobs.html"' in page


def test_report_page_without_optional_parts(client: TestClient, service_env: Path) -> None:
    job_id = submit(client, make_ready_model(client))
    # The least a document holds (qaas.contract.metrics.JobMetrics): size, latency (none measured), fidelity.
    least = job_metrics(ratio=4.0) | {"latency": [], "layers": {"quantized": 2, "float": 0, "per_layer": []}}
    finish_job(job_id, service_env, least, backend="fbgemm")
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert "no per-layer data" in page and "no latency measurements" in page
    assert 'id="verified"' not in page and 'id="unreadable"' not in page
    assert "4.00×" in page and "<svg" not in page and "Backend choice" not in page


def _store_metrics(job_id: str, data: Any) -> None:
    """Overwrite a finished job's stored document, as a row written before the contract may hold one."""
    with session_scope() as session:
        session.execute(update(MetricsRow).where(MetricsRow.job_id == job_id).values(data=data))


def test_report_page_of_a_document_that_does_not_validate(client: TestClient, service_env: Path) -> None:
    """An unreadable optional part is left out and named; without a readable size, latency and fidelity the
    page shows no numbers, says why, and still shows what the job itself holds (a 200, never a 500)."""
    job_id = submit(client, make_ready_model(client))
    finish_job(job_id, service_env, METRICS)
    _store_metrics(job_id, METRICS | {"accuracy": {"fp32": "high"}, "verification": []})
    page = client.get(f"/v1/jobs/{job_id}/report.html")
    assert page.status_code == 200
    assert "Parts of the metrics left out" in page.text
    assert "metrics.accuracy.int8: Field required" in page.text and "metrics.verification: " in page.text
    assert "3.97×" in page.text and "4.02×" in page.text and page.text.count("<svg") == 2
    assert " pp<" not in page.text and 'id="verified"' not in page.text  # the accuracy card is left out

    _store_metrics(job_id, {"size": {"fp32_bytes": 100, "int8_bytes": 25}, "latency": "fast"})
    page = client.get(f"/v1/jobs/{job_id}/report.html")
    assert page.status_code == 200
    assert "Metrics not shown" in page.text and "so its numbers are not shown" in page.text
    for problem in (
        "metrics.size.ratio: Field required",
        "metrics.latency: ",
        "metrics.fidelity: Field required",
    ):
        assert problem in page.text
    assert (
        'class="cards"' not in page.text and "<svg" not in page.text and 'id="environment"' not in page.text
    )
    assert 'href="artifacts/model.int8.ts"' in page.text and 'id="load-snippet"' in page.text
    assert 'href="report"' in page.text  # the document as stored


def test_read_metrics_names_at_most_a_few_problems() -> None:
    metrics, problems = reports.read_metrics(METRICS)
    assert metrics is not None and problems == [] and metrics.size.ratio == METRICS["size"]["ratio"]
    bad_layers = [{"name": f"l{i}"} for i in range(500)]
    metrics, problems = reports.read_metrics(METRICS | {"layers": {"per_layer": bad_layers}})
    assert metrics is not None and metrics.layers is None and metrics.accuracy is not None
    assert len(problems) == reports.MAX_PROBLEMS + 1 and problems[-1].startswith("and ")
    unreadable: list[Any] = [None, [], "metrics", {"fidelity": METRICS["fidelity"]}]
    for broken in unreadable:
        metrics, problems = reports.read_metrics(broken)
        assert metrics is None and problems and all(p.startswith("metrics") for p in problems), problems


def test_unknown_job_and_model_are_404_with_the_error_schema(client: TestClient) -> None:
    for path, code in [
        ("/v1/jobs/job_missing/report.html", "job_not_found"),
        ("/v1/models/mdl_missing/jobs", "model_not_found"),
        ("/v1/models/mdl_missing/jobs.html", "model_not_found"),
    ]:
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"] == code and response.json()["detail"]


def test_model_jobs_compare_side_by_side(client: TestClient, service_env: Path) -> None:
    model_id = make_ready_model(client)
    first = submit(client, model_id)
    second = submit(client, model_id, backend="fbgemm")
    queued = submit(client, model_id)
    finish_job(first, service_env, METRICS)
    worse = copy.deepcopy(METRICS)
    worse["size"]["ratio"] = 3.5
    worse["latency"][0]["speedup"] = 2.9
    worse["fidelity"] |= {"sqnr_db": 30.2, "cosine": 0.9991}
    worse["accuracy"]["delta"] = -0.1
    finish_job(second, service_env, worse, backend="fbgemm")

    response = client.get(f"/v1/models/{model_id}/jobs")
    assert response.status_code == 200
    body = response.json()
    assert body["next_cursor"] is None
    assert [item["id"] for item in body["items"]] == [queued, second, first]  # newest first
    by_id = {item["id"]: item for item in body["items"]}
    assert by_id[first] | {"created_at": None, "finished_at": None} == {
        "id": first,
        "status": "succeeded",
        "mode": "dynamic",
        "backend": {"requested": "auto", "chosen": "x86"},
        "error_code": None,
        "fp32_bytes": 46_830_571,
        "int8_bytes": 11_792_385,
        "size_ratio": 3.971,
        "speedup": 4.021,
        "sqnr_db": 27.41,
        "cosine": 0.998871,
        "accuracy_delta": -0.42,
        "created_at": None,
        "finished_at": None,
        "url": f"/v1/jobs/{first}",
        "report_url": f"/v1/jobs/{first}/report",
        "report_html_url": f"/v1/jobs/{first}/report.html",
    }
    assert by_id[second]["backend"] == {"requested": "fbgemm", "chosen": "fbgemm"}
    assert (by_id[second]["speedup"], by_id[second]["sqnr_db"]) == (2.9, 30.2)
    assert by_id[queued]["status"] == "queued" and by_id[queued]["report_html_url"] is None
    paged = client.get(f"/v1/models/{model_id}/jobs", params={"limit": 2}).json()
    assert [item["id"] for item in paged["items"]] == [queued, second]
    rest = client.get(f"/v1/models/{model_id}/jobs", params={"cursor": paged["next_cursor"]}).json()
    assert [item["id"] for item in rest["items"]] == [first]

    page = client.get(f"/v1/models/{model_id}/jobs.html")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    rows = re.findall(r'<tr class="job-row">(.*?)</tr>', page.text, flags=re.S)
    assert len(rows) == 3
    assert f'href="../../jobs/{second}/report.html"' in rows[1]
    assert f'href="../../jobs/{first}/report.html"' in rows[2]
    assert f'href="../../jobs/{queued}"' in rows[0]  # no report yet: the job itself
    # The best value of each column is marked: the first job is faster and smaller, the second more faithful.
    assert '<td class="num best" title="best of these jobs">4.02×</td>' in rows[2]
    assert '<td class="num best" title="best of these jobs">30.2 dB</td>' in rows[1]
    assert "http://" not in page.text and "https://" not in page.text


def test_model_page_escapes_the_model_name(client: TestClient) -> None:
    model_id = upload(client, "/v1/models", b"abc", name=HOSTILE).json()["id"]
    page = client.get(f"/v1/models/{model_id}/jobs.html").text
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "no jobs yet" in page


def test_routes_declare_the_error_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/jobs/{job_id}/report.html",
        "/v1/models/{model_id}/jobs",
        "/v1/models/{model_id}/jobs.html",
    ):
        operation = paths[path]["get"]
        assert operation["summary"] and operation["description"]
        for status in ("404", "422", "503"):
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorBody")


def _document(**parts: Any) -> JobMetrics:
    return JobMetrics.model_validate(job_metrics() | parts)


def test_chart_geometry_edge_cases() -> None:
    assert charts.nice_scale(0, 13.91) == (0, 15, [0, 5, 10, 15])
    assert charts.nice_scale(-4.9, 38.5, 5)[:2] == (-10, 40)
    assert charts.nice_scale(0, 0) == (0, 1, [0, 0.25, 0.5, 0.75, 1])
    many = _document(
        layers={
            "quantized": 51,
            "float": 0,
            "per_layer": [{"name": f"l{i}", "type": "Linear", "sqnr_db": 60 - i} for i in range(50)]
            + [{"name": "nan", "type": "ReLU", "sqnr_db": float("nan")}],
        }
    )
    chart = reports.layer_chart(worst_layers(many))
    assert chart is not None
    bars = [r for r in chart.rects if "swatch" not in r.css]
    assert len(bars) == reports.MAX_LAYER_BARS and bars[0].title == "l49 (Linear): 11.0 dB"
    assert all(b.width >= 0 and b.height > 0 for b in bars)
    nan_last = reports.layer_chart(worst_layers(many)[-3:])
    assert nan_last is not None and [t.text for t in nan_last.texts if t.css == "value"][-1] == "n/a"
    slower = _document(
        latency=[
            {
                "batch_size": 4,
                "threads": 1,
                "fp32_ms": {"p50": 1.0, "p95": 1.1},
                "int8_ms": {"p50": 1.25, "p95": 1.3},
                "speedup": 0.8,
            }
        ]
    )
    latency = reports.latency_chart(slower.latency)
    assert latency is not None and any(t.text == "int8 0.80× slower" for t in latency.texts)
    assert [c.label for c in headline(slower, PAGE)] == ["Smaller", "Slower", "Output cosine"]
    assert reports.latency_chart([]) is None and reports.layer_chart([]) is None
