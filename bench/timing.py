"""The bench's own timer: runners interleaved run by run on one thread, so host noise hits them alike (the
engine's benchmark does the same; this one also times things that are not torch modules, e.g. ONNX Runtime)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["interleaved", "iterations_for", "torch_threads"]

WARMUP = 3


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for the block, under no_grad."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(previous)


def interleaved(runners: Mapping[str, Callable[..., Any]], iterations: int) -> dict[str, dict[str, float]]:
    """{name: {"p50", "p95"}} in ms: WARMUP untimed rounds, then `iterations` rounds of every runner in turn."""
    for _ in range(WARMUP):
        for run in runners.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(iterations):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: _summary(values) for name, values in samples.items()}


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {"p50": statistics.median(ordered), "p95": p95}


def iterations_for(seconds_per_round: float, budget_s: float, low: int, high: int) -> int:
    """How many timed rounds fit in `budget_s` when one round (every runner once) takes `seconds_per_round`."""
    if seconds_per_round <= 0:
        return high
    return max(low, min(high, int(budget_s / seconds_per_round)))


def probe(run: Callable[..., Any]) -> float:
    """Seconds one call takes (after one untimed call): to size the iterations of a timing run."""
    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
