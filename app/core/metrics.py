"""This API process's own Prometheus metrics, and the text exposition of GET /metrics.

What is true across processes (jobs, durations, runner exits) is read from the database at scrape time
(app.services.metrics); only what happens inside this process lives here: upload bytes, and the process's
CPU, memory and garbage collector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE", "count_upload", "exposition"]

# What generate_latest writes (our names need no UTF-8 escaping), understood by every Prometheus version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

UploadKind = Literal["model", "dataset"]

# Our own registry, not prometheus_client's global one: /metrics shows what qaas registers and nothing else.
REGISTRY = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

UPLOAD_BYTES = Counter(
    "qaas_upload_bytes",
    "Bytes of uploads accepted (stored and recorded) by this API process, by kind. Each API process counts "
    "its own: sum over instances.",
    ["kind"],
    registry=REGISTRY,
)
for _kind in ("model", "dataset"):
    UPLOAD_BYTES.labels(_kind)  # both series exist from the start, at 0


def count_upload(kind: UploadKind, size_bytes: int) -> None:
    """Count an upload once it is recorded."""
    UPLOAD_BYTES.labels(kind).inc(size_bytes)


class _Scrape:
    """One scrape: this process's registry, then families computed for this scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from self.families


def exposition(families: Iterable[Metric] = ()) -> bytes:
    """The Prometheus text format (CONTENT_TYPE) of this process's metrics and `families`."""
    return generate_latest(_Scrape(families))
