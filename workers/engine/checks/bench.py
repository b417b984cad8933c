"""Latency of fp32 against int8 on this host, the host facts that explain the numbers, and the host-wide lock
that keeps two benchmarks from sharing the CPU (docs/engine-notes.md#honest-benchmarks: benchmarks never share cores)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from qaas.contract.jobs import BenchmarkConfig
from workers.engine.cpu import cpu_info

__all__ = [
    "LOCK_FD_ENV",
    "LOCK_WAIT",
    "HostLock",
    "benchmark",
    "compare",
    "environment",
    "host_lock",
    "time_runs",
]

WARMUP_RUNS = 3
ISA_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
# In a runner the worker holds the host's lock for it: this variable names the two pipes to ask it through
# ("answers,requests"; workers.benchlock).
LOCK_FD_ENV = "QAAS_BENCH_LOCK_FD"
FALLBACK_LOCK = "qaas-bench.lock"  # in tempfile.gettempdir(), for the engine used outside a runner
LOCK_WAIT = "bench_lock_wait_s"  # Job.cache key: seconds a job's earlier benchmarks waited for the lock


def environment(threads: int) -> dict[str, Any]:
    """{cpu, isa, torch, engine, threads, load_average}: the facts that explain a benchmark."""
    info = cpu_info()
    cpu, isa = info["model"], [flag for flag in info["isa"] if flag in ISA_FLAGS]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return {
        "cpu": cpu,
        "isa": isa,
        "torch": torch.__version__,
        "engine": torch.backends.quantized.engine,
        "threads": threads,
        "load_average": round(load, 2),
    }


@dataclasses.dataclass
class HostLock:
    """What host_lock got: whether a lock is held (False: no lock file could be used) and the seconds it
    waited for another benchmark to finish."""

    held: bool = False
    waited_s: float = 0.0


def _inherited_pipes() -> tuple[int, int] | None:
    """(answers, requests): the pipes to the worker that holds the lock for this runner (workers.benchlock), when
    QAAS_BENCH_LOCK_FD names two open ones: a variable that outlived its descriptors (a child started without
    them) may name closed or reused ones."""
    answers, _, requests = os.environ.get(LOCK_FD_ENV, "").partition(",")
    if not (answers.isdigit() and requests.isdigit()):
        return None
    try:
        if all(stat.S_ISFIFO(os.fstat(int(fd)).st_mode) for fd in (answers, requests)):
            return int(answers), int(requests)
    except OSError:
        pass
    return None


def _open_fallback() -> int | None:
    path = os.path.join(tempfile.gettempdir(), FALLBACK_LOCK)
    # flock needs no write access. Without O_CREAT first: fs.protected_regular refuses O_CREAT on another
    # user's existing file in a sticky /tmp.
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_CREAT):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o666)
        except OSError:
            continue
    return None


def _acquire(fd: int, on_wait: Callable[[], None] | None) -> bool:
    """flock(LOCK_EX) on fd, calling on_wait before blocking; False where the file system refuses flock."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


def _ask(pipes: tuple[int, int], on_wait: Callable[[], None] | None) -> bool:
    """Ask the worker for the lock and wait for its answer; True when it holds the lock for this runner."""
    answers, requests = pipes
    try:
        os.write(requests, b"acquire\n")
        with os.fdopen(os.dup(answers), "rb", buffering=0) as stream:
            while True:
                word = stream.readline(64).strip()
                if word == b"wait" and on_wait is not None:
                    on_wait()
                elif word != b"wait":
                    return word == b"granted"
    except OSError:
        return False


@contextlib.contextmanager
def host_lock(on_wait: Callable[[], None] | None = None) -> Iterator[HostLock]:
    """Hold the host's benchmark lock for the block: one benchmark at a time per host.

    In a runner the worker holds the lock for it: it is asked through the pipes named by QAAS_BENCH_LOCK_FD,
    and may answer after a bounded wait that the block runs without it (workers.benchlock). Elsewhere the
    lock is `flock(LOCK_EX)` on tempfile.gettempdir()/qaas-bench.lock; where that cannot be used the block runs
    unlocked (a benchmark is worth more than the lock).

    Args:
        on_wait: called once, before blocking, when another benchmark holds the lock (to report the wait).

    Example:
        >>> with host_lock() as lock:
        ...     rows = benchmark(...)
        >>> lock.waited_s
        0.0
    """
    state = HostLock()
    start = time.monotonic()
    pipes = _inherited_pipes()
    if pipes is not None:
        state.held = _ask(pipes, on_wait)
        state.waited_s = round(time.monotonic() - start, 3)
        try:
            yield state
        finally:
            with contextlib.suppress(OSError):
                os.write(pipes[1], b"release\n")
        return
    fd = _open_fallback()
    try:
        if fd is not None and _acquire(fd, on_wait):
            state.held, state.waited_s = True, round(time.monotonic() - start, 3)
        try:
            yield state
        finally:
            if fd is not None and state.held:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if fd is not None:
            os.close(fd)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    mid = len(ordered) // 2
    p50 = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"p50": round(p50 * 1000, 4), "p95": round(p95 * 1000, 4)}


def _timed(fn: Callable[[Any], Any], inputs: Any) -> float:
    start = time.perf_counter()
    fn(inputs)
    return time.perf_counter() - start


def _speedup(baseline: dict[str, float], int8: dict[str, float]) -> float:
    return round(baseline["p50"] / int8["p50"], 3) if int8["p50"] > 0 else 0.0


def time_runs(
    runners: dict[str, Callable[[Any], Any]], inputs: Any, iterations: int
) -> dict[str, dict[str, float]]:
    """{name: {"p50", "p95"}} in ms: each runner on the same inputs, interleaved run by run after a warm-up,
    so that host noise hits them alike. The caller sets the threads and no_grad."""
    for _ in range(WARMUP_RUNS):
        for run in runners.values():
            run(inputs)
    samples: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(iterations):
        for key, run in runners.items():
            samples[key].append(_timed(run, inputs))
    return {key: _percentiles(values) for key, values in samples.items()}


def compare(
    runners: dict[str, Callable[[Any], Any]], inputs: Any, config: BenchmarkConfig
) -> dict[str, dict[str, float]]:
    """time_runs with the config's threads and iterations, under no_grad (auto's candidates, side by side)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.no_grad():
            return time_runs(runners, inputs, config.iterations)
    finally:
        torch.set_num_threads(previous)


def benchmark(
    fp32: Callable[[Any], Any],
    int8: Callable[[Any], Any],
    make_inputs: Callable[[int], Any],
    config: BenchmarkConfig,
    batch_sizes: list[int],
    fp32_same_build: Callable[[Any], Any] | None = None,
) -> list[dict[str, Any]]:
    """Time the models at each batch size, interleaved run by run so that host noise hits them alike.

    Args:
        fp32: runs the float model as uploaded on an input batch.
        int8: runs the int8 model (as reloaded from disk) on an input batch.
        make_inputs: builds an input batch of a given size.
        config: threads and iterations.
        batch_sizes: the batch sizes to time (the model's fixed batch replaces the asked ones upstream).
        fp32_same_build: runs the float model compiled the way the int8 one is (TorchScript or AOTInductor),
            so that the speedup from int8 alone can be told from the speedup of the build.

    Returns:
        [{batch_size, threads, fp32_ms {p50, p95}, int8_ms {p50, p95}, speedup}], speedup = fp32 p50 / int8 p50;
        with fp32_same_build, also fp32_same_build_ms and speedup_same_build.
    """
    runners = {"fp32": fp32, "int8": int8} | ({"same": fp32_same_build} if fp32_same_build else {})
    rows = []
    for batch_size in batch_sizes:
        ms = compare(runners, make_inputs(batch_size), config)
        row = {
            "batch_size": batch_size,
            "threads": config.threads,
            "fp32_ms": ms["fp32"],
            "int8_ms": ms["int8"],
            "speedup": _speedup(ms["fp32"], ms["int8"]),
        }
        if "same" in ms:
            row |= {
                "fp32_same_build_ms": ms["same"],
                "speedup_same_build": _speedup(ms["same"], ms["int8"]),
            }
        rows.append(row)
    return rows
