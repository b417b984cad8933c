"""The system calls the sandbox makes, through ctypes where Python has no wrapper: prctl, unshare, mount, the
resource limits, the capability sets, the parent-death signal. What each one protects against, and the order
the trampoline applies them in, is in docs/security.md ("The runner").

Each helper raises OSError (errno and the call's name) when the kernel refuses; the trampoline turns a refusal
into a named gap rather than a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 2, 4, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18

_libc_handle: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """This process's C library, loaded once, with errno kept for check()."""
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def check(result: int, what: str) -> int:
    """`result` when it is not negative; otherwise OSError with the call's errno, named `what`."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg: int = 0) -> int:
    handle = libc()
    handle.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return check(handle.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def unshare(flags: int) -> None:
    check(libc().unshare(flags), "unshare")


def _map_own_ids(uid: int, gid: int) -> None:
    """In a new user namespace: map the caller's uid and gid to themselves."""
    for name, text in (
        ("uid_map", f"{uid} {uid} 1\n"),
        ("setgroups", "deny\n"),
        ("gid_map", f"{gid} {gid} 1\n"),
    ):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


def unshare_as_caller(flags: int) -> None:
    """unshare(flags) as root directly; otherwise inside a new user namespace mapping the caller to itself."""
    if os.geteuid() == 0:
        unshare(flags)
        return
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER | flags)
    _map_own_ids(uid, gid)


def enter_network_namespace() -> None:
    """A network namespace with nothing in it (loopback down)."""
    unshare_as_caller(CLONE_NEWNET)


def mount_own_proc() -> None:
    """In the new mount namespace (changes stay private to it): a /proc of the new PID namespace only, so the
    runner sees no other process on the host (their command lines, environments, open files)."""
    handle = libc()
    handle.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    check(handle.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount(/, private)")
    check(handle.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount(/proc)")


def children() -> list[int]:
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


RLIMITS = {
    "rlimit_as": resource.RLIMIT_AS,
    "rlimit_cpu": resource.RLIMIT_CPU,
    "rlimit_fsize": resource.RLIMIT_FSIZE,
    "rlimit_nproc": resource.RLIMIT_NPROC,
    "no_core_dumps": resource.RLIMIT_CORE,
}


def set_rlimit(name: str, soft: int, hard: int) -> None:
    """Set the limit a protection (a key of RLIMITS) names; a non-root caller stays under its hard limit."""
    which = RLIMITS[name]
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY and os.geteuid() != 0:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def drop_capabilities() -> None:
    """Empty the bounding and ambient sets: what this process executes has no capabilities, root included (a
    root runner then cannot bypass file permissions, nor read a non-dumpable worker's memory or environment)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            last = int(handle.read())
    except (OSError, ValueError):
        last = 40
    with contextlib.suppress(OSError):
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)


def permitted_capabilities() -> int:
    """This process's permitted capability set, -1 when /proc does not say."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    return -1


def arm_parent_death_signal(parent_alive: Callable[[], bool]) -> None:
    """SIGKILL when the parent dies; exit at once if it already has (the signal would never come)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not parent_alive():
        os._exit(125)


def pipe_open(fd: int) -> Callable[[], bool]:
    """Whether the process holding the write end of the pipe `fd` reads from is alive (no EOF yet)."""

    def alive() -> bool:
        readable, _, _ = select.select([fd], [], [], 0)
        return not readable

    return alive
