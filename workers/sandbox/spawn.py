"""The worker's side of starting a runner: plan its sandbox, prepare its work directory and environment, and
start it through the trampoline (workers/sandbox/trampoline.py) in a new session; and the worker's own
hardening, so that a runner with the worker's uid cannot read the worker. docs/security.md ("The runner").
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from workers.sandbox import syscalls
from workers.sandbox.policy import RUNNER_PACKAGES, SOURCE_ROOT, RunnerLimits, SandboxPlan, plan_sandbox
from workers.sandbox.trampoline import BOOT

log = logging.getLogger("qaas.worker")


def spawn(
    argv: Sequence[str],
    *,
    work_dir: Path,
    env: Mapping[str, str],
    write_dirs: Sequence[Path] = (),
    read_paths: Sequence[Path] = (),
    limits: RunnerLimits | None = None,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = None,
    text: bool = True,
    announce: bool = True,
    pass_fds: Sequence[int] = (),
) -> tuple[subprocess.Popen[Any], SandboxPlan]:
    """Start `argv` (argv[0] an absolute path) sandboxed in `work_dir`, in a new session. The trampoline
    runs with this Python; `env` is the child's whole environment (add no secrets), passed as given. With
    `announce`, the first stdout line is the sandbox event. `pass_fds` stay open in the child under the same
    numbers (the host's benchmark lock: Landlock would not let the runner open it by name)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for directory in write_dirs:
        Path(directory).mkdir(parents=True, exist_ok=True)
    plan = plan_sandbox(
        work_dir=work_dir, write_dirs=write_dirs, read_paths=read_paths, limits=limits, python=argv[0]
    )
    plan.announce = announce
    child_env = _child_env(env, plan, work_dir)
    # The trampoline (this Python, no site) finds this package through the source root given on its command
    # line, whatever the child's PYTHONPATH is.
    command = [sys.executable, "-S", "-c", BOOT, str(SOURCE_ROOT), json.dumps(asdict(plan)), *argv]
    proc = subprocess.Popen(
        command,
        cwd=work_dir,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        text=text,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    return proc, plan


def _child_env(env: Mapping[str, str], plan: SandboxPlan, work_dir: Path) -> dict[str, str]:
    """The runner's environment: `env`, with the source root on PYTHONPATH swapped for a shim where reads are
    confined, and the runner's user named. Gives the work directory away to that user."""
    child_env = dict(env)
    child_env.setdefault("MALLOC_ARENA_MAX", "2")  # glibc's per-thread arenas cost address space, not memory
    if plan.confine_reads and "PYTHONPATH" in child_env:
        paths = child_env["PYTHONPATH"].split(os.pathsep)
        source_root = str(SOURCE_ROOT)
        if source_root in paths and source_root not in plan.read_dirs:
            paths[paths.index(source_root)] = _source_shim(work_dir)
            child_env["PYTHONPATH"] = os.pathsep.join(paths)
    if plan.uid is not None and plan.gid is not None:
        child_env["USER"] = child_env["LOGNAME"] = _user_name(plan.uid)
        _give_away(work_dir, plan.uid, plan.gid)
    return child_env


def _give_away(work_dir: Path, uid: int, gid: int) -> None:
    """Hand the work directory (and everything in it) to the runner's user; only it may enter."""
    for root, dirs, names in os.walk(work_dir):
        for name in [*dirs, *names]:
            os.lchown(os.path.join(root, name), uid, gid)
    os.chown(work_dir, uid, gid)
    os.chmod(work_dir, 0o700)


def _source_shim(work_dir: Path) -> str:
    """A folder in the work directory that holds only links to the packages the runner imports, for
    PYTHONPATH: the source root itself may hold the data directory, which the runner must not list or read."""
    shim = work_dir / ".qaas-src"
    shim.mkdir(exist_ok=True)
    for package in RUNNER_PACKAGES:
        link = shim / package.name
        if not link.is_symlink():
            link.symlink_to(package, target_is_directory=True)
    return str(shim)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "runner"


def harden_worker_process() -> list[str]:
    """Call once at worker start: makes the worker non-dumpable, so that a runner with the same uid can neither
    read /proc/<worker>/environ or /proc/<worker>/mem nor ptrace it. Returns what it set."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
    except OSError as exc:
        log.warning("could not make the worker non-dumpable: %s", exc)
        return []
    return ["worker_not_dumpable"]
