"""The runner's sandbox: what a child process that loads an untrusted model may do, applied between fork and
exec, degrading gracefully where the kernel (or a container's seccomp profile) refuses a protection.

The child is started through a small trampoline, `python -S -c <boot> SOURCE PLAN ARGV...`, that runs in the
new process before the real program is executed (nothing but exec happens between fork and exec in the worker,
which may have threads). In order, where the plan asks for it and the kernel permits:

1. a new network namespace (`unshare(CLONE_NEWNET)` as root, a user + network namespace otherwise): no
   network at all, not even loopback;
2. resource limits: address space (RLIMIT_AS), CPU time (RLIMIT_CPU: SIGXCPU, then SIGKILL 5 s later), file
   size (RLIMIT_FSIZE), processes (RLIMIT_NPROC: it counts every thread of the uid and does not bind root, so it
   is in force only for a non-root runner), no core dumps;
3. no capabilities: the bounding and ambient sets are emptied, so even a runner that stays root executes
   without any (it cannot bypass file permissions nor read the worker's memory or environment);
4. an unprivileged user (`nobody` by default) when the worker is root and that user can read the Python, the
   `workers` package and the inputs (a Python under a 0700 home cannot be started by it); the work directory is
   then handed to that user, mode 0700;
5. `PR_SET_PDEATHSIG(SIGKILL)`: the runner dies with the thread that started it (the worker's);
6. `PR_SET_NO_NEW_PRIVS` and Landlock: writes only inside the work and output directories (plus /dev/null:
   not /tmp, nor /dev/shm; TMPDIR and HOME are the work directory), reads only of the system directories, a
   short list of /etc files, the Python installation, the `workers` package and the inputs (the data
   directory, its SQLite files and the other jobs' folders are out of reach), no TCP bind/connect (ABI >= 4)
   and no signals or abstract unix sockets outside the sandbox (ABI >= 6).

The trampoline prints one JSON line, {"event": "sandbox", "in_force": [...], "gaps": {...}}, on stdout before
it executes the program: what the run actually got. `sandbox_report()` probes once per process what a runner
gets on this host by starting a tiny child under the full sandbox and checking each protection from inside.

Not covered: pathname unix sockets (Landlock cannot restrict connect(2) to them; the user drop and the clean
environment are what stands between a runner and, say, a database socket), reads of world-readable files under
the system directories, and /proc entries that are not ptrace-protected (other processes' command lines).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pwd
import resource
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

# Imported here, not when the filter is installed: by then the trampoline may run as a user who cannot read
# this Python's standard library.
from workers import seccomp

log = logging.getLogger("qaas.worker")

__all__ = [
    "MIN_MEMORY_MB",
    "RunnerLimits",
    "SandboxPlan",
    "harden_worker_process",
    "plan_sandbox",
    "sandbox_gaps",
    "sandbox_report",
    "spawn",
]

MIB = 1024 * 1024
# Measured on torch 2.13 (CPU build), Python 3.11, x86_64, 2 cores, MALLOC_ARENA_MAX=2, one thread: `import
# torch` needs 640 MB of address space (576 MB fails; 512 MB, ENGINE_NOTES, too); a dynamic quantization of a
# small MLP 700 MB; a static x86 job with its AOTInductor compile (small CNN) 896 MB (768 MB fails in the
# compile) while gcc's cc1plus peaks at 620 MB. Each thread adds its stack (8 MB) and more: give room.
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

_SOURCE_PACKAGE = Path(__file__).resolve().parent  # .../workers
# What the runner imports from this source tree: the engine, and the pure contract modules in `qaas`.
_RUNNER_PACKAGES = (_SOURCE_PACKAGE, _SOURCE_PACKAGE.parent / "qaas")
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


# --- primitives -----------------------------------------------------------------------------------------------

PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 2, 4, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option: int, arg: int = 0) -> int:
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return _check(libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel, 0 where it has none or a seccomp profile refuses it."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    version = libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(0, int(version))


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def _apply_landlock(plan: SandboxPlan, abi: int) -> list[str]:
    """Restrict this thread (and whatever it executes) per the plan; returns the protections it gave."""
    libc = _libc()
    handled = _fs_rights(abi)
    attr = _RulesetAttr(handled_access_fs=handled)
    size = 8
    given = ["landlock_fs"]
    if plan.landlock_net and abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # no rule: no TCP at all
        size = 16
        given.append("no_tcp")
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
        given.append("landlock_scope")
    ruleset = _check(
        libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
        "landlock_create_ruleset",
    )
    file_rights = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (handled & (FS_TRUNCATE | FS_IOCTL_DEV))
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR

    def allow(path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # a path that does not exist needs no rule
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= file_rights
            rule = _PathBeneathAttr(allowed_access=access & handled, parent_fd=fd)
            _check(
                libc.syscall(
                    SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0
                ),
                f"landlock_add_rule({path})",
            )
        finally:
            os.close(fd)

    try:
        if plan.confine_reads:
            for path in plan.read_dirs:
                allow(path, read)
            for path in plan.read_files:
                allow(path, FS_READ_FILE)
            # Devices one by one: a root runner must not read a raw disk (the data directory is on one).
            for name in ("/dev/random", "/dev/urandom"):
                allow(name, FS_READ_FILE | FS_IOCTL_DEV)
            given.append("landlock_read")
        else:
            allow("/", read | FS_IOCTL_DEV)
        for name in ("/dev/null", "/dev/zero", "/dev/full"):
            allow(name, FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV)
        for path in plan.write_dirs:
            allow(path, handled)
        _check(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return given


def _unshare(flags: int) -> None:
    _check(_libc().unshare(flags), "unshare")


def _map_own_ids(uid: int, gid: int) -> None:
    """In a new user namespace: map the caller's uid and gid to themselves."""
    for name, text in (
        ("uid_map", f"{uid} {uid} 1\n"),
        ("setgroups", "deny\n"),
        ("gid_map", f"{gid} {gid} 1\n"),
    ):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def _unshare_as_caller(flags: int) -> None:
    """unshare(flags) as root directly; otherwise inside a new user namespace mapping the caller to itself."""
    if os.geteuid() == 0:
        _unshare(flags)
        return
    uid, gid = os.geteuid(), os.getegid()
    _unshare(CLONE_NEWUSER | flags)
    _map_own_ids(uid, gid)


def _enter_network_namespace() -> None:
    """A network namespace with nothing in it (loopback down)."""
    _unshare_as_caller(CLONE_NEWNET)


def _mount_own_proc() -> None:
    """In the new mount namespace (changes stay private to it): a /proc of the new PID namespace only, so the
    runner sees no other process on the host (their command lines, environments, open files)."""
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount(/, private)")
    _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount(/proc)")


def _children() -> list[int]:
    """The PIDs whose parent is this process (read from /proc, which lists them whatever they did)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 1 and int(fields[1]) == me:
                found.append(int(entry))
    return found


def _reap_and_mirror(pid: int, *, own_namespace: bool) -> None:
    """The trampoline, outside: wait for the runner, kill and reap whatever it left behind (this process is
    their subreaper: orphans of a double fork or `setsid` come back to it), then end the way the runner did,
    so the worker sees its exit status or signal. Never returns.

    When the runner is the init of its own PID namespace the kernel has done the killing by the time it is
    reaped; this process then reads no /proc (the one it sees is the namespace's, with the namespace's PIDs)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
    while not own_namespace:  # a process killed here cannot fork again; what it forked before comes back
        for child in _children():
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(os.waitstatus_to_exitcode(status))


def _fork_runner(pidns: bool) -> tuple[int, Callable[[], bool], str | None]:
    """Fork the runner off the trampoline, which stays behind as its subreaper (_reap_and_mirror) and never
    returns; with `pidns`, in a PID namespace (and a mount namespace) of its own, whose init the runner
    becomes: when the init dies, the kernel kills everything in the namespace.

    Returns, in the child: its PID as the worker sees it (the worker watches it until it is gone), a check
    that the trampoline is still alive (in a namespace, getppid() is 0: the parent is outside), and why there
    is no PID namespace when one was asked for and refused (None otherwise)."""
    refused = None
    if pidns:
        try:
            _unshare_as_caller(CLONE_NEWPID | CLONE_NEWNS)
        except OSError as exc:
            refused = f"a new PID namespace was refused ({exc.strerror})"
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        # Outside the runner's Landlock domain and seccomp filter: a same-uid runner must not be able to read
        # or write this process's memory through /proc/<pid>/mem.
        _prctl(PR_SET_DUMPABLE, 0)
        os.close(ready_r)
        os.write(ready_w, f"{pid}\n".encode())
        # ready_w stays open until this process exits: its EOF tells the child that the trampoline is gone.
        _reap_and_mirror(pid, own_namespace=pidns and refused is None)
    os.close(ready_w)
    alive = _pipe_open(ready_r)
    _arm_parent_death_signal(lambda: True)  # checked below, once the PID has arrived
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(ready_r, 32)
        if not chunk:
            os._exit(125)  # the trampoline died before the signal was armed
        line += chunk
    return int(line), alive, refused


_RLIMITS = {
    "rlimit_as": resource.RLIMIT_AS,
    "rlimit_cpu": resource.RLIMIT_CPU,
    "rlimit_fsize": resource.RLIMIT_FSIZE,
    "rlimit_nproc": resource.RLIMIT_NPROC,
    "no_core_dumps": resource.RLIMIT_CORE,
}


def _set_rlimit(name: str, soft: int, hard: int) -> None:
    which = _RLIMITS[name]
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY and os.geteuid() != 0:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def _drop_capabilities() -> None:
    """Empty the bounding and ambient sets: what this process executes has no capabilities, root included (a
    root runner then cannot bypass file permissions, nor read a non-dumpable worker's memory or environment)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            last = int(handle.read())
    except (OSError, ValueError):
        last = 40
    with contextlib.suppress(OSError):
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap)


def _permitted_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    return -1


def _arm_parent_death_signal(parent_alive: Callable[[], bool]) -> None:
    """SIGKILL when the parent dies; exit at once if it already has (the signal would never come)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not parent_alive():
        os._exit(125)


def _pipe_open(fd: int) -> Callable[[], bool]:
    """Whether the process holding the write end of the pipe `fd` reads from is alive (no EOF yet)."""

    def alive() -> bool:
        readable, _, _ = select.select([fd], [], [], 0)
        return not readable

    return alive


def apply_plan(plan: SandboxPlan) -> tuple[list[str], dict[str, str]]:
    """Apply the plan to this process (the trampoline, before exec). Returns (in force, gaps).

    With `plan.reap` the trampoline forks: this function then returns in the child, the runner (the init of a
    new PID namespace with `plan.pidns`), and the parent stays behind to reap it (_fork_runner)."""
    in_force = ["clean_env", "new_session"]
    gaps = dict(plan.gaps)
    # The worker's thread dies: so does the trampoline, and (below) everything it started.
    _arm_parent_death_signal(lambda: os.getppid() == plan.parent_pid)
    if plan.netns:
        try:
            _enter_network_namespace()
            in_force.append("no_network")
        except OSError as exc:
            gaps["no_network"] = f"a new network namespace was refused ({exc.strerror})"
    parent_alive: Callable[[], bool] = lambda: os.getppid() == plan.parent_pid  # noqa: E731
    outside_pid = os.getpid()
    if plan.reap:
        # A user namespace change may clear the signal: arm it again before the fork.
        _arm_parent_death_signal(parent_alive)
        outside_pid, parent_alive, refused = _fork_runner(plan.pidns)
        in_force.append("runner_reaped")
        if plan.pidns and refused is None:
            in_force.append("own_pid_namespace")
            try:
                _mount_own_proc()
                in_force.append("proc_hidden")
            except OSError as exc:
                gaps["proc_hidden"] = f"a /proc of the runner's own could not be mounted ({exc.strerror})"
        elif plan.pidns:
            gaps["own_pid_namespace"] = refused or ""
            gaps["proc_hidden"] = "needs the runner's own PID namespace"
    for name, (soft, hard) in plan.rlimits.items():
        try:
            _set_rlimit(name, soft, hard)
            in_force.append(name)
        except (OSError, ValueError) as exc:
            gaps[name] = f"setrlimit failed ({exc})"
    # Before the user changes: emptying the bounding set takes CAP_SETPCAP.
    try:
        _drop_capabilities()
        capabilities_gone = True
    except OSError as exc:
        capabilities_gone = False
        gaps["no_capabilities"] = f"the capability bounding set could not be emptied ({exc.strerror})"
    if plan.uid is not None and plan.gid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(plan.gid)
        os.setuid(plan.uid)
        in_force.append("unprivileged_user")
    if "rlimit_nproc" in in_force and os.geteuid() == 0:
        in_force.remove("rlimit_nproc")
        gaps["rlimit_nproc"] = "the runner runs as root, which RLIMIT_NPROC does not bind"
    # After the last credential change: a change of uid clears the parent-death signal.
    _arm_parent_death_signal(parent_alive)
    in_force.append("pdeathsig")
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        in_force.append("no_new_privs")
        # A non-root process without permitted capabilities gains none through execve under no_new_privs.
        if not capabilities_gone and os.geteuid() != 0 and _permitted_capabilities() == 0:
            capabilities_gone = True
            gaps.pop("no_capabilities", None)
    except OSError as exc:
        gaps["no_new_privs"] = str(exc)
    if capabilities_gone:
        in_force.append("no_capabilities")
    if plan.landlock:
        abi = landlock_abi()
        if abi < 1:
            gaps["landlock_fs"] = "the kernel has no Landlock (or a seccomp profile refuses it)"
        else:
            try:
                in_force += _apply_landlock(plan, abi)
            except OSError as exc:
                gaps["landlock_fs"] = f"Landlock was refused ({exc})"
    if plan.landlock_net and "no_tcp" not in in_force and "no_network" not in in_force:
        gaps.setdefault("no_tcp", "neither a network namespace nor Landlock ABI >= 4 is available")
    if plan.seccomp:
        reason = seccomp.supported()
        if reason is not None:
            gaps["seccomp"] = reason
        elif "no_new_privs" not in in_force:
            gaps["seccomp"] = "needs no_new_privs"
        else:
            try:
                seccomp.install_runner_filter()
                in_force.append("seccomp")
            except OSError as exc:
                gaps["seccomp"] = f"the seccomp filter was refused ({exc.strerror})"
    plan.outside_pid = outside_pid
    return _ordered(in_force), gaps


def _ordered(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [name for name in PROTECTIONS if name in names] + sorted(names - set(PROTECTIONS))


def _boot() -> None:
    """The trampoline's entry: `python -S -c BOOT SOURCE_ROOT PLAN_JSON PROGRAM ARGS...`."""
    plan = SandboxPlan(**json.loads(sys.argv[2]))
    argv = sys.argv[3:]
    try:
        in_force, gaps = apply_plan(plan)
    except Exception as exc:  # never run the program half-sandboxed by surprise
        print(
            f"qaas sandbox: could not set up the runner's sandbox: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        os._exit(126)
    if plan.announce:
        event = {"event": "sandbox", "in_force": in_force, "gaps": gaps, "pid": plan.outside_pid}
        line = json.dumps(event) + "\n"
        os.write(1, line.encode())
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        print(f"qaas sandbox: cannot execute {argv[0]}: {exc}", file=sys.stderr)
        os._exit(127)


_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from workers.sandbox import _boot; _boot()"


# --- planning (in the worker) -----------------------------------------------------------------------------------


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
        directory = _package_dir(package)
        if directory is not None:
            paths.append(directory)
    return paths


def _package_dir(name: str) -> Path | None:
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


_disabled: dict[str, str] = {}  # protections that the probe found to break the runner on this host
_disabled_lock = threading.RLock()  # held while a probe tries the sandbox without one of them


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
    with _disabled_lock:
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
    if limits.memory_mb:
        plan.rlimits["rlimit_as"] = [limits.memory_mb * MIB] * 2
    if limits.cpu_seconds:
        plan.rlimits["rlimit_cpu"] = [limits.cpu_seconds, limits.cpu_seconds + 5]
    if limits.file_size_mb:
        plan.rlimits["rlimit_fsize"] = [limits.file_size_mb * MIB] * 2
    if limits.max_processes:
        plan.rlimits["rlimit_nproc"] = [limits.max_processes] * 2
    plan.rlimits["no_core_dumps"] = [0, 0]
    for name in ("own_pid_namespace", "seccomp"):
        if name in _disabled:
            plan.gaps[name] = _disabled[name]
    plan.reap = True
    plan.pidns = limits.pid_namespace and "own_pid_namespace" not in _disabled
    if not limits.pid_namespace:
        plan.gaps["own_pid_namespace"] = "switched off in the runner's limits"
    plan.seccomp = "seccomp" not in _disabled
    if not limits.network:
        plan.netns = "no_network" not in _disabled
        plan.landlock_net = True
        if not plan.netns:
            plan.gaps["no_network"] = _disabled["no_network"]
    else:
        plan.gaps["no_network"] = "the runner's limits allow the network"

    # Read roots: never a directory that holds the work directory (the data directory, its SQLite files and
    # the other jobs' folders are there).
    roots: list[Path] = []
    for candidate in [*map(Path, (*_SYSTEM_READ_ROOTS, *_ETC_READ)), *_python_paths(), *_RUNNER_PACKAGES]:
        resolved = candidate.resolve() if candidate.exists() else candidate
        if any(_contains(resolved, w) for w in writable) or resolved == Path("/"):
            continue
        if resolved.exists() and resolved not in roots:
            roots.append(resolved)
    files = [Path(p).resolve() for p in read_paths]
    plan.read_dirs = [str(p) for p in roots if p.is_dir()]
    plan.read_files = [str(p) for p in [*(r for r in roots if not r.is_dir()), *files]]
    plan.write_dirs = [str(p) for p in writable]
    if limits.landlock and "landlock_fs" not in _disabled:
        plan.landlock = True
        plan.confine_reads = limits.confine_reads and "landlock_read" not in _disabled
        if limits.confine_reads and not plan.confine_reads:
            plan.gaps["landlock_read"] = _disabled["landlock_read"]
    elif not limits.landlock:
        plan.gaps["landlock_fs"] = "switched off in the runner's limits"
    else:
        plan.gaps["landlock_fs"] = _disabled["landlock_fs"]

    if os.geteuid() == 0:
        reason = _user_drop_refusal(limits, work_dir, writable, files, python)
        if reason is None:
            assert limits.user is not None
            plan.uid, plan.gid = _resolve_user(limits.user) or (None, None)
        else:
            plan.gaps["unprivileged_user"] = reason
    return plan


def _user_drop_refusal(
    limits: RunnerLimits, work_dir: Path, writable: list[Path], inputs: list[Path], python: str | None
) -> str | None:
    """Why the runner cannot run as limits.user here, or None when it can."""
    if not limits.user:
        return "the runner's limits keep the worker's user (root)"
    if "unprivileged_user" in _disabled:
        return _disabled["unprivileged_user"]
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
    needed = [Path(program), Path(os.path.realpath(program)), *_RUNNER_PACKAGES]
    if os.path.realpath(program) == os.path.realpath(sys.executable):  # the worker's Python: its library too
        needed += [Path(os.__file__).parent, *filter(None, map(_package_dir, ("torch", "numpy")))]
    needed += inputs
    for path in needed:
        if not _readable_by(path, uid, gid):
            return f"{limits.user} (uid {uid}) cannot read {path}"
    if not _readable_by(work_dir.parent, uid, gid, search_only=True):
        return f"{limits.user} (uid {uid}) cannot reach the work folder {work_dir}"
    return None


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
    for package in _RUNNER_PACKAGES:
        link = shim / package.name
        if not link.is_symlink():
            link.symlink_to(package, target_is_directory=True)
    return str(shim)


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
    child_env = dict(env)
    child_env.setdefault("MALLOC_ARENA_MAX", "2")  # glibc's per-thread arenas cost address space, not memory
    if plan.confine_reads and "PYTHONPATH" in child_env:
        paths = child_env["PYTHONPATH"].split(os.pathsep)
        source_root = str(_SOURCE_PACKAGE.parent)
        if source_root in paths and str(_SOURCE_PACKAGE.parent) not in plan.read_dirs:
            paths[paths.index(source_root)] = _source_shim(work_dir)
            child_env["PYTHONPATH"] = os.pathsep.join(paths)
    if plan.uid is not None and plan.gid is not None:
        child_env["USER"] = child_env["LOGNAME"] = _user_name(plan.uid)
        _give_away(work_dir, plan.uid, plan.gid)
    # The trampoline (this Python, no site) finds this module through the source root given on its command
    # line, whatever the child's PYTHONPATH is.
    command = [
        sys.executable,
        "-S",
        "-c",
        _BOOT,
        str(_SOURCE_PACKAGE.parent),
        json.dumps(asdict(plan)),
        *argv,
    ]
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


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "runner"


# --- the worker's side ------------------------------------------------------------------------------------------


def harden_worker_process() -> list[str]:
    """Call once at worker start: makes the worker non-dumpable, so that a runner with the same uid can neither
    read /proc/<worker>/environ or /proc/<worker>/mem nor ptrace it. Returns what it set."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except OSError as exc:
        log.warning("could not make the worker non-dumpable: %s", exc)
        return []
    return ["worker_not_dumpable"]


# --- the probe --------------------------------------------------------------------------------------------------

_PROBE = r"""
import json, os, socket, sys, ctypes, resource
port, outside_file, outside_dir, want_torch = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
worker = int(sys.argv[5])
found, notes = [], {}
secret = [k for k in os.environ if k.startswith(("QAAS_", "AWS_")) or k.endswith(("_URL", "_PASSWORD", "_SECRET", "_TOKEN"))]
if not secret:
    found.append("clean_env")
limits = {"rlimit_as": resource.RLIMIT_AS, "rlimit_cpu": resource.RLIMIT_CPU,
          "rlimit_fsize": resource.RLIMIT_FSIZE, "rlimit_nproc": resource.RLIMIT_NPROC}
for name, which in limits.items():
    if resource.getrlimit(which)[0] != resource.RLIM_INFINITY and (name != "rlimit_nproc" or os.getuid() != 0):
        found.append(name)
if resource.getrlimit(resource.RLIMIT_CORE)[0] == 0:
    found.append("no_core_dumps")
if os.getsid(0) == os.getpid() or os.getpgid(0) == os.getsid(0):
    found.append("new_session")
libc = ctypes.CDLL(None, use_errno=True)
sig = ctypes.c_int(0)
libc.prctl(2, ctypes.byref(sig), 0, 0, 0)
if sig.value == 9:
    found.append("pdeathsig")
try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    notes["no_network"] = "connected to the worker's loopback"
except OSError as exc:
    found.append("no_tcp")
    if {name for _, name in socket.if_nameindex()} <= {"lo"}:
        found.append("no_network")
if os.getuid() != 0:
    found.append("unprivileged_user")
with open("/proc/self/status") as status:
    fields = dict(line.split(":", 1) for line in status.read().splitlines() if ":" in line)
if fields.get("NoNewPrivs", "").strip() == "1":
    found.append("no_new_privs")
caps = {name: int(fields.get(name, "1").strip(), 16) for name in ("CapEff", "CapPrm", "CapAmb", "CapBnd")}
if caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0 and (caps["CapBnd"] == 0 or "no_new_privs" in found):
    found.append("no_capabilities")
try:
    open(os.path.join(outside_dir, "canary"), "w").close()
    notes["landlock_fs"] = "wrote outside the work folder"
except OSError:
    found.append("landlock_fs")
try:
    open(outside_file).read()
    notes["landlock_read"] = "read a file outside the work folder"
except OSError:
    found.append("landlock_read")
try:
    os.kill(worker, 0)
    notes["landlock_scope"] = "could signal the worker"
except OSError:
    found.append("landlock_scope")
try:
    open(f"/proc/{worker}/environ", "rb").read()
    notes["parent_unreadable"] = "read the worker's environment"
except OSError:
    found.append("parent_unreadable")
if os.getpid() == 1:
    found.append("own_pid_namespace")
if os.getppid() != worker:
    found.append("runner_reaped")
if not os.path.exists(f"/proc/{worker}") and sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:1] == [1]:
    found.append("proc_hidden")
else:
    notes["proc_hidden"] = "the worker's /proc entry is visible"
if fields.get("Seccomp", "").strip() == "2":
    found.append("seccomp")
if want_torch:
    try:
        import torch
        torch.ones(4).sum()
    except BaseException as exc:
        notes["torch"] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"found": found, "notes": notes}))
"""


@dataclass
class _ProbeResult:
    in_force: list[str]
    gaps: dict[str, str]
    torch_error: str | None = None


def _probe(limits: RunnerLimits, want_torch: bool) -> _ProbeResult:
    """Start a tiny child under the full sandbox and check each protection from inside it."""
    import socket

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
            "PYTHONPATH": str(_SOURCE_PACKAGE.parent),
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        proc, plan = spawn(
            [
                sys.executable,
                "-c",
                _PROBE,
                str(port),
                str(secret),
                str(outside),
                "1" if want_torch else "0",
                str(os.getpid()),
            ],
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
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    announced = next((line for line in lines if line.get("event") == "sandbox"), None)
    verdict = next((line for line in lines if "found" in line), None)
    if announced is None or verdict is None:
        detail = (err or "").strip()[-500:] or f"exit status {proc.returncode}"
        return _ProbeResult([], {"runner": f"a sandboxed child did not start: {detail}"}, torch_error=detail)
    gaps = dict(announced.get("gaps") or {})
    found = set(verdict["found"])
    applied = set(announced["in_force"]) | {"parent_unreadable"}
    for name, note in verdict["notes"].items():
        if name in PROTECTIONS:
            gaps.setdefault(name, note)
    in_force = _ordered(name for name in found if name in applied)
    return _ProbeResult(in_force, gaps, verdict["notes"].get("torch"))


_report_lock = threading.Lock()
_reports: dict[RunnerLimits, _ProbeResult] = {}


def _probe_with_fallbacks(limits: RunnerLimits) -> _ProbeResult:
    """The full sandbox first. Where torch (or the child itself) cannot start under it, find the one protection
    whose absence lets it start, and leave that one off for the runners that follow (logged, and named in
    sandbox_gaps())."""
    want_torch = _package_dir("torch") is not None
    result = _probe(limits, want_torch)
    if result.torch_error is None:
        return result
    with _disabled_lock:  # runners of other threads wait rather than start during a trial
        for protection in (
            "seccomp",
            "own_pid_namespace",
            "landlock_read",
            "unprivileged_user",
            "no_network",
            "landlock_fs",
        ):
            if protection in result.gaps or protection in _disabled:
                continue
            reason = f"torch could not start under it ({result.torch_error[-300:]})"
            _disabled[protection] = reason
            trial = _probe(limits, want_torch)
            if trial.torch_error is None:
                log.warning("runner sandbox: %s is off: %s", protection, reason)
                trial.gaps[protection] = reason
                return trial
            del _disabled[protection]
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
