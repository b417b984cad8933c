"""Table 4: how fast the service answers job polls under load.

`GET /v1/jobs/{id}` sent at a fixed rate from a second process with httpx, open loop: each request at its
scheduled time, whether or not the previous ones returned, so a server that falls behind shows it in the
latencies instead of slowing the sender.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.tables import Table, Target, fmt

__all__ = ["PollResult", "poll_load", "poll_table"]

POLL_TARGET_MS, POLL_TARGET_RATE = 20.0, 200.0
MAX_CONNECTIONS = 64
SEQUENTIAL_REQUESTS = 100
REQUEST_TIMEOUT_S = 5.0


@dataclass
class PollResult:
    rate: float
    seconds: float
    sent: int = 0
    ok: int = 0
    achieved_rate: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    late_p95_ms: float | None = None
    sequential_p50_ms: float | None = None
    error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _poll_async(url: str, path: str, rate: float, seconds: float) -> dict[str, Any]:
    """Send `rate * seconds` GETs, each at its scheduled time; wait at most REQUEST_TIMEOUT_S past the end.

    Returns {"results": [(latency s, ok, late s)] of the requests that finished, "unfinished": count,
    "elapsed": first scheduled send to last answer}.
    """
    import httpx

    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(20):  # warm-up: connections open, the route's code paths hot
            (await client.get(path)).raise_for_status()
        sequential = []  # one request at a time: the route's own cost, no queueing
        for _ in range(SEQUENTIAL_REQUESTS):
            sent = time.perf_counter()
            (await client.get(path)).raise_for_status()
            sequential.append(time.perf_counter() - sent)
        total = int(rate * seconds)
        start = time.perf_counter()
        results: list[tuple[float, bool, float]] = []
        finished = [start]

        async def one(i: int) -> None:
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                ok = (await client.get(path)).status_code == 200
            except httpx.HTTPError:
                ok = False
            finished[0] = time.perf_counter()
            results.append((finished[0] - sent, ok, sent - due))

        tasks = [asyncio.create_task(one(i)) for i in range(total)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + REQUEST_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {
        "results": results,
        "unfinished": len(pending),
        "elapsed": finished[0] - start,
        "sequential": sequential,
    }


def _poll_process(url: str, path: str, rate: float, seconds: float, queue: Any) -> None:
    try:
        queue.put(asyncio.run(_poll_async(url, path, rate, seconds)))
    except Exception as exc:  # reported in the table, not as a traceback from another process
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def poll_load(url: str, job_id: str, *, rate: float = POLL_TARGET_RATE, seconds: float = 10.0) -> PollResult:
    """GET /v1/jobs/{id} at `rate` per second for `seconds`, from a second process (spawned)."""
    result = PollResult(rate, seconds)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_poll_process, args=(url, f"/v1/jobs/{job_id}", rate, seconds, queue))
    process.start()
    try:
        answer = queue.get(timeout=seconds + 120)
    except Exception as exc:
        answer = {"error": f"no answer from the load process ({type(exc).__name__})"}
    process.join(timeout=10)
    if process.is_alive():
        process.terminate()
    if "error" in answer:
        result.error = answer["error"]
        return result
    rows = answer["results"]
    latencies = [r[0] * 1000 for r in rows if r[1]]
    result.sent, result.ok = len(rows) + answer["unfinished"], len(latencies)
    result.achieved_rate = result.ok / answer["elapsed"] if answer["elapsed"] > 0 else 0.0
    if latencies:
        result.p50_ms = statistics.median(latencies)
        result.p95_ms = _percentile(latencies, 0.95)
        result.p99_ms = _percentile(latencies, 0.99)
        result.max_ms = max(latencies)
    result.late_p95_ms = _percentile([r[2] * 1000 for r in rows], 0.95) if rows else None
    result.sequential_p50_ms = statistics.median(answer["sequential"]) * 1000
    return result


def poll_table(result: PollResult) -> tuple[Table, Target]:
    table = Table(
        "Poll load: GET /v1/jobs/{id}",
        ["target rate/s", "seconds", "sent", "ok", "achieved rate/s", "p50 ms", "p95 ms", "p99 ms", "max ms"],
    )
    table.add(
        result.rate,
        result.seconds,
        result.sent,
        result.ok,
        result.achieved_rate,
        result.p50_ms,
        result.p95_ms,
        result.p99_ms,
        result.max_ms,
    )
    table.notes = [
        "open loop from a second process (httpx, asyncio, up to "
        f"{MAX_CONNECTIONS} connections): each request is sent at its scheduled time; the sender itself "
        f"started requests late by {fmt(result.late_p95_ms)} ms at p95; requests without an answer "
        f"{REQUEST_TIMEOUT_S:.0f} s after the end count as not ok; achieved rate = ok answers per second "
        "from the first send to the last answer",
        "the embedded default: one `qaas serve` process (uvicorn) with SQLite, its worker idle; the sender "
        "runs on the same machine",
        f"one request at a time ({SEQUENTIAL_REQUESTS} in a row before the load): p50 "
        f"{fmt(result.sequential_p50_ms)} ms",
    ]
    if result.error:
        table.notes.append(f"failed: {result.error}")
    met = None
    if result.p95_ms is not None:
        met = result.p95_ms <= POLL_TARGET_MS and result.achieved_rate >= 0.95 * result.rate
    target = Target(
        f"poll p95 at {result.rate:.0f} requests/s",
        f"<= {POLL_TARGET_MS:.0f} ms (and >= 95 % of the rate achieved)",
        "-" if result.p95_ms is None else f"{result.p95_ms:.1f} ms at {result.achieved_rate:.0f}/s",
        met,
    )
    return table, target
