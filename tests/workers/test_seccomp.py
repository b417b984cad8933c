"""The runner's seccomp filter (workers/sandbox/seccomp.py), with real processes: each check runs in a fresh
child that sets no_new_privs, installs the filter and reports what the kernel answered, so the test process
itself is never filtered. The filter's program is also run through a small classic-BPF interpreter for both
architectures, so the aarch64 table is exercised on an x86_64 machine too."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fail_or_skip
from workers.sandbox import seccomp

ROOT = Path(__file__).resolve().parents[2]

# Run in the child: `python -c PROBE MODE`, MODE one of filtered, unfiltered, torch, no_nnp.
PROBE = r"""
import ctypes, errno, json, os, platform, subprocess, sys, threading
from workers.sandbox import seccomp

mode = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = seccomp.SYSCALL_TABLES[platform.machine()][1]
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17

def call(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *args)
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]

def clone(flags):
    ctypes.set_errno(0)
    pid = libc.syscall(ctypes.c_long(NR["clone"]), ctypes.c_ulong(flags), 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)  # a fork-like child (no new stack): leave at once
    if pid < 0:
        return errno.errorcode[ctypes.get_errno()]
    os.waitpid(pid, 0)
    return "ok"

def process_vm_readv():
    source, target = ctypes.create_string_buffer(b"secret!!"), ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(target), 8)
    remote = (ctypes.c_void_p * 2)(ctypes.addressof(source), 8)
    return call(NR["process_vm_readv"], os.getpid(), local, 1, remote, 1, 0)

if mode != "unfiltered":
    if mode != "no_nnp" and libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if mode == "no_nnp":
        try:
            seccomp.install_runner_filter()
            print(json.dumps({"installed": True}))
        except OSError as exc:
            print(json.dumps({"installed": False, "errno": exc.errno, "message": str(exc)}))
        sys.exit(0)
    seccomp.install_runner_filter()
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
out = {"seccomp_mode": status.get("Seccomp", "").strip()}

if mode == "torch":
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(2)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    out["matmul"] = float((a @ b).sum())
    out["matmul_reference"] = float((a.double() @ b.double()).sum())
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(32, 64)
    with torch.no_grad():
        reference, result = model(x), quantized(x)
    out["quantized_type"] = f"{type(quantized[0]).__module__}.{type(quantized[0]).__name__}"
    out["max_abs_error"] = float((reference - result).abs().max())
    out["output_scale"] = float(reference.abs().max())
    print(json.dumps(out))
    sys.exit(0)

# Denied: calls whose unfiltered answer is harmless here (the unshares come last: they change this process).
out["setns"] = call(NR["setns"], -1, 0)
out["io_uring_setup"] = call(NR["io_uring_setup"], 1, None)
out["keyctl"] = call(NR["keyctl"], 0, -1, 0)  # KEYCTL_GET_KEYRING_ID of the thread keyring
out["process_vm_readv"] = process_vm_readv()
out["mount"] = call(NR["mount"], b"none", b"/qaas-seccomp-no-such-dir", b"tmpfs", 0, None)
out["bpf"] = call(NR["bpf"], 999, None, 0)
out["clone_newuser"] = clone(CLONE_NEWUSER | SIGCHLD)
if mode == "filtered":  # unfiltered, TRACEME would make the test process this child's tracer
    out["ptrace_traceme"] = call(NR["ptrace"], 0, 0, 0, 0)
out["unshare_net"] = call(NR["unshare"], CLONE_NEWNET)
out["unshare_user"] = call(NR["unshare"], CLONE_NEWUSER)
# Answered otherwise: clone3 with ENOSYS (glibc falls back to clone), the x32 ABI with EPERM.
out["clone3"] = call(NR["clone3"], None, 0)
if platform.machine() == "x86_64":
    out["x32_getpid"] = call(0x40000000 | 39)
# Allowed: Landlock (the sandbox may apply it after the filter), personality queries.
out["landlock_abi"] = call(444, None, 0, 1)
out["personality"] = call(135 if platform.machine() == "x86_64" else 92, ctypes.c_ulong(0xFFFFFFFF))

if mode == "filtered":
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    done = []
    threads = [threading.Thread(target=done.append, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out["threads"] = sorted(done)
    out["subprocess"] = subprocess.run(["/bin/true"]).returncode
    spawned = os.posix_spawn("/bin/true", ["/bin/true"], {})
    out["posix_spawn"] = os.waitstatus_to_exitcode(os.waitpid(spawned, 0)[1])
print(json.dumps(out))
"""

DENIED_PROBES = (
    "setns",
    "io_uring_setup",
    "keyctl",
    "process_vm_readv",
    "mount",
    "bpf",
    "clone_newuser",
    "unshare_net",
    "unshare_user",
)
# A probe's syscall, where its name is not one.
PROBE_SYSCALL = {
    "clone_newuser": "clone",
    "ptrace_traceme": "ptrace",
    "unshare_net": "unshare",
    "unshare_user": "unshare",
}


def require_filter() -> None:
    """Skip where the filter cannot be built for this machine; fail under CI, which must test it."""
    reason = seccomp.supported()
    if reason is None:
        return
    fail_or_skip(f"{reason}: CI must run the seccomp tests")


def run_probe(mode: str, timeout: float = 120) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"probe {mode} exited {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def filtered() -> dict[str, Any]:
    require_filter()
    return run_probe("filtered")


@pytest.fixture(scope="module")
def unfiltered() -> dict[str, Any]:
    require_filter()
    return run_probe("unfiltered")


def test_the_filter_is_in_force(filtered: dict[str, Any]) -> None:
    assert filtered["seccomp_mode"] == "2"  # SECCOMP_MODE_FILTER


@pytest.mark.parametrize("probe", [*DENIED_PROBES, "ptrace_traceme"])
def test_escape_routes_are_refused_with_eperm(filtered: dict[str, Any], probe: str) -> None:
    assert PROBE_SYSCALL.get(probe, probe) in (*seccomp.DENIED, "clone")
    assert filtered[probe] == "EPERM"


def test_clone3_answers_enosys_and_x32_is_refused(filtered: dict[str, Any]) -> None:
    assert filtered["clone3"] == "ENOSYS"
    if "x32_getpid" in filtered:
        assert filtered["x32_getpid"] == "EPERM"


def test_processes_and_threads_still_start(filtered: dict[str, Any]) -> None:
    assert filtered["fork"] == 7
    assert filtered["threads"] == [0, 1, 2, 3]
    assert filtered["subprocess"] == 0
    assert filtered["posix_spawn"] == 0


def test_control_without_the_filter(filtered: dict[str, Any], unfiltered: dict[str, Any]) -> None:
    """The same calls without the filter: the EPERMs above come from it, and what it allows is unchanged."""
    assert unfiltered["seccomp_mode"] == "0"
    distinct = [probe for probe in DENIED_PROBES if unfiltered[probe] != "EPERM"]
    if not distinct:
        message = f"this host refuses every probe with EPERM by itself, no control possible: {unfiltered}"
        fail_or_skip(message)
    assert unfiltered["clone3"] != "ENOSYS"
    for probe in ("landlock_abi", "personality"):
        assert filtered[probe] == unfiltered[probe], probe


def test_the_filter_needs_no_new_privs() -> None:
    require_filter()
    result = run_probe("no_nnp")
    assert result["installed"] is False
    assert result["errno"] == 1 and "PR_SET_NO_NEW_PRIVS" in result["message"]


def test_supported_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seccomp.platform, "machine", lambda: "riscv64")
    monkeypatch.setattr(seccomp.sys, "platform", "linux")
    assert seccomp.supported() == "seccomp filter: architecture riscv64 is not handled"
    monkeypatch.setattr(seccomp.sys, "platform", "darwin")
    assert seccomp.supported() == "seccomp filter: darwin is not Linux"
    with pytest.raises(OSError, match="darwin is not Linux"):
        seccomp.install_runner_filter()


@pytest.mark.slow
def test_torch_works_under_the_filter() -> None:
    require_filter()
    result = run_probe("torch", timeout=300)
    assert result["seccomp_mode"] == "2"
    assert result["matmul"] == pytest.approx(result["matmul_reference"], rel=1e-3, abs=1e-2)
    assert result["quantized_type"].startswith("torch.ao.nn.quantized.dynamic."), result["quantized_type"]
    # int8 weights and activations: within a few percent of the float model, and not a constant.
    assert 0 < result["max_abs_error"] < 0.05 * result["output_scale"]


# --- the program itself, on both architectures -----------------------------------------------------------------


def run_program(program: list[seccomp.Instruction], nr: int, arch: int, arg0: int = 0) -> int:
    """Evaluate a classic-BPF seccomp program on one struct seccomp_data (little-endian)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    accumulator, pc = 0, 0
    for _ in range(len(program)):
        code, jt, jf, k = program[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            accumulator, pc = struct.unpack_from("<I", data, k)[0], pc + 1
        elif code in (0x15, 0x35, 0x45):  # BPF_JMP | JEQ, JGE, JSET (BPF_K)
            taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: bool(accumulator & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
    raise AssertionError("the program ran off its end")


@pytest.mark.parametrize("machine", sorted(seccomp.SYSCALL_TABLES))
def test_program_decisions(machine: str) -> None:
    audit_arch, numbers = seccomp.SYSCALL_TABLES[machine]
    program = seccomp.build_program(machine)
    assert set(numbers) == {*seccomp.DENIED, "clone"}
    assert len(set(numbers.values())) == len(numbers), "two names share a number"
    for name in seccomp.DENIED:
        expected = seccomp.RET_ENOSYS if name == "clone3" else seccomp.RET_EPERM
        assert run_program(program, numbers[name], audit_arch) == expected, name
    clone = numbers["clone"]
    assert run_program(program, clone, audit_arch, arg0=0x11) == seccomp.RET_ALLOW  # fork: SIGCHLD
    assert run_program(program, clone, audit_arch, arg0=0x003D0F00) == seccomp.RET_ALLOW  # pthread_create
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert run_program(program, clone, audit_arch, arg0=flag | 0x11) == seccomp.RET_EPERM, hex(flag)
    assert run_program(program, clone, audit_arch, arg0=(1 << 32) | 0x11) == seccomp.RET_ALLOW  # high half
    for allowed in (0, 1, 59, 221, 444, 445, 446):  # read/write/execve family, landlock_*
        if allowed not in numbers.values():
            assert run_program(program, allowed, audit_arch) == seccomp.RET_ALLOW, allowed
    other_arch = 0x40000003  # AUDIT_ARCH_I386: `int 0x80` from an x86_64 process
    assert run_program(program, 0, other_arch) == seccomp.RET_KILL_PROCESS
    x32 = run_program(program, 0x40000000 | 39, audit_arch)
    assert x32 == (seccomp.RET_EPERM if machine == "x86_64" else seccomp.RET_ALLOW)


HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


@pytest.mark.parametrize("machine", sorted(HEADERS))
def test_numbers_match_the_kernel_headers(machine: str) -> None:
    header = HEADERS[machine]
    if not header.exists():
        message = f"{header} is missing (Debian: linux-libc-dev)"
        fail_or_skip(message)
    defined = dict(re.findall(r"^#define __NR_(\w+)\s+(\d+)\s*$", header.read_text(), re.MULTILINE))
    numbers = seccomp.SYSCALL_TABLES[machine][1]
    checked = {name: int(defined[name]) for name in numbers if name in defined}
    assert checked == {name: numbers[name] for name in checked}
    # Older headers lack the newest calls (open_tree_attr is Linux 6.15); everything else must be there.
    assert len(checked) >= len(numbers) - 3, sorted(set(numbers) - set(checked))
