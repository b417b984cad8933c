"""A seccomp filter for the runner: the system calls a model's runner never needs and that would let it reach
the kernel's least-audited surface, or other processes, are refused before the kernel looks at them.

It is a deny list (everything else is allowed): torch, OpenMP, oneDNN, gcc and Python's own subprocess need a
wide and version-dependent set of calls, and what matters here is closing the known escape routes. The filter:

- kills the process outright on a call from another ABI than this build's (an x86_64 process can still enter
  the kernel through `int 0x80` as i386, where every number means something else);
- on x86_64, refuses the x32 ABI (numbers with bit 30 set, and so also -1, which a debugger may set to skip
  a call) with EPERM: the same calls under other numbers;
- refuses DENIED with EPERM, except clone3 (below);
- refuses clone() with any namespace flag with EPERM: only the low 32 bits of its flags argument (args[0] on
  x86_64 and aarch64 alike) are checked, which is where every CLONE_NEW* flag lives;
- answers clone3 with ENOSYS: its flags sit behind a pointer a filter cannot read, and glibc (pthread_create,
  posix_spawn) then falls back to clone(), which is checked. Docker's default profile does the same.

Landlock's own calls (landlock_*) stay allowed, so the filter may be installed before or after Landlock. The
trampoline (workers/sandbox/trampoline.py) installs it last, before exec; docs/security.md ("Seccomp filter")
says what it refuses and why.
Syscall numbers: x86_64 from arch/x86/entry/syscalls/syscall_64.tbl, aarch64 from the generic table
(include/uapi/asm-generic/unistd.h, scripts/syscall.tbl); tests/workers/test_seccomp.py checks them against
this machine's headers.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
import sys

__all__ = ["DENIED", "build_program", "install_runner_filter", "supported"]

# Refused with EPERM. Each entry says why a runner (Python + torch loading a model, quantizing it, maybe
# calling gcc) never needs the call, and what it would open.
_EPERM = (
    # New or foreign namespaces: a user namespace hands the runner every capability inside it, which opens
    # kernel code (netfilter, filesystems, mounts) that is otherwise root-only and has a long CVE history;
    # pid/mount namespaces let it play games with the sandbox's view of the system.
    "unshare",
    "setns",
    # Mounts and root changes: rearranging the filesystem view Landlock was set up against.
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    # The new mount API (Linux 5.2+): the same powers as mount(2) through file descriptors.
    "open_tree",
    "open_tree_attr",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # io_uring performs reads, writes, connects and opens on the kernel's side, where no seccomp filter sees
    # them, and has been one of the richest sources of kernel CVEs.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # The kernel keyring is shared per user and per session: keys of other processes of the same uid.
    "keyctl",
    "add_key",
    "request_key",
    # Reading or writing another process's memory or file descriptors (the worker's, a sibling runner's).
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    # eBPF and perf events: kernel-side programs and counters, large attack surface, side channels.
    "bpf",
    "perf_event_open",
    # userfaultfd stalls kernel page faults at will: the standard tool for winning kernel races.
    "userfaultfd",
    # Replacing the kernel or loading code into it.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    # File handles open any file on a filesystem by number, past directory permissions (the Shocker escape).
    "open_by_handle_at",
    "name_to_handle_at",
    # Watching every file access on a mount.
    "fanotify_init",
    # Host administration: swap, reboot, process accounting, disk quotas, profiling cookies.
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
)
DENIED: tuple[str, ...] = (*_EPERM, "clone3")

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET,
# and CLONE_NEWTIME (0x80), which clone() cannot honour (its low byte is the exit signal, at most 64) but a
# bit no valid call sets.
CLONE_NAMESPACE_FLAGS = 0x7E020000 | 0x00000080

_COMMON = {  # numbers that are the same on x86_64 and aarch64 (the tables were unified at 424)
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "open_tree_attr": 467,
}
_X86_64 = {
    **_COMMON,
    "clone": 56,
    "ptrace": 101,
    "pivot_root": 155,
    "chroot": 161,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "fanotify_init": 300,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
}
_AARCH64 = {
    **_COMMON,
    "lookup_dcookie": 18,
    "umount2": 39,
    "mount": 40,
    "pivot_root": 41,
    "chroot": 51,
    "quotactl": 60,
    "acct": 89,
    "unshare": 97,
    "kexec_load": 104,
    "init_module": 105,
    "delete_module": 106,
    "ptrace": 117,
    "reboot": 142,
    "add_key": 217,
    "request_key": 218,
    "keyctl": 219,
    "clone": 220,
    "swapon": 224,
    "swapoff": 225,
    "perf_event_open": 241,
    "fanotify_init": 262,
    "name_to_handle_at": 264,
    "open_by_handle_at": 265,
    "setns": 268,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "finit_module": 273,
    "bpf": 280,
    "userfaultfd": 282,
    "kexec_file_load": 294,
}
# platform.machine() -> (AUDIT_ARCH_* from include/uapi/linux/audit.h, syscall numbers)
SYSCALL_TABLES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, _X86_64),
    "aarch64": (0xC00000B7, _AARCH64),
}

# Classic BPF (include/uapi/linux/filter.h, bpf_common.h) and seccomp (include/uapi/linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ALLOW = 0x80000000, 0x7FFF0000
RET_EPERM, RET_ENOSYS = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]. Little-endian only
# (supported() checks), so the low half of args[0] is at 16.
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
_X32_SYSCALL_BIT = 0x40000000
PR_GET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 39, 22, 2

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def supported() -> str | None:
    """None when the filter can be built for this process, otherwise why not."""
    if not sys.platform.startswith("linux"):
        return f"seccomp filter: {sys.platform} is not Linux"
    machine = platform.machine()
    if machine not in SYSCALL_TABLES:
        return f"seccomp filter: architecture {machine} is not handled"
    if struct.calcsize("P") != 8 or sys.byteorder != "little":
        return f"seccomp filter: only 64-bit little-endian {machine} processes are handled"
    return None


def build_program(machine: str) -> list[Instruction]:
    """The filter for `machine` (a key of SYSCALL_TABLES) as (code, jt, jf, k) instructions."""
    audit_arch, numbers = SYSCALL_TABLES[machine]
    # Jumps name a label; they are resolved to forward offsets once the layout is known.
    code: list[tuple[int, int | str, int | str, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, audit_arch),
        (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        code.append((_JGE_K, "eperm", 0, _X32_SYSCALL_BIT))
    code.append((_JEQ_K, "enosys", 0, numbers["clone3"]))
    code.append((_JEQ_K, "clone", 0, numbers["clone"]))
    code += [(_JEQ_K, "eperm", 0, numbers[name]) for name in _EPERM]
    labels: dict[str, int] = {}
    tail: list[tuple[str | None, tuple[int, int | str, int | str, int]]] = [
        (None, (_RET_K, 0, 0, RET_ALLOW)),
        ("clone", (_LD_W_ABS, 0, 0, _ARG0_LOW)),
        (None, (_JSET_K, "eperm", 0, CLONE_NAMESPACE_FLAGS)),
        (None, (_RET_K, 0, 0, RET_ALLOW)),
        ("enosys", (_RET_K, 0, 0, RET_ENOSYS)),
        ("eperm", (_RET_K, 0, 0, RET_EPERM)),
    ]
    for label, instruction in tail:
        if label:
            labels[label] = len(code)
        code.append(instruction)

    def offset(target: int | str, at: int) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - at - 1
        if not 0 <= jump <= 255:
            raise ValueError(f"seccomp filter: jump to {target} from {at} does not fit in 8 bits")
        return jump

    return [(op, offset(jt, at), offset(jf, at), k) for at, (op, jt, jf, k) in enumerate(code)]


def install_runner_filter() -> None:
    """Install the runner's filter on the calling thread (and so on everything it executes or starts).

    The caller must have set PR_SET_NO_NEW_PRIVS already (the sandbox's trampoline does), and should be
    single-threaded: other threads stay unfiltered. Irreversible for this process.

    Raises:
        OSError: the architecture is not handled (see supported()), no_new_privs is not set, or the kernel
            refused the filter (no CONFIG_SECCOMP_FILTER, or a container's own profile forbids it).
    """
    reason = supported()
    if reason:
        raise OSError(errno.EOPNOTSUPP, reason)
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    # The kernel would accept a filter without no_new_privs from a root caller; the contract is the same
    # for every caller, so that a set-uid program can never run under a filter it did not expect.
    if prctl(PR_GET_NO_NEW_PRIVS, 0, None, 0, 0) != 1:
        raise OSError(errno.EPERM, "seccomp filter: set PR_SET_NO_NEW_PRIVS before installing it")
    program = build_program(platform.machine())
    instructions = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), instructions)
    if prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter refused by the kernel: {errno.errorcode.get(err, err)}")
