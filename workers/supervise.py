"""Start the runner child process, relay its JSON-lines progress, enforce the wall-clock limit, stop it on
request. The runner is where untrusted models are loaded; this side never loads one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue as queue_mod
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import workers

log = logging.getLogger("qaas.worker")

# (stage, percent, message) or all None for a plain heartbeat; returns True to stop the runner.
ProgressRelay = Callable[[str | None, float | None, str | None], bool]

_SOURCE_ROOT = str(Path(workers.__file__).resolve().parent.parent)


@dataclass
class RunnerOutcome:
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    stopped: bool = False


def runner_env(threads: int, home: Path) -> dict[str, str]:
    """No secrets: no database, broker or storage URL reaches the child, nor any QAAS_ variable."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": _SOURCE_ROOT,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }


def _read_lines(stream: Any, sink: queue_mod.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def _stderr_tail(path: Path, limit: int = 1500) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


def run_runner(
    args: list[str],
    *,
    work_dir: Path,
    timeout_s: float,
    threads: int = 1,
    relay: ProgressRelay | None = None,
    heartbeat_s: float = 5.0,
) -> RunnerOutcome:
    """Run `python -m workers.runner ARGS` in `work_dir` and wait for its result, relaying progress."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = work_dir / "runner.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.runner", *args],
            cwd=work_dir,
            env=runner_env(threads, work_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    lines: queue_mod.Queue[str | None] = queue_mod.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    outcome = RunnerOutcome()
    deadline = time.monotonic() + timeout_s
    last_beat = time.monotonic()
    try:
        while True:
            wait = max(0.05, min(heartbeat_s, deadline - time.monotonic()))
            try:
                line = lines.get(timeout=wait)
            except queue_mod.Empty:
                line = ""
            if line is None:
                break
            if time.monotonic() >= deadline:
                _kill(proc)
                return RunnerOutcome(
                    error_code="time_limit",
                    error_message=f"the job ran past its time limit of {timeout_s:.0f} s and was stopped: "
                    "raise timeout_s in the job request or use a smaller model or dataset",
                )
            event = _parse(line) if line else None
            stop = False
            if event and event.get("event") == "progress":
                stop = (
                    relay(event.get("stage"), event.get("percent"), event.get("message")) if relay else False
                )
                last_beat = time.monotonic()
            elif event and event.get("event") == "result":
                outcome.result = event.get("result")
            elif event and event.get("event") == "error":
                outcome.error_code = str(event.get("code") or "internal_error")
                outcome.error_message = str(event.get("message") or "")
            if relay and not stop and time.monotonic() - last_beat >= heartbeat_s:
                stop = relay(None, None, None)
                last_beat = time.monotonic()
            if stop:
                _kill(proc)
                return RunnerOutcome(stopped=True)
        proc.wait()
    finally:
        if proc.poll() is None:
            _kill(proc)
        reader.join(timeout=5)
    if outcome.result is not None and proc.returncode == 0:
        return outcome
    if outcome.error_code is not None:
        return outcome
    if proc.returncode is not None and proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return RunnerOutcome(
            error_code="runner_crashed",
            error_message=f"the runner was killed by {name} while working on the model: "
            f"{_stderr_tail(stderr_path) or 'no output'}",
        )
    return RunnerOutcome(
        error_code="runner_crashed",
        error_message=f"the runner exited with status {proc.returncode} without a result: "
        f"{_stderr_tail(stderr_path) or 'no output'}",
    )


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        log.warning("runner printed a line that is not JSON: %.200s", line)
        return None
    return value if isinstance(value, dict) else None


def _kill(proc: subprocess.Popen[str]) -> None:
    """The runner leads its own process group: take its children down with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
