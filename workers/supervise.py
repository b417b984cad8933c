"""Start the runner child process in its sandbox (workers.sandbox), relay its JSON-lines progress, enforce the
wall-clock limit, stop it on request, and name the limit that killed it. The runner is where untrusted models
are loaded; this side never loads one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue as queue_mod
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import workers
from qaas.contract.jobs import RunnerSpec
from workers.benchlock import BenchLock, LockBroker, open_bench_lock
from workers.sandbox import RunnerLimits, spawn

log = logging.getLogger("qaas.worker")

# (stage, percent, message) or all None for a plain heartbeat; returns True to stop the runner.
ProgressRelay = Callable[[str | None, float | None, str | None], bool]

_SOURCE_ROOT = str(Path(workers.__file__).resolve().parent.parent)
# The runner asks the worker for the host's benchmark lock through two pipes named by this variable, "R,W":
# it writes "acquire" or "release" lines on W and reads "wait", "granted" or "timeout" on R
# (workers.engine.checks.bench.host_lock; the engine is not imported here: it would import torch into the worker).
# The worker holds the flock itself: nothing the runner leaves behind can keep it (docs/security.md).
BENCH_LOCK_FD_ENV = "QAAS_BENCH_LOCK_FD"
# How long a runner may wait for the lock before it benchmarks without it, and hold it in all.
BENCH_LOCK_WAIT_S = 600.0
BENCH_LOCK_HOLD_S = 900.0
# After the runner's trampoline is gone: how long the worker waits for the rest of its PID namespace.
NAMESPACE_GONE_S = 10.0
LOCK_POLL_S = 0.1
TRAMPOLINE_EXIT_S = 10.0
# What a user can do about a wall-clock limit: a job's own, or an upload's inspection (the deployment's).
JOB_TIME_LIMIT_ADVICE = "raise timeout_s in the job request or use a smaller model or dataset"
INSPECTION_TIME_LIMIT_ADVICE = (
    "reading this upload took longer than the deployment allows (QAAS_INSPECT_TIMEOUT_S); a model or dataset "
    "that loads in seconds with torch on your machine passes, so re-save it (torch.export.save, np.savez) and "
    "upload it again"
)
# The longest protocol line read from a runner (a result with per-layer metrics is far below it).
MAX_LINE_BYTES = 32 * 1024 * 1024


@dataclass
class RunnerOutcome:
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    stopped: bool = False
    # The protections the runner actually got (workers.sandbox.PROTECTIONS names), and why others are missing.
    sandbox: list[str] = field(default_factory=list)
    sandbox_gaps: dict[str, str] = field(default_factory=dict)
    # What happened to the host's benchmark lock (the runner waited past its limit, held it too long).
    lock_notes: list[str] = field(default_factory=list)


def runner_env(threads: int, home: Path) -> dict[str, str]:
    """No secrets: no database, broker or storage URL reaches the child, nor any QAAS_ or AWS_ variable (supervise
    adds QAAS_BENCH_LOCK_FD, two pipe descriptor numbers, when the runner may ask for the benchmark lock)."""
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
    # Bounded lines: a runner printing without end cannot fill the worker's memory (a cut line is not JSON).
    while line := stream.readline(MAX_LINE_BYTES):
        sink.put(line)
    sink.put(None)


def _stderr_tail(stream: IO[bytes], limit: int = 1500) -> str:
    try:
        fd = stream.fileno()
        size = os.fstat(fd).st_size
        data = os.pread(fd, limit, max(0, size - limit))
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


def _runner_paths(args: list[str], work_dir: Path) -> tuple[list[Path], list[Path]]:
    """(inputs, output folders) named on a runner command line: --file, --spec and the files its spec names
    (read-only), --out (writable). Relative paths are the runner's: relative to its work dir."""
    reads: list[Path] = []
    writes: list[Path] = []
    for flag, value in zip(args, args[1:], strict=False):
        path = work_dir / value
        if flag == "--out":
            writes.append(path)
        elif flag == "--file":
            reads.append(path)
        elif flag == "--spec":
            reads.append(path)
            try:
                spec = RunnerSpec.model_validate_json(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # the runner refuses it with invalid_config
            reads += [work_dir / p for p in (spec.model, *spec.data().values()) if p is not None]
    return reads, writes


def run_runner(
    args: list[str],
    *,
    work_dir: Path,
    timeout_s: float,
    threads: int = 1,
    relay: ProgressRelay | None = None,
    heartbeat_s: float = 5.0,
    limits: RunnerLimits | None = None,
    bench_lock: BenchLock = None,
    bench_lock_wait_s: float = BENCH_LOCK_WAIT_S,
    bench_lock_hold_s: float = BENCH_LOCK_HOLD_S,
    time_limit_advice: str = JOB_TIME_LIMIT_ADVICE,
) -> RunnerOutcome:
    """Run `python -m workers.runner ARGS` in `work_dir`, sandboxed with `limits` (RunnerLimits() when None),
    and wait for its result, relaying progress. It may write only in `work_dir` and the --out folder, and read
    only the system, Python, the `workers` package and the inputs its command line names. Its benchmark takes
    turns with the host's other benchmarks on `bench_lock` (a path or an open descriptor of the lock file;
    default_bench_lock() when None; False for none, as inspections never benchmark), which this process holds
    for it on request, waiting at most `bench_lock_wait_s` and holding it at most `bench_lock_hold_s` in all.

    Call it from the thread that lives as long as the worker (the runner gets SIGKILL when that thread ends)."""
    work_dir = work_dir.resolve()
    reads, writes = _runner_paths(args, work_dir)
    return supervise(
        [sys.executable, "-m", "workers.runner", *args],
        work_dir=work_dir,
        timeout_s=timeout_s,
        threads=threads,
        relay=relay,
        heartbeat_s=heartbeat_s,
        limits=limits,
        read_paths=reads,
        write_dirs=writes,
        bench_lock=bench_lock,
        bench_lock_wait_s=bench_lock_wait_s,
        bench_lock_hold_s=bench_lock_hold_s,
        time_limit_advice=time_limit_advice,
    )


def supervise(
    argv: list[str],
    *,
    work_dir: Path,
    timeout_s: float,
    threads: int = 1,
    relay: ProgressRelay | None = None,
    heartbeat_s: float = 5.0,
    limits: RunnerLimits | None = None,
    read_paths: Sequence[Path] = (),
    write_dirs: Sequence[Path] = (),
    bench_lock: BenchLock = None,
    bench_lock_wait_s: float = BENCH_LOCK_WAIT_S,
    bench_lock_hold_s: float = BENCH_LOCK_HOLD_S,
    time_limit_advice: str = JOB_TIME_LIMIT_ADVICE,
) -> RunnerOutcome:
    """Run any program that speaks the runner's JSON-lines protocol the way run_runner runs the runner:
    sandboxed, with the runner's environment, the wall-clock limit, progress relayed, limits named, the
    benchmark lock held for it on request (workers.benchlock; `bench_lock=False`: none). It returns only once
    every process of the runner is gone (its PID namespace torn down, where it has one)."""
    limits = limits or RunnerLimits()
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = runner_env(threads, work_dir)
    broker = None
    if bench_lock is not False:
        broker = LockBroker(open_bench_lock(bench_lock), wait_s=bench_lock_wait_s, hold_s=bench_lock_hold_s)
        env[BENCH_LOCK_FD_ENV] = broker.env_value
    runner = _Runner(broker)
    try:
        # Read back through this descriptor, never by name: the runner can replace the name with a link to a
        # file it cannot read itself (the SQLite database) and have the worker copy it into the error message.
        with open(work_dir / "runner.stderr", "w+b") as stderr:
            proc, plan = spawn(
                argv,
                work_dir=work_dir,
                env=env,
                write_dirs=write_dirs,
                read_paths=read_paths,
                limits=limits,
                stdout=subprocess.PIPE,
                stderr=stderr,
                pass_fds=broker.runner_fds if broker else (),
            )
            said = RunnerOutcome(sandbox_gaps=dict(plan.gaps))
            follower = _Follower(proc, runner, relay, heartbeat_s, timeout_s, time_limit_advice, said)
            outcome = follower.run(stderr, limits)
    finally:
        runner.finish()
    if broker is not None:
        outcome.lock_notes = list(broker.notes)
    return outcome


class _Runner:
    """What the worker watches besides the trampoline: the runner itself (through a pidfd on the PID the
    trampoline announced: the init of its PID namespace, where it has one) and the benchmark lock it holds
    for the runner."""

    def __init__(self, broker: LockBroker | None) -> None:
        self.broker = broker
        self.pidfd: int | None = None

    def announced(self, pid: Any) -> None:
        if isinstance(pid, int) and pid > 0 and self.pidfd is None:
            with contextlib.suppress(OSError):  # already gone: nothing to watch
                self.pidfd = os.pidfd_open(pid)

    def kill(self) -> bool:
        """SIGKILL the runner through its pidfd; False when there is none to use."""
        if self.pidfd is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        return True

    def finish(self) -> None:
        """Kill whatever is left of the runner's namespace and wait until it is gone, then release the lock."""
        try:
            if self.kill():
                assert self.pidfd is not None
                poller = select.poll()
                poller.register(self.pidfd, select.POLLIN)
                # The init's exit completes once the kernel has killed and reaped every process of its namespace.
                if not poller.poll(NAMESPACE_GONE_S * 1000):
                    raise RuntimeError(
                        f"the runner's processes were still alive {NAMESPACE_GONE_S:.0f} s after it"
                    )
        finally:
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
            if self.broker is not None:
                self.broker.close()


@dataclass
class _Follower:
    """One runner followed to its end through its protocol lines: progress relayed, heartbeats sent while it
    says nothing, the relay's request to stop and the wall-clock deadline obeyed; what it said gathers in
    `outcome`."""

    proc: subprocess.Popen[str]
    runner: _Runner
    relay: ProgressRelay | None
    heartbeat_s: float
    timeout_s: float
    advice: str  # what the user can do about the wall-clock limit
    outcome: RunnerOutcome  # what the runner said so far: at first only the gaps spawn reported
    lines: queue_mod.Queue[str | None] = field(default_factory=queue_mod.Queue)
    first: bool = True  # no line yet: the next one is the trampoline's
    last_beat: float = field(default_factory=time.monotonic)
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def run(self, stderr: IO[bytes], limits: RunnerLimits) -> RunnerOutcome:
        """Follow the runner until it exits, or kill it (past its deadline, or stopped), and tell what became of
        it. Its trampoline is reaped on return; supervise's _Runner.finish waits for the rest."""
        proc = self.proc
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, self.lines), daemon=True)
        reader.start()
        if self.runner.broker is not None:
            self.runner.broker.start(wake=lambda: self.lines.put(""))  # an empty line: look at the lock now
        try:
            ended = self.follow_lines()
            if ended is not None:
                return ended
            cpu_s = _wait(proc, self.deadline)
            if proc.returncode is None:
                return self.timed_out()
        finally:
            if proc.poll() is None:
                _kill(proc, self.runner)
            reader.join(timeout=5)
        return _judge(self.outcome, proc.returncode, cpu_s, stderr, limits)

    def follow_lines(self) -> RunnerOutcome | None:
        """Relay lines until the runner's stdout ends (None), or kill it: past its deadline, or asked to stop."""
        while (line := self._next_line()) is not None:
            if time.monotonic() >= self.deadline:
                return self.timed_out()
            stop = self._take(line)
            self.first = self.first and not line
            if stop or self._heartbeat():
                _kill(self.proc, self.runner)
                return _ended(self.outcome, stopped=True)
        return None

    def timed_out(self) -> RunnerOutcome:
        """Kill the runner for running past its wall-clock limit."""
        _kill(self.proc, self.runner)
        return _ended(
            self.outcome,
            error_code="time_limit",
            error_message=_wall_clock_message(self.timeout_s, self.advice),
        )

    def _next_line(self) -> str | None:
        """The runner's next line; "" when none came in time or the lock broker woke us; None once stdout ends."""
        broker = self.runner.broker
        # While the runner waits for the lock or holds it, mind its limits often.
        longest = LOCK_POLL_S if broker is not None and broker.busy else self.heartbeat_s
        wait = max(0.05, min(longest, self.deadline - time.monotonic()))
        try:
            line = self.lines.get(timeout=wait)
        except queue_mod.Empty:
            line = ""
        if broker is not None:
            broker.poll()
        return line

    def _take(self, line: str) -> bool:
        """Record what a protocol line says and relay its progress; True when the relay asks to stop."""
        event = _parse(line) if line else None
        if not event:
            return False
        kind = event.get("event")
        if kind == "sandbox" and self.first:
            # Only the trampoline's line, the first one: the runner itself could claim anything.
            self.outcome.sandbox = [str(name) for name in event.get("in_force") or []]
            self.outcome.sandbox_gaps = {str(k): str(v) for k, v in (event.get("gaps") or {}).items()}
            self.runner.announced(event.get("pid"))
        elif kind == "progress":
            stop = self.relay is not None and self.relay(
                event.get("stage"), event.get("percent"), event.get("message")
            )
            self.last_beat = time.monotonic()
            return stop
        elif kind == "result":
            self.outcome.result = event.get("result")
        elif kind == "error":
            self.outcome.error_code = str(event.get("code") or "internal_error")
            self.outcome.error_message = str(event.get("message") or "")
        return False

    def _heartbeat(self) -> bool:
        """Tell the relay the runner lives when nothing else did for heartbeat_s; True when it asks to stop."""
        if self.relay is None or time.monotonic() - self.last_beat < self.heartbeat_s:
            return False
        stop = self.relay(None, None, None)
        self.last_beat = time.monotonic()
        return stop


def _ended(outcome: RunnerOutcome, **changes: Any) -> RunnerOutcome:
    """The runner's end, with the sandbox it had but nothing else it said."""
    return RunnerOutcome(sandbox=outcome.sandbox, sandbox_gaps=outcome.sandbox_gaps, **changes)


def _judge(
    outcome: RunnerOutcome,
    returncode: int | None,
    cpu_s: float | None,
    stderr: IO[bytes],
    limits: RunnerLimits,
) -> RunnerOutcome:
    """What became of a runner that exited by itself: its result, a limit it hit, its own error, or a crash."""
    if outcome.result is not None and returncode == 0:
        return outcome
    # A fatal error's thread dump can push the MemoryError line far up: look for the signs in more than the tail.
    limit = _limit_hit(outcome, returncode, cpu_s, _stderr_tail(stderr, 256 * 1024), limits)
    if limit is not None:
        return _ended(outcome, error_code=limit[0], error_message=limit[1])
    if outcome.error_code is not None:
        return outcome
    if returncode is not None and returncode < 0:
        how = f"was killed by {signal.Signals(-returncode).name} while working on the model"
    else:
        how = f"exited with status {returncode} without a result"
    tail = _stderr_tail(stderr) or "no output"
    return _ended(outcome, error_code="runner_crashed", error_message=f"the runner {how}: {tail}")


def _wall_clock_message(timeout_s: float, advice: str) -> str:
    return f"the runner ran past its time limit of {timeout_s:.0f} s and was stopped: {advice}"


_MEMORY_SIGNS = (
    "MemoryError",
    "bad_alloc",
    "Cannot allocate memory",
    "can't allocate memory",
    "failed to map segment from shared object",
    "mmap failed",
)


def _limit_hit(
    outcome: RunnerOutcome, returncode: int | None, cpu_s: float | None, stderr: str, limits: RunnerLimits
) -> tuple[str, str] | None:
    """(code, message) when the runner failed because it hit one of its limits."""
    said = f"{outcome.error_message or ''}\n{stderr}"
    if limits.cpu_seconds and (
        returncode == -signal.SIGXCPU
        or (returncode == -signal.SIGKILL and cpu_s is not None and cpu_s >= limits.cpu_seconds)
    ):
        return "time_limit", (
            f"the runner used up its CPU-time limit of {limits.cpu_seconds} s (QAAS_RUNNER_CPU_SECONDS) and "
            "was stopped: use a smaller model or dataset, fewer calibration batches or benchmark iterations"
        )
    if limits.memory_mb and any(sign in said for sign in _MEMORY_SIGNS):
        return "memory_limit", (
            f"the runner ran out of its memory limit of {limits.memory_mb} MB of address space "
            "(QAAS_RUNNER_MEMORY_MB): use a smaller model, batch size or dataset, or ask for a larger limit"
        )
    if limits.file_size_mb and (returncode == -signal.SIGXFSZ or "File too large" in said):
        return "file_size_limit", (
            f"the runner tried to write a file larger than its limit of {limits.file_size_mb} MB "
            "(QAAS_RUNNER_FILE_SIZE_MB)"
        )
    return None


def _wait(proc: subprocess.Popen[str], deadline: float) -> float | None:
    """Reap the runner (by the wall-clock deadline) and return the CPU seconds it and its reaped children
    used; the runner is left running (returncode None) when the deadline passes first."""
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            proc.wait()
            return None
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        log.warning("runner printed a line that is not JSON: %.200s", line)
        return None
    return value if isinstance(value, dict) else None


def _kill(proc: subprocess.Popen[str], runner: _Runner) -> None:
    """Kill the runner itself first: its trampoline then kills and reaps whatever the runner left behind (the
    kernel does, when the runner is the init of its own PID namespace) and exits. Only a trampoline that does
    not is killed, with its process group."""
    if runner.kill():
        try:
            proc.wait(timeout=TRAMPOLINE_EXIT_S)
            return
        except subprocess.TimeoutExpired:
            log.error(
                "a runner's trampoline did not exit %.0f s after its runner was killed", TRAMPOLINE_EXIT_S
            )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
