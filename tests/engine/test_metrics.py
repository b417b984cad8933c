"""The metrics agree with what a user can check by hand, and benchmarks take turns on the host's lock."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.conftest import FAST_BENCHMARK
from tests.engine.conftest_static import Digits
from workers.engine.api import QuantResult, quantize
from workers.engine.bench import LOCK_FD_ENV
from workers.engine.config import DynamicConfig, QATConfig, StaticConfig
from workers.supervise import BENCH_LOCK_FD_ENV, supervise

pytest_plugins = ["tests.engine.conftest_static"]

ROOT = Path(__file__).resolve().parents[2]
RELEASE_AFTER_S = 0.2  # the holder lets go this long after the waiter said it waits


@pytest.fixture(scope="module")
def digits_static(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> QuantResult:
    return quantize(
        digits.pt2,
        StaticConfig(benchmark=FAST_BENCHMARK),
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
    path, holder = held_lock
    passed = os.open(path, os.O_RDONLY)  # the runner's own description, as the worker passes it
    monkeypatch.setenv(LOCK_FD_ENV, str(passed))
    released = threading.Event()
    said: list[str] = []

    def progress(stage: str, percent: float, message: str) -> None:
        if message.startswith("waiting for another benchmark") and not said:
            said.append(message)
            release_later(holder, released)

    try:
        result = quantize(
            mlp_pt2, DynamicConfig(benchmark=FAST_BENCHMARK), out_dir=tmp_path, progress=progress
        )
    finally:
        os.close(passed)
    assert said and released.is_set()  # it waited, and went on only once the holder let go
    assert result.metrics["environment"]["bench_lock_wait_s"] > 0


WAITER = """
import json
from workers.engine.bench import host_lock
with host_lock(on_wait=lambda: print("waiting", flush=True)) as lock:
    print(json.dumps({"held": lock.held, "waited_s": lock.waited_s}), flush=True)
"""


def test_two_processes_take_turns(held_lock: tuple[Path, int]) -> None:
    path, holder = held_lock
    passed = os.open(path, os.O_RDONLY)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), LOCK_FD_ENV: str(passed)}
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", WAITER], env=env, pass_fds=(passed,), stdout=subprocess.PIPE, text=True
        )
    finally:
        os.close(passed)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "waiting"  # blocked while this process holds the lock
    released = threading.Event()
    release_later(holder, released)
    seen = json.loads(child.stdout.readline())
    assert released.is_set() and seen["held"] is True and seen["waited_s"] > 0
    assert child.wait(timeout=60) == 0


RUNNER = """
import json
from workers.engine.bench import host_lock
def waiting():
    print(json.dumps({"event": "progress", "stage": "benchmarking", "percent": 75.0, "message": "waiting"}),
          flush=True)
with host_lock(on_wait=waiting) as lock:
    result = {"held": lock.held, "waited_s": lock.waited_s}
print(json.dumps({"event": "result", "result": result}), flush=True)
"""


@pytest.mark.parametrize("given", ["path", "descriptor"])
def test_the_sandboxed_runner_gets_the_lock_open(
    given: str, held_lock: tuple[Path, int], tmp_path: Path
) -> None:
    """Landlock keeps the runner from opening the lock by name: the worker passes it open."""
    path, holder = held_lock
    released = threading.Event()

    def relay(stage: str | None, percent: float | None, message: str | None) -> bool:
        if message == "waiting" and not released.is_set():
            release_later(holder, released)
        return False

    mine = os.open(path, os.O_RDONLY)
    try:
        outcome = supervise(
            [sys.executable, "-c", textwrap.dedent(RUNNER)],
            work_dir=tmp_path / "work",
            timeout_s=120,
            relay=relay,
            bench_lock=path if given == "path" else mine,
        )
    finally:
        os.close(mine)
    assert outcome.result is not None, outcome
    assert released.is_set() and outcome.result["held"] is True and outcome.result["waited_s"] > 0
    # The worker kept no copy of the runner's description: the lock went with the runner.
    again = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(again)


SHOW_ENV = "import json, os; print(json.dumps({'event': 'result', 'result': dict(os.environ)}))"


def test_a_lock_path_that_is_not_an_empty_file_is_not_passed(tmp_path: Path) -> None:
    """A link planted where the lock should be must not hand the runner a file its sandbox keeps from it."""
    secret = tmp_path / "secret.txt"
    secret.write_text("every tenant's API keys")
    planted = tmp_path / "bench.lock"
    planted.symlink_to(secret)
    for lock in (planted, secret):
        outcome = supervise(
            [sys.executable, "-c", SHOW_ENV], work_dir=tmp_path / "w", timeout_s=60, bench_lock=lock
        )
        assert outcome.result is not None and BENCH_LOCK_FD_ENV not in outcome.result
    assert LOCK_FD_ENV == BENCH_LOCK_FD_ENV  # the worker and the engine agree on the name


def test_qat_with_few_calibration_samples_warns(digits: Digits, tmp_path: Path) -> None:
    few = tmp_path / "few.npz"
    with np.load(digits.train) as data:
        np.savez(few, x=data["x"][:12], labels=data["labels"][:12])
    config = QATConfig(benchmark=FAST_BENCHMARK, activation_observer="moving_average")
    result = quantize(digits.pt2, config, out_dir=tmp_path / "out", train=digits.train, calibration=few)
    assert result.manifest["calibration_samples"] == 12
    assert any(w.startswith("only 12 calibration samples were observed") for w in result.metrics["warnings"])
