"""The metrics agree with what a user can check by hand, and benchmarks take turns on the host's lock."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from qaas.contract.jobs import DynamicConfig, QATConfig, StaticConfig
from tests.conftest import fail_or_skip, processes_in
from tests.engine.conftest import FAST_BENCHMARK
from tests.engine.conftest_static import Digits
from workers.engine.api import QuantResult, quantize
from workers.engine.checks.bench import FALLBACK_LOCK, LOCK_FD_ENV
from workers.supervise import BENCH_LOCK_FD_ENV, supervise

pytest_plugins = ["tests.engine.conftest_static"]

ROOT = Path(__file__).resolve().parents[2]
RELEASE_AFTER_S = 0.2  # the holder lets go this long after the waiter said it waits


@pytest.fixture(scope="module")
def digits_static(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> QuantResult:
    return quantize(
        digits.pt2,
        StaticConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        out_dir=tmp_path_factory.mktemp("digits_static"),
        calibration=digits.train,
        eval_data=digits.test,
    )


def test_speedups_are_ratios_of_the_medians(digits_static: QuantResult) -> None:
    for row in digits_static.metrics["latency"]:
        fp32, int8, same = row["fp32_ms"]["p50"], row["int8_ms"]["p50"], row["fp32_same_build_ms"]["p50"]
        assert row["speedup"] == pytest.approx(fp32 / int8, abs=1e-3)
        assert row["speedup_same_build"] == pytest.approx(same / int8, abs=1e-3)


def test_sizes_are_the_files(digits_static: QuantResult, digits: Digits) -> None:
    size, artifact = digits_static.metrics["size"], digits_static.artifacts[0]
    assert size["int8_bytes"] == artifact.size_bytes == artifact.path.stat().st_size
    assert size["fp32_bytes"] == digits.pt2.stat().st_size  # the upload
    assert size["ratio"] == pytest.approx(size["fp32_bytes"] / size["int8_bytes"], abs=1e-3)


def test_accuracy_holds_for_the_artifact_loaded_from_disk(digits_static: QuantResult, digits: Digits) -> None:
    torch.backends.quantized.engine = "fbgemm"  # what the load snippet says
    model = torch.jit.load(str(digits_static.artifacts[0].path))
    with np.load(digits.test) as data:
        x, labels = torch.from_numpy(data["x"]), torch.from_numpy(data["labels"])
    with torch.no_grad():
        accuracy = 100 * float((model(x).argmax(1) == labels).double().mean())
    reported = digits_static.metrics["accuracy"]
    assert abs(accuracy - reported["int8"]) <= 0.5
    assert reported["fp32"] == pytest.approx(digits.accuracy, abs=1e-3)
    assert reported["delta"] == pytest.approx(reported["int8"] - reported["fp32"], abs=2e-3)
    assert reported["int8"] >= 90


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A lock file and a descriptor of it that holds the lock, as another job's benchmark would."""
    path = tmp_path / "bench.lock"
    path.touch()
    holder = os.open(path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        yield path, holder
    finally:
        os.close(holder)


def release_later(holder: int, released: threading.Event) -> None:
    def release() -> None:
        released.set()
        fcntl.flock(holder, fcntl.LOCK_UN)

    threading.Timer(RELEASE_AFTER_S, release).start()


def test_a_job_waits_for_the_host_lock_and_says_how_long(
    held_lock: tuple[Path, int], mlp_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine outside a runner takes the host's lock file itself (tempfile.gettempdir()/qaas-bench.lock)."""
    path, holder = held_lock
    monkeypatch.delenv(LOCK_FD_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(path.parent))
    path.rename(path.parent / FALLBACK_LOCK)
    released = threading.Event()
    said: list[str] = []

    def progress(stage: str, percent: float, message: str) -> None:
        if message.startswith("waiting for another benchmark") and not said:
            said.append(message)
            release_later(holder, released)

    result = quantize(
        mlp_pt2,
        DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        out_dir=tmp_path,
        progress=progress,
    )
    assert said and released.is_set()  # it waited, and went on only once the holder let go
    assert result.metrics["environment"]["bench_lock_wait_s"] > 0


WAITER = """
import json
from workers.engine.checks.bench import host_lock
with host_lock(on_wait=lambda: print("waiting", flush=True)) as lock:
    print(json.dumps({"held": lock.held, "waited_s": lock.waited_s}), flush=True)
"""


def test_two_processes_take_turns(held_lock: tuple[Path, int]) -> None:
    path, holder = held_lock
    path.rename(path.parent / FALLBACK_LOCK)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(path.parent),
    }
    child = subprocess.Popen([sys.executable, "-c", WAITER], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "waiting"  # blocked while this process holds the lock
    released = threading.Event()
    release_later(holder, released)
    seen = json.loads(child.stdout.readline())
    assert released.is_set() and seen["held"] is True and seen["waited_s"] > 0
    assert child.wait(timeout=60) == 0


RUNNER = """
import json, sys, time
from workers.engine.checks.bench import host_lock
def waiting():
    print(json.dumps({"event": "progress", "stage": "benchmarking", "percent": 75.0, "message": "waiting"}),
          flush=True)
with host_lock(on_wait=waiting) as lock:
    print(json.dumps({"event": "progress", "stage": "benchmarking", "percent": 80.0, "message": "holding"}),
          flush=True)
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    result = {"held": lock.held, "waited_s": lock.waited_s}
print(json.dumps({"event": "result", "result": result}), flush=True)
"""


def _free(path: Path) -> bool:
    """Whether this process can take the lock at once (nobody holds it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("given", ["path", "descriptor"])
def test_the_worker_holds_the_lock_for_the_sandboxed_runner(
    given: str, held_lock: tuple[Path, int], tmp_path: Path
) -> None:
    """Landlock keeps the runner from opening the lock by name, and the runner must hold nothing that could
    outlive it: it asks, the worker waits for the lock, holds it while the runner benchmarks, lets it go."""
    path, holder = held_lock
    released = threading.Event()
    held_while_benchmarking: list[bool] = []

    def relay(stage: str | None, percent: float | None, message: str | None) -> bool:
        if message == "waiting" and not released.is_set():
            release_later(holder, released)
        if message == "holding":
            held_while_benchmarking.append(not _free(path))
        return False

    mine = os.open(path, os.O_RDONLY)
    try:
        outcome = supervise(
            [sys.executable, "-c", textwrap.dedent(RUNNER), "0.5"],
            work_dir=tmp_path / "work",
            timeout_s=120,
            relay=relay,
            bench_lock=path if given == "path" else mine,
        )
    finally:
        os.close(mine)
    assert outcome.result is not None, outcome
    assert released.is_set() and outcome.result["held"] is True and outcome.result["waited_s"] > 0
    assert held_while_benchmarking == [True]
    assert _free(path) and not outcome.lock_notes


def test_a_runner_that_waits_too_long_benchmarks_without_the_lock(
    held_lock: tuple[Path, int], tmp_path: Path
) -> None:
    path, _ = held_lock  # never released
    outcome = supervise(
        [sys.executable, "-c", textwrap.dedent(RUNNER)],
        work_dir=tmp_path / "work",
        timeout_s=60,
        bench_lock=path,
        bench_lock_wait_s=1.0,
    )
    assert outcome.result is not None, outcome
    assert outcome.result["held"] is False and outcome.result["waited_s"] >= 1.0
    assert len(outcome.lock_notes) == 1 and "without the host's benchmark lock" in outcome.lock_notes[0]


def test_a_runner_holding_the_lock_too_long_loses_it(tmp_path: Path) -> None:
    path = tmp_path / "bench.lock"
    path.touch()
    freed_at: list[float] = []

    def relay(stage: str | None, percent: float | None, message: str | None) -> bool:
        if message == "holding":
            started = time.monotonic()
            threading.Thread(target=lambda: freed_at.append(_wait_free(path) - started)).start()
        return False

    outcome = supervise(
        [sys.executable, "-c", textwrap.dedent(RUNNER), "4"],
        work_dir=tmp_path / "work",
        timeout_s=60,
        relay=relay,
        bench_lock=path,
        bench_lock_hold_s=1.0,
    )
    assert outcome.result is not None and outcome.result["held"] is True, outcome
    assert freed_at and 0.5 < freed_at[0] < 3.5  # given back at its limit, not when the runner said so
    assert len(outcome.lock_notes) == 1 and "its limit" in outcome.lock_notes[0]


def _wait_free(path: Path) -> float:
    deadline = time.monotonic() + 30
    while not _free(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return time.monotonic()


ESCAPER = """
import json, os, sys, time
from workers.engine.checks.bench import host_lock
lock = host_lock()
state = lock.__enter__()  # taken and never given back
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(120)  # a process left behind, in a session of its own
    os._exit(0)
print(json.dumps({"event": "result", "result": {"held": state.held}}), flush=True)
os._exit(0)
"""


def test_what_a_runner_leaves_behind_holds_no_lock(tmp_path: Path) -> None:
    """A runner that takes the lock, double-forks a setsid child and exits: when supervise returns the child
    is gone and the next runner gets the lock at once."""
    path = tmp_path / "bench.lock"
    path.touch()
    work = tmp_path / "work"
    outcome = supervise([sys.executable, "-c", ESCAPER], work_dir=work, timeout_s=60, bench_lock=path)
    assert outcome.result == {"held": True}, outcome
    if "own_pid_namespace" not in outcome.sandbox:
        fail_or_skip(f"no PID namespace for the runner here: {outcome.sandbox_gaps.get('own_pid_namespace')}")
    assert not processes_in(work)
    assert _free(path)
    again = supervise(
        [sys.executable, "-c", textwrap.dedent(RUNNER)],
        work_dir=tmp_path / "next",
        timeout_s=60,
        bench_lock=path,
    )
    assert (
        again.result == {"held": True, "waited_s": again.result["waited_s"]} and again.result["waited_s"] < 1
    )


def test_a_lock_path_that_is_not_an_empty_file_is_not_used(tmp_path: Path) -> None:
    """A link planted where the lock should be is never opened: the runner benchmarks without the lock."""
    secret = tmp_path / "secret.txt"
    secret.write_text("every tenant's API keys")
    planted = tmp_path / "bench.lock"
    planted.symlink_to(secret)
    for lock in (planted, secret):
        outcome = supervise(
            [sys.executable, "-c", textwrap.dedent(RUNNER)],
            work_dir=tmp_path / "w",
            timeout_s=60,
            bench_lock=lock,
        )
        assert outcome.result is not None and outcome.result["held"] is False, outcome
    assert LOCK_FD_ENV == BENCH_LOCK_FD_ENV  # the worker and the engine agree on the name


def test_qat_with_few_calibration_samples_warns(digits: Digits, tmp_path: Path) -> None:
    few = tmp_path / "few.npz"
    with np.load(digits.train) as data:
        np.savez(few, x=data["x"][:12], labels=data["labels"][:12])
    config = QATConfig(backend="fbgemm", benchmark=FAST_BENCHMARK, activation_observer="moving_average")
    result = quantize(digits.pt2, config, out_dir=tmp_path / "out", train=digits.train, calibration=few)
    assert result.manifest["calibration_samples"] == 12
    assert any(w.startswith("only 12 calibration samples were observed") for w in result.metrics["warnings"])
