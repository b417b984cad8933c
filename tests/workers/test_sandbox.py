"""The runner's sandbox, with real processes: what a child can reach, the limits that stop it and the codes
they map to, the worker's own hardening, death with the worker. Protections the host's kernel refuses are
skipped with the reason the sandbox gives (sandbox_gaps)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fail_or_skip, processes_in, traversable
from workers import sandbox
from workers.sandbox import PROTECTIONS, RunnerLimits, policy, syscalls
from workers.supervise import run_runner, runner_env, supervise

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Layout:
    """A data directory shaped like the service's: the SQLite file and other jobs' files beside work/<job>."""

    data: Path
    work: Path
    database: Path
    other_job: Path


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    traversable(tmp_path)
    tmp_path.chmod(0o755)
    data = tmp_path / "var"
    work = data / "work" / "job-1"
    work.mkdir(parents=True)
    for directory in (data, data / "work"):
        directory.chmod(0o777)  # only the sandbox, not file permissions, may keep the runner out
    database = data / "qaas.sqlite"
    database.write_text("api keys and every tenant's jobs")
    database.chmod(0o666)
    other_job = data / "work" / "job-0"
    other_job.mkdir()
    other_job.chmod(0o777)
    return Layout(data, work, database, other_job)


SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder that other users can reach (pytest's own tmp_path sits under a 0700 folder)."""
    with tempfile.TemporaryDirectory(prefix="qaas-sandbox-test-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def run_child(
    code: str, work: Path, *, limits: RunnerLimits | None = None, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Run a Python snippet sandboxed in `work`; returns (sandbox event, the snippet's last JSON line, stderr)."""
    proc, _ = sandbox.spawn(
        [sys.executable, "-c", textwrap.dedent(code)],
        work_dir=work,
        env=env or runner_env(1, work),
        limits=limits,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines and lines[0]["event"] == "sandbox", err
    return lines[0], (lines[-1] if len(lines) > 1 else {}), err


def require(announced: dict[str, Any], protection: str) -> None:
    if protection not in announced["in_force"]:
        reason = announced["gaps"].get(protection, "not reported")
        fail_or_skip(f"{protection} is not in force on this host: {reason}")


def test_report_lists_verified_protections_and_explains_the_rest() -> None:
    report = sandbox.sandbox_report()
    gaps = sandbox.sandbox_gaps()
    print("in force:", report, "\ngaps:", gaps)
    assert set(report) <= set(PROTECTIONS)
    # Available everywhere the runner can start at all.
    assert {"clean_env", "rlimit_as", "rlimit_cpu", "rlimit_fsize", "new_session", "pdeathsig"} <= set(report)
    assert "runner" not in gaps, gaps  # torch starts under the sandbox
    for name in ("no_network", "unprivileged_user", "landlock_fs", "rlimit_nproc"):
        assert name in report or name in gaps, name
    assert sandbox.sandbox_report() == report  # cached


def test_writes_and_reads_stay_inside_the_work_dir(layout: Layout) -> None:
    code = f"""
        import json, os
        seen = {{}}
        for name, action in [
            ("write_work", lambda: open("mine.txt", "w").write("ok")),
            ("write_data", lambda: open({str(layout.data / "canary")!r}, "w").write("x")),
            ("write_other_job", lambda: open({str(layout.other_job / "canary")!r}, "w").write("x")),
            ("append_database", lambda: open({str(layout.database)!r}, "a").write("x")),
            ("read_database", lambda: open({str(layout.database)!r}).read()),
            ("write_tmp", lambda: open("/tmp/qaas-sandbox-canary-{os.getpid()}", "w").write("x")),
            ("read_shadow", lambda: open("/etc/shadow").read()),
        ]:
            try:
                action()
                seen[name] = "ok"
            except OSError as exc:
                seen[name] = type(exc).__name__
        print(json.dumps(seen))
    """
    announced, seen, err = run_child(code, layout.work)
    assert seen["write_work"] == "ok", err
    assert (layout.work / "mine.txt").read_text() == "ok"
    require(announced, "landlock_fs")
    assert seen["write_data"] == seen["write_other_job"] == seen["append_database"] == "PermissionError"
    assert seen["write_tmp"] == "PermissionError"
    assert not (layout.data / "canary").exists() and not (layout.other_job / "canary").exists()
    assert not Path(f"/tmp/qaas-sandbox-canary-{os.getpid()}").exists()
    assert layout.database.read_text() == "api keys and every tenant's jobs"
    require(announced, "landlock_read")
    assert seen["read_database"] == "PermissionError"
    assert seen["read_shadow"] in ("PermissionError", "FileNotFoundError")


def test_no_tcp_connection_to_a_listening_port(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = f"""
            import json, socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
                print(json.dumps({{"connected": True}}))
            except OSError as exc:
                print(json.dumps({{"connected": False, "error": str(exc)}}))
        """
        announced, seen, err = run_child(code, tmp_path / "work")
        if not {"no_network", "no_tcp"} & set(announced["in_force"]):
            require(announced, "no_network")
        assert seen["connected"] is False, err


def test_environment_carries_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAAS_DATABASE_URL", "postgresql://qaas:hunter2@db/qaas")
    monkeypatch.setenv("QAAS_BROKER_URL", "redis://:hunter2@redis:6379/0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    announced, env, _ = run_child(code, tmp_path / "work")
    assert "clean_env" in announced["in_force"]
    assert not [key for key in env if key.startswith("QAAS_")]
    assert "hunter2" not in json.dumps(env)
    assert env["HOME"] == env["TMPDIR"] == str((tmp_path / "work").resolve())


WORKER = """
import json, os, subprocess, sys
from pathlib import Path
from workers import sandbox

def child(limits, whose="worker"):
    work = Path(sys.argv[1])
    # A runner's environment, without workers.supervise.runner_env: this Python has no pydantic for the job
    # contract that workers.supervise imports.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    pid = os.getpid() if whose == "worker" else "os.getppid()"  # the worker, or the runner's trampoline
    code = (
        "import json, os\\n"
        "try:\\n"
        f"    open(f'/proc/{{{pid}}}/environ', 'rb').read(); print(json.dumps('readable'))\\n"
        "except OSError as exc:\\n"
        "    print(json.dumps(type(exc).__name__))\\n"
    )
    proc, _ = sandbox.spawn([sys.executable, "-c", code], work_dir=work, env=env, limits=limits)
    return json.loads(proc.communicate(timeout=60)[0].splitlines()[-1])

# No Landlock, no user namespace, no PID namespace (whose own /proc would hide the worker anyway).
unconfined = sandbox.RunnerLimits(landlock=False, network=True, pid_namespace=False)
before = child(unconfined)
hardened = sandbox.harden_worker_process()
trampoline = child(unconfined, "trampoline")
print(json.dumps({"before": before, "after": child(unconfined), "full": child(None), "hardened": hardened,
                  "trampoline": trampoline}))
"""


def test_worker_environment_unreadable_after_harden(public_dir: Path) -> None:
    """The case harden_worker_process is for: a runner with the worker's own (non-root) uid. A root worker
    is played by `nobody` with the system Python; the runner then has the same uid as its worker."""
    python, user = sys.executable, None
    if os.geteuid() == 0:
        if not SYSTEM_PYTHON.exists() or not policy._readable_by(SYSTEM_PYTHON, 65534, 65534):
            pytest.skip("no Python that nobody can start (/usr/bin/python3) to play a non-root worker")
        python, user = str(SYSTEM_PYTHON), 65534
    work = public_dir / "work"
    work.mkdir()
    if user is not None:
        os.chown(work, user, user)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "QAAS_DATABASE_URL": "postgresql://qaas:hunter2@db/qaas",
    }
    done = subprocess.run(
        [python, "-c", WORKER, str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
        cwd=public_dir,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["hardened"] == ["worker_not_dumpable"]
    assert seen["before"] == "readable", seen  # what the hardening is for
    assert seen["after"] == "PermissionError", seen
    assert seen["trampoline"] == "PermissionError", seen  # the runner's reaper, outside its sandbox
    # The full sandbox: the runner's own /proc has no entry for the worker at all.
    assert seen["full"] in ("PermissionError", "FileNotFoundError"), seen


def test_memory_hog_fails_with_memory_limit(tmp_path: Path) -> None:
    hog = "import json; print(json.dumps({'event': 'progress', 'stage': 'loading'})); x = bytearray(8 * 1024**3)"
    outcome = supervise(
        [sys.executable, "-c", hog],
        work_dir=tmp_path / "work",
        timeout_s=60,
        limits=RunnerLimits(memory_mb=1024),
    )
    assert outcome.error_code == "memory_limit", outcome
    assert "1024 MB" in (outcome.error_message or "")
    assert "rlimit_as" in outcome.sandbox


def test_torch_allocation_fails_with_memory_limit(tmp_path: Path) -> None:
    """What a model that asks torch for too much looks like: an error event, not a Python MemoryError."""
    hog = (
        "import json, torch\n"
        "try:\n"
        "    torch.empty(8 * 1024**3, dtype=torch.uint8)\n"
        "except RuntimeError as exc:\n"
        "    print(json.dumps({'event': 'error', 'code': 'model_load_failed', 'message': str(exc)}))\n"
    )
    outcome = supervise(
        [sys.executable, "-c", hog],
        work_dir=tmp_path / "work",
        timeout_s=60,
        limits=RunnerLimits(memory_mb=2048),
    )
    assert (outcome.error_code, "2048 MB" in (outcome.error_message or "")) == ("memory_limit", True), outcome


def test_cpu_hog_fails_with_time_limit(tmp_path: Path) -> None:
    started = time.monotonic()
    outcome = supervise(
        [sys.executable, "-c", "while True: pass"],
        work_dir=tmp_path / "work",
        timeout_s=60,
        limits=RunnerLimits(cpu_seconds=2),
    )
    assert outcome.error_code == "time_limit", outcome
    assert "2 s" in (outcome.error_message or "") and "CPU" in (outcome.error_message or "")
    assert time.monotonic() - started < 30


def test_wall_clock_still_applies(tmp_path: Path) -> None:
    outcome = supervise(
        [sys.executable, "-c", "import time; time.sleep(60)"], work_dir=tmp_path / "work", timeout_s=1
    )
    assert outcome.error_code == "time_limit" and "1 s" in (outcome.error_message or "")
    assert outcome.sandbox  # the announcement came before the time ran out


def test_big_file_fails_with_file_size_limit(tmp_path: Path) -> None:
    code = "open('big.bin', 'wb').write(b'x' * (40 * 1024 * 1024))"
    outcome = supervise(
        [sys.executable, "-c", code],
        work_dir=tmp_path / "work",
        timeout_s=60,
        limits=RunnerLimits(file_size_mb=16),
    )
    assert outcome.error_code == "file_size_limit" and "16 MB" in (outcome.error_message or ""), outcome
    assert (tmp_path / "work" / "big.bin").stat().st_size <= 16 * 1024 * 1024


PARENT = """
import sys, time
from pathlib import Path
from workers import sandbox
from workers.supervise import runner_env
work = Path(sys.argv[1])
code = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"
proc, _ = sandbox.spawn([sys.executable, "-c", code], work_dir=work, env=runner_env(1, work), stdout=None)
time.sleep(120)
"""


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans come back to this process (not to a container's init that may never reap them)."""
    libc = syscalls.libc()
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    yield
    libc.prctl(36, 0, 0, 0, 0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    if state == "Z":
        os.waitpid(pid, os.WNOHANG)
        return False
    return True


def test_runner_dies_with_its_worker(tmp_path: Path, subreaper: None) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "work")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        announced = json.loads(worker.stdout.readline())
        assert "pdeathsig" in announced["in_force"]
        child = int(worker.stdout.readline())
        if "own_pid_namespace" in announced["in_force"]:
            assert child == 1  # the namespace's init; the worker knows it by its outside PID
            child = announced["pid"]
        assert _alive(child)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        worker.kill()
        worker.wait()


def test_root_worker_runs_the_child_as_nobody_with_a_process_limit(public_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the worker is not root: the runner keeps the worker's user")
    if not SYSTEM_PYTHON.exists() or not policy._readable_by(SYSTEM_PYTHON, 65534, 65534):
        pytest.skip("no Python that nobody can start (/usr/bin/python3)")
    work = public_dir / "work"
    code = """
        import json, os, threading, time
        started = 0
        try:
            for _ in range(200):
                threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
                started += 1
        except RuntimeError:
            pass
        print(json.dumps({"uid": os.getuid(), "threads": started}))
    """
    proc, plan = sandbox.spawn(
        [str(SYSTEM_PYTHON), "-c", textwrap.dedent(code)],
        work_dir=work,
        env={"PATH": "/usr/bin:/bin", "HOME": str(work)},
        limits=RunnerLimits(max_processes=48),
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=60)
    announced, seen = (json.loads(line) for line in out.splitlines())
    assert {"unprivileged_user", "rlimit_nproc"} <= set(announced["in_force"]), (announced, err)
    assert seen["uid"] == 65534 == work.stat().st_uid
    assert seen["threads"] < 48


def test_a_root_runner_keeps_no_capabilities(tmp_path: Path) -> None:
    code = """
        import json
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        print(json.dumps({k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}))
    """
    announced, caps, _ = run_child(code, tmp_path / "work")
    require(announced, "no_capabilities")
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0


def test_real_runner_inspects_a_model_under_the_full_sandbox(layout: Layout) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    program = torch.export.export(model, (torch.randn(2, 8),))
    uploads = layout.data / "uploads"
    uploads.mkdir()
    path = uploads / "model.pt2"
    torch.export.save(program, path)
    outcome = run_runner(
        ["inspect-model", "--file", str(path), "--out", str(layout.work / "out")],
        work_dir=layout.work,
        timeout_s=120,
    )
    assert outcome.result is not None, outcome
    assert outcome.result["format"] == "pt2"
    assert {"clean_env", "rlimit_as", "pdeathsig"} <= set(outcome.sandbox)
    assert set(outcome.sandbox) | set(outcome.sandbox_gaps) == set(PROTECTIONS) - {"parent_unreadable"}
    # What a real runner must have wherever the kernel allows it; under CI each one is required.
    announced = {"in_force": outcome.sandbox, "gaps": outcome.sandbox_gaps}
    wanted = ["own_pid_namespace", "proc_hidden", "seccomp", "no_network", "landlock_fs", "landlock_read"]
    if os.geteuid() == 0:
        wanted.append("unprivileged_user")  # the venv's Python must be one `nobody` can start (Makefile)
    for protection in wanted:
        require(announced, protection)


def test_limits_have_floors_and_come_from_settings() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        RunnerLimits(memory_mb=512)

    class Settings:
        runner_memory_mb = 4096
        runner_cpu_seconds = 0  # no limit
        runner_max_processes = 128
        runner_file_size_mb = 1024
        runner_user = "nobody"
        runner_network = False

    limits = RunnerLimits.from_settings(Settings())
    assert (limits.memory_mb, limits.cpu_seconds, limits.max_processes, limits.file_size_mb) == (
        4096,
        None,
        128,
        1024,
    )
    assert limits.landlock and limits.confine_reads and not limits.network


DEGRADED = """
import errno, json, os
from workers import sandbox
from workers.sandbox import landlock, syscalls

def refused(flags):
    raise OSError(errno.EPERM, "unshare: Operation not permitted")  # Docker's default seccomp profile

syscalls.unshare = refused
landlock.landlock_abi = lambda: 0  # a kernel without Landlock
plan = sandbox.SandboxPlan(parent_pid=os.getppid(), netns=True, landlock=True, landlock_net=True)
plan.rlimits = {"rlimit_as": [2 << 30, 2 << 30], "rlimit_cpu": [60, 65]}
in_force, gaps = sandbox.apply_plan(plan)
print(json.dumps({"in_force": in_force, "gaps": gaps}))
"""


def test_refused_protections_degrade_to_named_gaps() -> None:
    done = subprocess.run(
        [sys.executable, "-c", DEGRADED],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(done.stdout)
    assert {"rlimit_as", "rlimit_cpu", "pdeathsig", "no_new_privs"} <= set(seen["in_force"])
    assert not {"no_network", "no_tcp", "landlock_fs", "landlock_read"} & set(seen["in_force"])
    assert "refused" in seen["gaps"]["no_network"]
    assert "no Landlock" in seen["gaps"]["landlock_fs"]
    assert "no_tcp" in seen["gaps"]


def test_error_messages_never_follow_links_the_runner_planted(layout: Layout) -> None:
    code = f"""
        import os, sys
        print(json.dumps({{"event": "sandbox", "in_force": ["everything"]}}))
        os.unlink("runner.stderr")
        os.symlink({str(layout.database)!r}, "runner.stderr")
        sys.exit(1)
    """
    outcome = supervise(
        [sys.executable, "-c", "import json\n" + textwrap.dedent(code)], work_dir=layout.work, timeout_s=60
    )
    assert outcome.error_code == "runner_crashed"
    assert (layout.work / "runner.stderr").is_symlink()  # the link was there to follow
    assert "tenant" not in (outcome.error_message or "")
    assert "everything" not in outcome.sandbox  # only the trampoline's announcement counts


ESCAPE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()  # a session of its own, out of the runner's process group
    if os.fork() == 0:
        time.sleep(120)
    os._exit(0)
time.sleep(float(sys.argv[1]))
print('{"event": "result", "result": {}}', flush=True)
"""


@pytest.mark.parametrize("pid_namespace", [True, False], ids=["pid_namespace", "subreaper_only"])
@pytest.mark.parametrize("ending", ["exits", "killed"])
def test_nothing_a_runner_started_outlives_it(tmp_path: Path, pid_namespace: bool, ending: str) -> None:
    """A double-forked `setsid` process is gone when supervise returns, whether the runner exits or the worker
    kills it at its time limit; with its own PID namespace (the kernel kills the namespace) and without one
    (as under Docker's default seccomp profile: the trampoline, its subreaper, kills what comes back to it)."""
    work = tmp_path / "work"
    outcome = supervise(
        [sys.executable, "-c", ESCAPE, "0.5" if ending == "exits" else "60"],
        work_dir=work,
        timeout_s=60 if ending == "exits" else 3,
        limits=RunnerLimits(pid_namespace=pid_namespace),
    )
    assert (outcome.error_code is None) == (ending == "exits"), outcome
    announced = {"in_force": outcome.sandbox, "gaps": outcome.sandbox_gaps}
    require(announced, "runner_reaped")
    if pid_namespace:
        require(announced, "own_pid_namespace")
    else:
        assert "own_pid_namespace" not in outcome.sandbox
    assert not processes_in(work)
