"""Load check: `python -m bench.load [--pollers 200] [--uploaders 20] [--upload-mb 20] [--duration 60]
[--markdown FILE]`. See bench/README.md ("Load check").

`qaas serve` (bench.service.Server, per-key rate limit off) in a temporary data folder, or the service at
`--server URL`; one small dataset (and a tiny static job) to poll. Then, for `--duration` seconds and from one
asyncio event loop with one httpx.AsyncClient: `--pollers` pollers, each sending `GET` of the job (or the
dataset) once a second, and `--uploaders` uploaders, each POSTing a `--upload-mb` MB file of random bytes to
/v1/datasets again and again (streamed multipart; the worker marks them invalid). It prints poll latencies,
upload throughput, the responses by status class, the API process's memory (before, peak, after a rest), the
data folder's size and the temporary upload files left behind. Exit status 1 when any answer was a 5xx or any
request failed without an answer (connection error, timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.poll import _percentile
from bench.tables import Table, environment, fmt

__all__ = ["Calls", "LoadResult", "main", "run_load"]

MIB = 1024 * 1024
POLL_INTERVAL_S = 1.0  # each poller: one GET a second
POLL_TIMEOUT_S = 10.0
UPLOAD_TIMEOUT_S = 120.0  # httpx's per-operation timeout (connect, each read, each write)
END_GRACE_S = 180.0  # uploads still running this long after the end are cancelled
SAMPLE_S = 0.5
CHUNK = MIB
NONCE_BYTES = 16
# The load check measures the API, not the quotas: 20 uploaders outpace one worker's inspections.
RATE_LIMIT_OFF = {"QAAS_RATE_LIMIT_RPS": "0", "QAAS_QUOTA_INSPECTING": "0"}
ENV_KEYS = ("date", "cpu", "logical cpus", "python", "load average (1, 5, 15 min) at start")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- memory of the server's processes ----------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """VmRSS of one process, from /proc/PID/status; None when it is gone (or not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _tree(root: int) -> list[int]:
    """root and all its descendants (the worker and its runners), from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_rss_bytes(pid: int) -> int | None:
    sizes = [rss_bytes(p) for p in _tree(pid)]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


class MemorySampler(threading.Thread):
    """The API process's RSS and its process tree's, every SAMPLE_S seconds; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak: int | None = None
        self.peak_tree: int | None = None
        self.history: list[tuple[float, int | None]] = []  # (time.perf_counter(), API RSS)
        self._done = threading.Event()

    def sample(self) -> tuple[int | None, int | None]:
        api, tree = rss_bytes(self.pid), tree_rss_bytes(self.pid)
        if api is not None:
            self.peak = max(self.peak or 0, api)
        if tree is not None:
            self.peak_tree = max(self.peak_tree or 0, tree)
        self.history.append((time.perf_counter(), api))
        return api, tree

    def run(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


# --- the data folder ---------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def files_in(folder: Path, pattern: str = "*") -> list[Path]:
    return [p for p in folder.glob(pattern) if p.is_file()] if folder.is_dir() else []


# --- counting requests -------------------------------------------------------------------------------------


@dataclass
class Calls:
    """What one kind of request got: latencies of the 2xx answers, answers by status, failures by kind."""

    name: str
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx answers only
    events: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, done, status; 0: none)
    late: list[float] = field(default_factory=list)  # seconds the sender started a request past its time
    statuses: Counter[int] = field(default_factory=Counter)
    timeouts: int = 0
    connection_errors: int = 0
    other_errors: int = 0
    cancelled: int = 0  # still unanswered END_GRACE_S after the end
    ok_bytes: int = 0
    messages: Counter[str] = field(default_factory=Counter)

    def answer(self, status: int, sent: float, nbytes: int = 0) -> None:
        done = time.perf_counter()
        self.events.append((sent, done, status))
        self.statuses[status] += 1
        if 200 <= status < 300:
            self.latencies.append(done - sent)
            self.ok_bytes += nbytes

    def failure(self, exc: BaseException, sent: float) -> None:
        import httpx

        self.events.append((sent, time.perf_counter(), 0))

        if isinstance(exc, httpx.TimeoutException):
            self.timeouts += 1
        elif isinstance(exc, httpx.TransportError):
            self.connection_errors += 1
        else:
            self.other_errors += 1
        self.messages[f"{type(exc).__name__}: {exc}".removesuffix(": ")[:160]] += 1

    def by_class(self, digit: int) -> int:
        return sum(n for status, n in self.statuses.items() if status // 100 == digit)

    @property
    def ok(self) -> int:
        return self.by_class(2)

    @property
    def last_done(self) -> float | None:
        return max((done for _, done, _ in self.events), default=None)

    @property
    def failed(self) -> int:
        return self.timeouts + self.connection_errors + self.other_errors

    def merged(self, other: Calls, name: str) -> Calls:
        out = Calls(name)
        for part in (self, other):
            out.latencies += part.latencies
            out.events += part.events
            out.late += part.late
            out.statuses.update(part.statuses)
            out.timeouts += part.timeouts
            out.connection_errors += part.connection_errors
            out.other_errors += part.other_errors
            out.cancelled += part.cancelled
            out.ok_bytes += part.ok_bytes
            out.messages.update(part.messages)
        return out


@dataclass
class LoadResult:
    pollers: int
    uploaders: int
    upload_bytes: int
    duration_s: float
    polls: dict[str, Calls]  # by target: "job", "dataset"
    uploads: Calls
    poller_counts: Counter[str] = field(default_factory=Counter)  # pollers per target
    start: float = 0.0  # time.perf_counter() when the load began
    elapsed_s: float = 0.0  # from the start to the last answer
    sender_cpu_pct: float = 0.0  # this process's CPU time over the wall time, in % of one core
    notes: list[str] = field(default_factory=list)
    # the server (None: not known, e.g. --server without --server-pid / --data-dir)
    rss_before: int | None = None
    rss_peak: int | None = None
    rss_end: int | None = None
    rss_after: int | None = None
    tree_before: int | None = None
    tree_peak: int | None = None
    tree_after: int | None = None
    rest_s: float = 0.0
    data_before: int | None = None
    data_after: int | None = None
    stored_uploads: int | None = None
    temp_files: list[str] | None = None
    memory: list[tuple[float, int | None]] = field(default_factory=list)  # (time.perf_counter(), API RSS)
    stop_s: float | None = None  # SIGINT to exit of `qaas serve` (when this run started it)
    stop_code: int | None = None

    @property
    def all_polls(self) -> Calls:
        out = Calls("all polls")
        for calls in self.polls.values():
            out = out.merged(calls, "all polls")
        return out

    @property
    def fivexx(self) -> int:
        return self.all_polls.by_class(5) + self.uploads.by_class(5)

    @property
    def unanswered(self) -> int:
        return self.all_polls.failed + self.uploads.failed

    @property
    def passed(self) -> bool:
        return self.fivexx == 0 and self.unanswered == 0 and (self.all_polls.ok > 0 or not self.pollers)


# --- the load ----------------------------------------------------------------------------------------------


def multipart_file(payload: bytes, filename: str) -> tuple[dict[str, str], Iterator[bytes], int]:
    """A multipart/form-data body with one part named 'file': (headers, chunks, length). The file's first
    NONCE_BYTES are new random bytes, so that no two uploads are the same file."""
    boundary = secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    view = memoryview(payload)

    def chunks() -> Iterator[bytes]:
        yield head + secrets.token_bytes(NONCE_BYTES)
        for start in range(NONCE_BYTES, len(payload), CHUNK):
            yield bytes(view[start : start + CHUNK])
        yield tail

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    headers["Content-Length"] = str(len(head) + len(payload) + len(tail))
    return headers, chunks(), len(payload)


async def _stream(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _poller(client: Any, path: str, calls: Calls, due: float, end: float) -> None:
    """GET `path` once every POLL_INTERVAL_S from `due` until `end`; never more than one request in flight
    (a poller whose answer came late sends the next at once, without catching up on the missed ones)."""
    import httpx

    while due < end:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.perf_counter()
        calls.late.append(sent - due)
        try:
            response = await client.get(path, timeout=POLL_TIMEOUT_S)
            calls.answer(response.status_code, sent)
        except httpx.HTTPError as exc:
            calls.failure(exc, sent)
        due = max(due + POLL_INTERVAL_S, time.perf_counter())


async def _uploader(client: Any, payload: bytes, calls: Calls, end: float) -> None:
    """POST the payload to /v1/datasets, again and again, until `end` (the one in flight then finishes)."""
    import httpx

    while time.perf_counter() < end:
        headers, chunks, size = multipart_file(payload, "load-check.npz")
        sent = time.perf_counter()
        try:
            response = await client.post(
                "/v1/datasets", content=_stream(chunks), headers=headers, timeout=UPLOAD_TIMEOUT_S
            )
            calls.answer(response.status_code, sent, size)
        except httpx.HTTPError as exc:
            calls.failure(exc, sent)
            await asyncio.sleep(0.1)  # no tight loop against a server that refuses connections


async def run_load(
    url: str,
    targets: list[tuple[str, str]],
    *,
    pollers: int,
    uploaders: int,
    upload_bytes: int,
    duration_s: float,
    key: str | None = None,
) -> LoadResult:
    """The load itself: `targets` are (label, path) to poll; poller i polls targets[i % len(targets)]."""
    import httpx

    payload = os.urandom(max(upload_bytes, NONCE_BYTES + 1))
    polls = {label: Calls(f"GET {path.rsplit('/', 1)[0]}/{{id}}") for label, path in targets}
    result = LoadResult(pollers, uploaders, len(payload), duration_s, polls, Calls("POST /v1/datasets"))
    connections = pollers + uploaders + 8
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, limits=limits, headers=headers) as client:
        for label, path in targets:  # warm-up: the routes answer before the load starts
            (await client.get(path, timeout=POLL_TIMEOUT_S)).raise_for_status()
            log(f"[load] {label}: GET {path} answers 200")
        cpu0, start = time.process_time(), time.perf_counter()
        result.start = start
        end = start + duration_s
        owner: dict[asyncio.Task[None], Calls] = {}
        for i in range(pollers):
            label, path = targets[i % len(targets)]
            result.poller_counts[label] += 1
            due = start + i * POLL_INTERVAL_S / pollers  # the pollers' phases spread over the interval
            owner[asyncio.create_task(_poller(client, path, polls[label], due, end))] = polls[label]
        for _ in range(uploaders):
            owner[asyncio.create_task(_uploader(client, payload, result.uploads, end))] = result.uploads
        _, pending = await asyncio.wait(owner, timeout=duration_s + END_GRACE_S)
        for task in pending:  # a poller cannot outlive POLL_TIMEOUT_S; an upload can
            task.cancel()
            owner[task].cancelled += 1
        await asyncio.gather(*pending, return_exceptions=True)
        result.elapsed_s = time.perf_counter() - start
        result.sender_cpu_pct = 100 * (time.process_time() - cpu0) / result.elapsed_s
    return result


# --- what to poll ------------------------------------------------------------------------------------------


def prepare_targets(
    url: str, key: str | None, folder: Path, job: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Upload a small .npz dataset and, unless job == 'none', a tiny static job (bench.models' TinyCNN, as
    bench.run's poll table does): [(label, path to poll)], notes."""
    import numpy as np

    from qaas.client import Client

    notes = []
    small = folder / "small.npz"
    rng = np.random.default_rng(0)
    np.savez(small, x=rng.standard_normal((8, 16)).astype(np.float32))
    targets = []
    with Client(url, api_key=key, timeout=120) as client:
        dataset = client.upload_dataset(small, name="load-check-small")
        dataset = client.wait_dataset(dataset["id"], interval=0.2, timeout=300)
        log(f"[load] dataset {dataset['id']}: {dataset['status']} ({small.stat().st_size:,} bytes)")
        notes.append(f"dataset polled: {small.stat().st_size:,}-byte .npz, {dataset['status']}")
        if job != "none":
            from bench.models import prepare, tiny_cnn_case
            from bench.service import _job_options

            tiny = prepare(tiny_cnn_case(), folder / "tiny")
            model = client.upload_model(tiny.model_path, name="load-check-tiny")
            calibration = client.upload_dataset(tiny.calibration, name="load-check-tiny-calib")
            model = client.wait_model(model["id"], interval=0.2, timeout=300)
            calibration = client.wait_dataset(calibration["id"], interval=0.2, timeout=300)
            if model["status"] != "ready" or calibration["status"] != "ready":
                raise RuntimeError(
                    f"tiny model/dataset not ready: {model.get('error')} {calibration.get('error')}"
                )
            options, benchmark = _job_options(tiny, 3)
            submitted = client.submit(
                model["id"],
                mode="static",
                backend="fbgemm",
                calibration_dataset_id=calibration["id"],
                options=options,
                benchmark=benchmark,
            )
            if job == "wait":
                submitted = client.wait(submitted["id"], interval=0.2, timeout=900)
            log(f"[load] job {submitted['id']} ({tiny.case.name}, static fbgemm): {submitted['status']}")
            notes.append(
                f"job polled: {tiny.case.name} static fbgemm, {submitted['status']} when the load began"
            )
            targets.append(("job", f"/v1/jobs/{submitted['id']}"))
    targets.append(("dataset", f"/v1/datasets/{dataset['id']}"))
    return targets, notes


# --- tables ------------------------------------------------------------------------------------------------


def _ms(values: list[float], q: float) -> float | None:
    return _percentile(values, q) * 1000 if values else None


def _mb(value: int | None) -> float | None:
    return None if value is None else value / MIB


def _window(result: LoadResult, calls: Calls) -> float:
    """Seconds from the start of the load to the last answer of `calls` (at least the load's duration)."""
    last = calls.last_done
    return max(result.duration_s, 0.0 if last is None else last - result.start)


def tables(result: LoadResult) -> list[Table]:
    polls = Table(
        f"Load check: polls ({result.pollers} pollers, one GET a second each, {result.duration_s:g} s)",
        [
            "route",
            "pollers",
            "offered/s",
            "sent",
            "2xx",
            "achieved/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
        ],
    )
    everything = result.all_polls
    poll_window = _window(result, everything)
    rows = (
        [*result.polls.items(), ("all", everything)] if len(result.polls) > 1 else list(result.polls.items())
    )
    for label, calls in rows:
        count = result.pollers if label == "all" else result.poller_counts[label]
        polls.add(
            label if label == "all" else f"{label}: {calls.name}",
            count,
            count / POLL_INTERVAL_S,
            len(calls.events) + calls.cancelled,
            calls.ok,
            calls.ok / poll_window,
            _ms(calls.latencies, 0.5),
            _ms(calls.latencies, 0.95),
            _ms(calls.latencies, 0.99),
            max(calls.latencies) * 1000 if calls.latencies else None,
        )
    polls.notes = [
        "each poller sends one GET a second on its own schedule (the pollers' phases spread over the second) "
        "and never has more than one request in flight: a server that answers late lowers the achieved rate",
        f"achieved/s = 2xx answers / {fmt(poll_window, 1)} s (the start to the last poll's answer); latencies "
        f"of the 2xx answers, from the send to the whole body; a poll unanswered after {POLL_TIMEOUT_S:.0f} s "
        "is a timeout",
        f"the sender started polls late by {fmt(_ms(everything.late, 0.95))} ms at p95 and "
        f"{fmt(max(everything.late) * 1000 if everything.late else None)} ms at most (its own event loop's lag)",
    ]

    up = result.uploads
    uploads = Table(
        f"Load check: uploads (POST /v1/datasets, {result.uploaders} uploaders)",
        ["uploaders", "MB each", "sent", "2xx", "MB/s (2xx)", "p50 s", "max s", "cancelled at end"],
    )
    uploads.add(
        result.uploaders,
        result.upload_bytes / MIB,
        len(up.events) + up.cancelled,
        up.ok,
        up.ok_bytes / MIB / _window(result, up),
        statistics.median(up.latencies) if up.latencies else None,
        max(up.latencies) if up.latencies else None,
        up.cancelled,
    )
    uploads.notes = [
        "each uploader POSTs a file of random bytes (named .npz; the worker marks it invalid) as multipart, "
        f"streamed in {CHUNK // MIB} MiB chunks, one after the other until the end; the one in flight then "
        f"finishes (cancelled if still running {END_GRACE_S:.0f} s later); MB = MiB",
        f"MB/s = MB of the 2xx uploads / {fmt(_window(result, up), 1)} s (the start to the last upload's "
        f"answer); an upload times out when one read or write waits {UPLOAD_TIMEOUT_S:.0f} s",
    ]

    statuses = Table(
        "Load check: answers by status class",
        ["requests", "2xx", "3xx", "4xx", "5xx", "timeouts", "connection errors"],
    )
    for calls in (everything, up):
        statuses.add(
            calls.name if calls is up else "GET (all polls)",
            *(calls.by_class(d) for d in (2, 3, 4, 5)),
            calls.timeouts,
            calls.connection_errors + calls.other_errors,
        )
    codes = everything.merged(up, "all").statuses
    statuses.notes = [f"status codes: {', '.join(f'{c}: {n:,}' for c, n in sorted(codes.items())) or 'none'}"]
    if codes.get(429):
        statuses.notes.append(
            "429s: the per-key rate limit or the inspection quota is on "
            "(QAAS_RATE_LIMIT_RPS=0 and QAAS_QUOTA_INSPECTING=0 turn them off)"
        )
    for message, n in (everything.messages + up.messages).most_common(5):
        statuses.notes.append(f"{n:,} x {message}")

    server = Table("Load check: the server", ["measure", "value", "note"])
    server.add(
        "API process RSS before the load, MB", _mb(result.rss_before), "qaas serve's main process (uvicorn)"
    )
    server.add("API process RSS peak, MB", _mb(result.rss_peak), f"sampled every {SAMPLE_S:g} s")
    server.add("API process RSS at the end of the load, MB", _mb(result.rss_end), "")
    server.add(
        "API process RSS after the rest, MB", _mb(result.rss_after), f"{result.rest_s:g} s without requests"
    )
    server.add("process tree RSS before / peak / after, MB", _triple(result), "API + worker + its runners")
    server.add("data folder before, MB", _mb(result.data_before), "")
    server.add("data folder after, MB", _mb(result.data_after), "files' sizes, after the rest")
    server.add("stored uploads (uploads/*.bin)", result.stored_uploads, "setup uploads included")
    server.add(
        "temporary upload files left (tmp/)",
        None if result.temp_files is None else len(result.temp_files),
        ", ".join(result.temp_files[:5]) if result.temp_files else "",
    )
    cores = os.cpu_count() or 1
    server.notes = [
        f"{cores} logical CPUs, shared: the load generator (this process, {result.sender_cpu_pct:.0f} % of one "
        "core over the load) runs beside the API, the worker and its runners on the same machine",
        *result.notes,
    ]
    server.add("qaas serve stop (SIGINT to exit), s", result.stop_s, _stop_note(result))
    return [polls, uploads, statuses, timeline(result), server]


def _stop_note(result: LoadResult) -> str:
    if result.stop_code is None:
        return ""
    if result.stop_code == -signal.SIGKILL:
        return "did not exit within 30 s of SIGINT: killed (SIGKILL)"
    return f"exit status {result.stop_code}"


def timeline(result: LoadResult) -> Table:
    """The load in slices of time (by when each request ended): where it went wrong, if it did."""
    polls, up = result.all_polls, result.uploads
    end = max(result.duration_s, *(_window(result, c) for c in (polls, up)))
    step = max(1.0, round(result.duration_s / 6))
    table = Table(
        f"Load check: timeline ({step:g} s slices, by when each request ended)",
        ["seconds", "polls 2xx", "poll p95 ms", "uploads 2xx", "5xx", "no answer", "API RSS MB"],
    )
    t = 0.0
    while t < end:

        def within(done: float, t: float = t) -> bool:
            return t <= done - result.start < t + step

        answered = [(done - sent, status) for sent, done, status in polls.events if within(done)]
        finished = [status for _, done, status in polls.events + up.events if within(done)]
        memory = [rss for at, rss in result.memory if within(at) and rss is not None]
        table.add(
            f"{t:g}-{t + step:g}",
            sum(1 for _, status in answered if 200 <= status < 300),
            _ms([s for s, status in answered if 200 <= status < 300], 0.95),
            sum(1 for _, done, status in up.events if within(done) and 200 <= status < 300),
            sum(1 for status in finished if status >= 500),
            sum(1 for status in finished if status == 0),
            _mb(max(memory)) if memory else None,
        )
        t += step
    table.notes = [
        f"the load ran from 0 to {result.duration_s:g} s; later rows are the answers to requests still in "
        "flight then (no answer: timeouts and connection errors, counted when they gave up)"
    ]
    return table


def _triple(result: LoadResult) -> str:
    values = (result.tree_before, result.tree_peak, result.tree_after)
    return "-" if all(v is None for v in values) else " / ".join(fmt(_mb(v), 0) for v in values)


def verdict(result: LoadResult) -> str:
    polls, up = result.all_polls, result.uploads
    failed = polls.failed + up.failed
    line = f"5xx answers: {result.fivexx:,}; requests without an answer (connection errors, timeouts): {failed:,}"
    if polls.ok == 0 and result.pollers:
        line += "; no poll was answered with a 2xx"
    return f"{'PASS' if result.passed else 'FAIL'}: {line}"


# --- main --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set (Server copies os.environ when it starts `qaas serve`)."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pollers", type=int, default=200, help="concurrent pollers, one GET a second each")
    parser.add_argument("--uploaders", type=int, default=20, help="concurrent uploaders")
    parser.add_argument("--upload-mb", type=float, default=20.0, help="size of each uploaded file, MiB")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rest", type=float, default=5.0, help="seconds without requests before 'after'")
    parser.add_argument(
        "--job",
        choices=("wait", "queued", "none"),
        default="wait",
        help="poll a tiny static job: finished before the load (wait), submitted just before it (queued), "
        "or none (poll only the dataset)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    parser.add_argument("--server", help="load this running service instead of starting `qaas serve`")
    parser.add_argument("--key", help="API key, sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--server-pid", type=int, help="with --server: its API process, for the memory rows")
    parser.add_argument("--data-dir", type=Path, help="with --server: its data folder, for the folder rows")
    parser.add_argument("--work", type=Path, help="keep the data folder and files here (default: a temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.pollers < 0 or args.uploaders < 0 or args.duration <= 0:
        raise SystemExit("--pollers and --uploaders must be >= 0 and --duration > 0")
    env = {k: v for k, v in environment(1).items() if k in ENV_KEYS}
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qaas-load-")))
        work.mkdir(parents=True, exist_ok=True)
        server = None
        if args.server:
            url, pid, data_dir = args.server.rstrip("/"), args.server_pid, args.data_dir
            where = f"the running service at {url}"
        else:
            from bench.service import Server

            log("[load] starting qaas serve (QAAS_RATE_LIMIT_RPS=0, QAAS_QUOTA_INSPECTING=0)")
            with _environ(RATE_LIMIT_OFF):
                server = stack.enter_context(Server(work / "service"))
            url, pid, data_dir = server.url, server.proc.pid if server.proc else None, server.folder / "var"
            where = (
                f"`qaas serve` started for this run ({url}, QAAS_RATE_LIMIT_RPS=0, QAAS_QUOTA_INSPECTING=0), "
                "data in a fresh folder"
            )
        targets, notes = prepare_targets(url, args.key, work, args.job)
        sampler = MemorySampler(pid) if pid else None
        before = sampler.sample() if sampler else (None, None)
        data_before = folder_bytes(data_dir) if data_dir else None
        if sampler:
            sampler.start()
        log(
            f"[load] {args.pollers} pollers, {args.uploaders} uploaders x {args.upload_mb:g} MB, "
            f"{args.duration:g} s against {url}"
        )
        result = asyncio.run(
            run_load(
                url,
                targets,
                pollers=args.pollers,
                uploaders=args.uploaders,
                upload_bytes=int(args.upload_mb * MIB),
                duration_s=args.duration,
                key=args.key,
            )
        )
        result.notes = [f"server: {where}", *notes]
        result.rss_before, result.tree_before, result.data_before = before[0], before[1], data_before
        if sampler:
            result.rss_end = sampler.sample()[0]
        log(f"[load] done in {result.elapsed_s:.1f} s; resting {args.rest:g} s")
        time.sleep(args.rest)
        result.rest_s = args.rest
        if sampler:
            result.rss_after, result.tree_after = sampler.sample()
            sampler.stop()
            result.rss_peak, result.tree_peak = sampler.peak, sampler.peak_tree
            result.memory = sampler.history
        if data_dir:
            result.data_after = folder_bytes(data_dir)
            result.stored_uploads = len(files_in(data_dir / "uploads", "*.bin"))
            result.temp_files = sorted(str(p.relative_to(data_dir)) for p in files_in(data_dir / "tmp"))
        if server is not None and server.proc is not None:
            log("[load] stopping qaas serve")
            stopping = time.perf_counter()
            server.__exit__()
            result.stop_s, result.stop_code = time.perf_counter() - stopping, server.proc.returncode
    out = tables(result)
    print(f"qaas load check, {env['date']}")
    print("\n".join(f"  {k}: {v}" for k, v in env.items() if k != "date"))
    for table in out:
        print()
        print(table.text())
    print()
    print(verdict(result))
    if args.markdown:
        command = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
        header = ["# qaas load check", "", f"Generated by `{command.strip()}`.", ""]
        header += [f"- **{k}**: {v}" for k, v in env.items()]
        body = ["\n".join(header), *(t.markdown() for t in out), f"**{verdict(result)}**"]
        args.markdown.write_text("\n\n".join(body) + "\n", encoding="utf-8")
        log(f"[load] wrote {args.markdown}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
