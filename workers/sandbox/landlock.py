"""Landlock for the runner: writes only inside the work and output directories (plus /dev/null: not /tmp, nor
/dev/shm), reads only of the system directories, a short list of /etc files, the Python installation, the
`workers` package and the inputs, no TCP bind/connect (ABI >= 4), no signals or abstract unix sockets outside
the sandbox (ABI >= 6). docs/security.md ("The runner") says what this leaves open.

The ruleset is built from the plan's paths (workers/sandbox/policy.py) and restricts the calling thread and
whatever it executes; it cannot be lifted.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys

from workers.sandbox.policy import SandboxPlan
from workers.sandbox.syscalls import check, libc

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel, 0 where it has none or a seccomp profile refuses it."""
    if not sys.platform.startswith("linux"):
        return 0
    version = libc().syscall(
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


def _create_ruleset(plan: SandboxPlan, abi: int, handled: int) -> tuple[int, list[str]]:
    """A ruleset handling every right this ABI knows; returns its fd and the protections it will give."""
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
    ruleset = check(
        libc().syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
        "landlock_create_ruleset",
    )
    return ruleset, given


def _allow(ruleset: int, handled: int, path: str, access: int) -> None:
    """Add a rule: `access` (of the handled rights) beneath `path`; a file gets only the rights files have."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist needs no rule
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (handled & (FS_TRUNCATE | FS_IOCTL_DEV))
        rule = _PathBeneathAttr(allowed_access=access & handled, parent_fd=fd)
        check(
            libc().syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(fd)


def apply_landlock(plan: SandboxPlan, abi: int) -> list[str]:
    """Restrict this thread (and whatever it executes) per the plan; returns the protections it gave."""
    handled = _fs_rights(abi)
    ruleset, given = _create_ruleset(plan, abi, handled)
    try:
        if plan.confine_reads:
            for path in plan.read_dirs:
                _allow(ruleset, handled, path, _READ)
            for path in plan.read_files:
                _allow(ruleset, handled, path, FS_READ_FILE)
            # Devices one by one: a root runner must not read a raw disk (the data directory is on one).
            for name in ("/dev/random", "/dev/urandom"):
                _allow(ruleset, handled, name, FS_READ_FILE | FS_IOCTL_DEV)
            given.append("landlock_read")
        else:
            _allow(ruleset, handled, "/", _READ | FS_IOCTL_DEV)
        for name in ("/dev/null", "/dev/zero", "/dev/full"):
            _allow(ruleset, handled, name, FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV)
        for path in plan.write_dirs:
            _allow(ruleset, handled, path, handled)
        check(libc().syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return given
