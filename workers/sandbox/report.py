"""What a runner gets on this host, verified: sandbox_report() starts the probe (workers/sandbox/probe.py) under
the full sandbox once per process and limits, and keeps the protections it found in force; sandbox_gaps()
says why each missing one is not. The worker's heartbeat carries both to /readyz (docs/security.md).

Where torch (or the child itself) cannot start under the full sandbox, the probe finds the one protection
whose absence lets it start and leaves that one off for the runners that follow (policy.disabled), logged and
named in the gaps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from workers.sandbox.policy import (
    PROTECTIONS,
    SOURCE_ROOT,
    RunnerLimits,
    disabled,
    disabled_lock,
    ordered,
    package_dir,
)
from workers.sandbox.spawn import spawn

log = logging.getLogger("qaas.worker")

_PROBE_MODULE = "workers.sandbox.probe"
# Tried off one at a time, in this order, when torch does not start under the full sandbox.
_FALLBACKS = (
    "seccomp",
    "own_pid_namespace",
    "landlock_read",
    "unprivileged_user",
    "no_network",
    "landlock_fs",
)


@dataclass
class _ProbeResult:
    in_force: list[str]
    gaps: dict[str, str]
    torch_error: str | None = None


def _run_probe(limits: RunnerLimits, want_torch: bool) -> tuple[str, str, int | None]:
    """Start the probe under the full sandbox, beside a listening port, a writable folder and a readable file
    that only the sandbox keeps it from. Returns its stdout, stderr and exit status."""
    with tempfile.TemporaryDirectory(prefix="qaas-probe-") as tmp, socket.socket() as listener:
        base = Path(tmp)
        os.chmod(base, 0o755)
        work, outside = base / "work", base / "outside"
        work.mkdir()
        outside.mkdir()
        os.chmod(outside, 0o777)  # only Landlock can stop the write
        secret = outside / "secret"
        secret.write_text("x")
        os.chmod(secret, 0o644)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(SOURCE_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        argv = [str(port), str(secret), str(outside), "1" if want_torch else "0", str(os.getpid())]
        proc, _ = spawn(
            [sys.executable, "-m", _PROBE_MODULE, *argv],
            work_dir=work,
            env=env,
            limits=limits,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    return out, err, proc.returncode


def _probe(limits: RunnerLimits, want_torch: bool) -> _ProbeResult:
    """Start a tiny child under the full sandbox and check each protection from inside it."""
    out, err, returncode = _run_probe(limits, want_torch)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    announced = next((line for line in lines if line.get("event") == "sandbox"), None)
    verdict = next((line for line in lines if "found" in line), None)
    if announced is None or verdict is None:
        detail = (err or "").strip()[-500:] or f"exit status {returncode}"
        return _ProbeResult([], {"runner": f"a sandboxed child did not start: {detail}"}, torch_error=detail)
    gaps = dict(announced.get("gaps") or {})
    found = set(verdict["found"])
    applied = set(announced["in_force"]) | {"parent_unreadable"}
    for name, note in verdict["notes"].items():
        if name in PROTECTIONS:
            gaps.setdefault(name, note)
    in_force = ordered(name for name in found if name in applied)
    return _ProbeResult(in_force, gaps, verdict["notes"].get("torch"))


_report_lock = threading.Lock()
_reports: dict[RunnerLimits, _ProbeResult] = {}


def _probe_with_fallbacks(limits: RunnerLimits) -> _ProbeResult:
    """The full sandbox first. Where torch (or the child itself) cannot start under it, find the one protection
    whose absence lets it start, and leave that one off for the runners that follow (logged, and named in
    sandbox_gaps())."""
    want_torch = package_dir("torch") is not None
    result = _probe(limits, want_torch)
    if result.torch_error is None:
        return result
    with disabled_lock:  # runners of other threads wait rather than start during a trial
        for protection in _FALLBACKS:
            if protection in result.gaps or protection in disabled:
                continue
            reason = f"torch could not start under it ({result.torch_error[-300:]})"
            disabled[protection] = reason
            trial = _probe(limits, want_torch)
            if trial.torch_error is None:
                log.warning("runner sandbox: %s is off: %s", protection, reason)
                trial.gaps[protection] = reason
                return trial
            del disabled[protection]
    log.error("runner sandbox: a runner cannot start torch here: %s", result.torch_error)
    result.gaps.setdefault("runner", f"torch does not start in a runner: {result.torch_error[-300:]}")
    return result


def sandbox_report(limits: RunnerLimits | None = None) -> list[str]:
    """The protections in force for the next runner on this host, verified from inside a probe child (once per
    process and limits; the first call takes a few seconds: the probe imports torch)."""
    limits = limits or RunnerLimits()
    with _report_lock:
        if limits not in _reports:
            _reports[limits] = _probe_with_fallbacks(limits)
        return list(_reports[limits].in_force)


def sandbox_gaps(limits: RunnerLimits | None = None) -> dict[str, str]:
    """Why each protection missing from sandbox_report() is not in force."""
    limits = limits or RunnerLimits()
    sandbox_report(limits)
    return dict(_reports[limits].gaps)
