"""What a runner gets: its limits (RunnerLimits, from the settings), the names of the protections, and the plan
the worker hands the trampoline (SandboxPlan), decided here from the limits, this host and what the probe found
to break a runner on it. docs/security.md ("The runner") lists each protection and what it stops.

Planning only: nothing here changes the worker's process. The trampoline (workers/sandbox/trampoline.py)
applies the plan in the child.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
# Measured on torch 2.13 (CPU build), Python 3.11, x86_64, 2 cores, MALLOC_ARENA_MAX=2, one thread: `import
# torch` needs 640 MB of address space (576 MB fails; 512 MB too); a dynamic quantization of a small MLP
# 700 MB; a static x86 job with its AOTInductor compile (small CNN) 896 MB (768 MB fails in the compile) while
# gcc's cc1plus peaks at 620 MB. Each thread adds its stack (8 MB) and more: give room.
MIN_MEMORY_MB = 1024
DEFAULT_MEMORY_MB = 8192
MIN_CPU_SECONDS = 1
DEFAULT_CPU_SECONDS = 4 * 3600
MIN_PROCESSES = 32
DEFAULT_MAX_PROCESSES = 1024  # per uid: all concurrent runners (and a same-uid worker) share it
MIN_FILE_SIZE_MB = 16
DEFAULT_FILE_SIZE_MB = 8192

# Order in which protections are listed.
PROTECTIONS = (
    "clean_env",
    "rlimit_as",
    "rlimit_cpu",
    "rlimit_fsize",
    "rlimit_nproc",
    "no_core_dumps",
    "new_session",
    "pdeathsig",
    "runner_reaped",
    "own_pid_namespace",
    "proc_hidden",
    "no_network",
    "no_tcp",
    "unprivileged_user",
    "no_capabilities",
    "no_new_privs",
    "landlock_fs",
    "landlock_read",
    "landlock_scope",
    "seccomp",
    "parent_unreadable",
)

WORKERS_PACKAGE = Path(__file__).resolve().parents[1]  # .../workers
SOURCE_ROOT = WORKERS_PACKAGE.parent
# What the runner imports from this source tree: the engine, and the pure contract modules in `qaas`.
RUNNER_PACKAGES = (WORKERS_PACKAGE, SOURCE_ROOT / "qaas")
# /sys only where torch, oneDNN and OpenMP read the CPU topology and cgroup quotas (not /sys/kernel/debug,
# firmware tables or device attributes a root runner could otherwise read).
_SYSTEM_READ_ROOTS = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/proc",
    "/sys/devices/system",
    "/sys/fs/cgroup",
)
# /etc as a whole holds secrets (/etc/shadow, service configuration): only what libc, the dynamic linker and
# compilers read.
_ETC_READ = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.preload",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/gai.conf",
    "/etc/os-release",
    "/etc/mime.types",
    "/etc/alternatives",
    "/etc/locale.alias",  # /usr/share/locale/locale.alias links here
    "/etc/ssl/openssl.cnf",  # /usr/lib/ssl/openssl.cnf links here (Inductor runs openssl); not /etc/ssl/private
)


@dataclass(frozen=True)
class RunnerLimits:
    """Limits of one runner. Sizes in MB (MiB); None switches a limit off.

    memory_mb: address space (RLIMIT_AS) of the runner and, separately, of each process it starts (gcc).
        At least MIN_MEMORY_MB (1024): `import torch` needs 640 MB, an AOTInductor compile about 900 MB.
    cpu_seconds: CPU time (RLIMIT_CPU) per process; the job fails with time_limit when it is used up.
    max_processes: processes and threads (RLIMIT_NPROC) of the runner's uid, all of them on the host counted
        (the worker's own when the runner runs as the worker's uid). Never binds root.
    file_size_mb: largest file the runner may write (RLIMIT_FSIZE).
    user: who the runner runs as when the worker is root (None: stay root).
    network: True leaves the network reachable (no namespace, no Landlock TCP rule).
    landlock: False skips Landlock altogether; confine_reads: False allows reads everywhere.
    pid_namespace: False keeps the runner in the worker's PID namespace and /proc (its escaped processes are
        then not killed with it).
    """

    memory_mb: int | None = DEFAULT_MEMORY_MB
    cpu_seconds: int | None = DEFAULT_CPU_SECONDS
    max_processes: int | None = DEFAULT_MAX_PROCESSES
    file_size_mb: int | None = DEFAULT_FILE_SIZE_MB
    user: str | None = "nobody"
    network: bool = False
    landlock: bool = True
    confine_reads: bool = True
    pid_namespace: bool = True

    def __post_init__(self) -> None:
        for name, minimum in (
            ("memory_mb", MIN_MEMORY_MB),
            ("cpu_seconds", MIN_CPU_SECONDS),
            ("max_processes", MIN_PROCESSES),
            ("file_size_mb", MIN_FILE_SIZE_MB),
        ):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(
                    f"runner {name} must be at least {minimum} (got {value}), or None for no limit"
                )

    @classmethod
    def from_settings(cls, settings: Any) -> RunnerLimits:
        """From settings attributes runner_memory_mb, runner_cpu_seconds, runner_max_processes,
        runner_file_size_mb, runner_user, runner_network, runner_landlock, runner_confine_reads, where present
        (0 means no limit)."""
        defaults = cls()
        values: dict[str, Any] = {}
        for name in ("memory_mb", "cpu_seconds", "max_processes", "file_size_mb"):
            value = getattr(settings, f"runner_{name}", getattr(defaults, name))
            values[name] = int(value) if value else None
        user = getattr(settings, "runner_user", defaults.user)
        values["user"] = str(user) if user else None
        for name in ("network", "landlock", "confine_reads", "pid_namespace"):
            values[name] = bool(getattr(settings, f"runner_{name}", getattr(defaults, name)))
        return cls(**values)


@dataclass
class SandboxPlan:
    """What the trampoline applies in the child. Serialised as JSON on its command line (no secrets in it)."""

    parent_pid: int
    rlimits: dict[str, list[int]] = field(default_factory=dict)
    netns: bool = False
    reap: bool = False
    pidns: bool = False
    seccomp: bool = False
    uid: int | None = None
    gid: int | None = None
    landlock: bool = False
    landlock_net: bool = False
    read_dirs: list[str] = field(default_factory=list)
    read_files: list[str] = field(default_factory=list)
    write_dirs: list[str] = field(default_factory=list)
    confine_reads: bool = False
    announce: bool = True
    gaps: dict[str, str] = field(default_factory=dict)
    outside_pid: int | None = None  # set by apply_plan: the runner's PID as the worker sees it


def ordered(names: Iterable[str]) -> list[str]:
    """`names` in the order of PROTECTIONS, unknown names last."""
    names = set(names)
    return [name for name in PROTECTIONS if name in names] + sorted(names - set(PROTECTIONS))


# Protections that the probe (workers/sandbox/report.py) found to break the runner on this host, with why.
disabled: dict[str, str] = {}
disabled_lock = threading.RLock()  # held while a probe tries the sandbox without one of them


def plan_sandbox(
    *,
    work_dir: Path,
    write_dirs: Sequence[Path] = (),
    read_paths: Sequence[Path] = (),
    limits: RunnerLimits | None = None,
    python: str | None = None,
) -> SandboxPlan:
    """Decide, in the worker, what the next runner gets (see _plan_sandbox). Waits while a probe is trying the
    sandbox with one protection off, so that no runner starts with a protection only a trial left off."""
    with disabled_lock:
        return _plan_sandbox(
            work_dir=work_dir, write_dirs=write_dirs, read_paths=read_paths, limits=limits, python=python
        )


def _plan_sandbox(
    *,
    work_dir: Path,
    write_dirs: Sequence[Path] = (),
    read_paths: Sequence[Path] = (),
    limits: RunnerLimits | None = None,
    python: str | None = None,
) -> SandboxPlan:
    """Decide, in the worker, what the next runner gets. `work_dir` (its cwd, HOME and TMPDIR) and `write_dirs`
    are writable; `read_paths` are the inputs it reads besides Python, the system and the `workers` package."""
    limits = limits or RunnerLimits()
    work_dir = work_dir.resolve()
    writable = [work_dir, *(Path(d).resolve() for d in write_dirs)]
    plan = SandboxPlan(parent_pid=os.getpid())
    _plan_rlimits(plan, limits)
    _plan_namespaces(plan, limits)
    files = [Path(p).resolve() for p in read_paths]
    _plan_landlock(plan, limits, writable, files)
    if os.geteuid() == 0:
        reason = _user_drop_refusal(limits, work_dir, writable, files, python)
        if reason is None:
            assert limits.user is not None
            plan.uid, plan.gid = _resolve_user(limits.user) or (None, None)
        else:
            plan.gaps["unprivileged_user"] = reason
    return plan


def _plan_rlimits(plan: SandboxPlan, limits: RunnerLimits) -> None:
    if limits.memory_mb:
        plan.rlimits["rlimit_as"] = [limits.memory_mb * MIB] * 2
    if limits.cpu_seconds:
        plan.rlimits["rlimit_cpu"] = [limits.cpu_seconds, limits.cpu_seconds + 5]
    if limits.file_size_mb:
        plan.rlimits["rlimit_fsize"] = [limits.file_size_mb * MIB] * 2
    if limits.max_processes:
        plan.rlimits["rlimit_nproc"] = [limits.max_processes] * 2
    plan.rlimits["no_core_dumps"] = [0, 0]


def _plan_namespaces(plan: SandboxPlan, limits: RunnerLimits) -> None:
    """The subreaper, the PID namespace, seccomp and the network, less what this host cannot give a runner."""
    for name in ("own_pid_namespace", "seccomp"):
        if name in disabled:
            plan.gaps[name] = disabled[name]
    plan.reap = True
    plan.pidns = limits.pid_namespace and "own_pid_namespace" not in disabled
    if not limits.pid_namespace:
        plan.gaps["own_pid_namespace"] = "switched off in the runner's limits"
    plan.seccomp = "seccomp" not in disabled
    if not limits.network:
        plan.netns = "no_network" not in disabled
        plan.landlock_net = True
        if not plan.netns:
            plan.gaps["no_network"] = disabled["no_network"]
    else:
        plan.gaps["no_network"] = "the runner's limits allow the network"


def _plan_landlock(plan: SandboxPlan, limits: RunnerLimits, writable: list[Path], files: list[Path]) -> None:
    """What the runner may read and write under Landlock, and whether Landlock applies at all."""
    # Read roots: never a directory that holds the work directory (the data directory, its SQLite files and
    # the other jobs' folders are there).
    roots: list[Path] = []
    for candidate in [*map(Path, (*_SYSTEM_READ_ROOTS, *_ETC_READ)), *_python_paths(), *RUNNER_PACKAGES]:
        resolved = candidate.resolve() if candidate.exists() else candidate
        if any(_contains(resolved, w) for w in writable) or resolved == Path("/"):
            continue
        if resolved.exists() and resolved not in roots:
            roots.append(resolved)
    plan.read_dirs = [str(p) for p in roots if p.is_dir()]
    plan.read_files = [str(p) for p in [*(r for r in roots if not r.is_dir()), *files]]
    plan.write_dirs = [str(p) for p in writable]
    if limits.landlock and "landlock_fs" not in disabled:
        plan.landlock = True
        plan.confine_reads = limits.confine_reads and "landlock_read" not in disabled
        if limits.confine_reads and not plan.confine_reads:
            plan.gaps["landlock_read"] = disabled["landlock_read"]
    elif not limits.landlock:
        plan.gaps["landlock_fs"] = "switched off in the runner's limits"
    else:
        plan.gaps["landlock_fs"] = disabled["landlock_fs"]


def _user_drop_refusal(
    limits: RunnerLimits, work_dir: Path, writable: list[Path], inputs: list[Path], python: str | None
) -> str | None:
    """Why the runner cannot run as limits.user here, or None when it can."""
    if not limits.user:
        return "the runner's limits keep the worker's user (root)"
    if "unprivileged_user" in disabled:
        return disabled["unprivileged_user"]
    ids = _resolve_user(limits.user)
    if ids is None:
        return f"there is no user {limits.user!r} on this host"
    uid, gid = ids
    if uid == 0:
        return f"user {limits.user!r} is root"
    for path in writable:
        if not _contains(work_dir, path):
            return (
                f"the output folder {path} is outside the work folder, and is not given away to {limits.user}"
            )
    program = python or sys.executable
    needed = [Path(program), Path(os.path.realpath(program)), *RUNNER_PACKAGES]
    if os.path.realpath(program) == os.path.realpath(sys.executable):  # the worker's Python: its library too
        needed += [Path(os.__file__).parent, *filter(None, map(package_dir, ("torch", "numpy")))]
    needed += inputs
    for path in needed:
        if not _readable_by(path, uid, gid):
            return f"{limits.user} (uid {uid}) cannot read {path}"
    if not _readable_by(work_dir.parent, uid, gid, search_only=True):
        return f"{limits.user} (uid {uid}) cannot reach the work folder {work_dir}"
    return None


def _readable_by(path: Path, uid: int, gid: int, *, search_only: bool = False) -> bool:
    """Whether `uid` (groups: just `gid`) can reach and read `path` (or, with `search_only`, enter the
    directory), from the mode bits (ACLs ignored)."""

    def allowed(st: os.stat_result, bits: int) -> bool:
        if st.st_uid == uid:
            return (st.st_mode >> 6) & bits == bits
        if st.st_gid == gid:
            return (st.st_mode >> 3) & bits == bits
        return st.st_mode & bits == bits

    try:
        path = path.resolve()
        for parent in reversed(path.parents):
            if not allowed(parent.stat(), 1):
                return False
        st = path.stat()
    except OSError:
        return False
    if search_only:
        return allowed(st, 1)
    return allowed(st, 5 if stat.S_ISDIR(st.st_mode) else 4)


def _python_paths() -> list[Path]:
    """What a runner reads to start Python and import torch: the executable, the prefixes, site-packages."""
    import site
    import sysconfig

    paths = [Path(sys.executable), Path(os.path.realpath(sys.executable))]
    paths += [Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)]
    paths += [Path(p) for p in sysconfig.get_paths().values()]
    paths += [Path(p) for p in site.getsitepackages()]
    for package in ("torch", "numpy"):
        directory = package_dir(package)
        if directory is not None:
            paths.append(directory)
    return paths


def package_dir(name: str) -> Path | None:
    """Where a top-level package lives, without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parent if spec and spec.origin else None


def _contains(parent: Path, child: Path) -> bool:
    return parent == child or parent in child.parents


def _resolve_user(name: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        if name.isdigit():
            return int(name), int(name)
        return None
