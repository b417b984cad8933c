"""The probe: a tiny program that workers/sandbox/report.py starts under the full sandbox, as
`python -m workers.sandbox.probe PORT OUTSIDE_FILE OUTSIDE_DIR WANT_TORCH WORKER_PID`, to check each
protection from inside instead of trusting the trampoline's word for it (docs/security.md, "The runner").

It tries what a hostile runner would: connect to the worker's loopback PORT, write into OUTSIDE_DIR, read
OUTSIDE_FILE, signal the worker and read its environment, look for the worker in /proc; with WANT_TORCH "1" it
imports torch too. It prints one JSON line, {"found": [protections that held], "notes": {protection or
"torch": what got through}}.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import sys

_SECRET_PREFIXES = ("QAAS_", "AWS_")
_SECRET_SUFFIXES = ("_URL", "_PASSWORD", "_SECRET", "_TOKEN")
_RLIMITS = {
    "rlimit_as": resource.RLIMIT_AS,
    "rlimit_cpu": resource.RLIMIT_CPU,
    "rlimit_fsize": resource.RLIMIT_FSIZE,
    "rlimit_nproc": resource.RLIMIT_NPROC,
}
_PR_GET_PDEATHSIG = 2


def _check_process(found: list[str]) -> None:
    """The environment, the resource limits, the session and the parent-death signal."""
    if not [k for k in os.environ if k.startswith(_SECRET_PREFIXES) or k.endswith(_SECRET_SUFFIXES)]:
        found.append("clean_env")
    for name, which in _RLIMITS.items():
        if resource.getrlimit(which)[0] != resource.RLIM_INFINITY and (
            name != "rlimit_nproc" or os.getuid() != 0
        ):
            found.append(name)
    if resource.getrlimit(resource.RLIMIT_CORE)[0] == 0:
        found.append("no_core_dumps")
    if os.getsid(0) == os.getpid() or os.getpgid(0) == os.getsid(0):
        found.append("new_session")
    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
    if sig.value == 9:
        found.append("pdeathsig")


def _check_network(port: int, found: list[str], notes: dict[str, str]) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        notes["no_network"] = "connected to the worker's loopback"
    except OSError:
        found.append("no_tcp")
        if {name for _, name in socket.if_nameindex()} <= {"lo"}:
            found.append("no_network")


def _check_privileges(found: list[str]) -> dict[str, str]:
    """The user, no_new_privs, the capability sets. Returns /proc/self/status as fields."""
    if os.getuid() != 0:
        found.append("unprivileged_user")
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status.read().splitlines() if ":" in line)
    if fields.get("NoNewPrivs", "").strip() == "1":
        found.append("no_new_privs")
    caps = {name: int(fields.get(name, "1").strip(), 16) for name in ("CapEff", "CapPrm", "CapAmb", "CapBnd")}
    if caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0 and (
        caps["CapBnd"] == 0 or "no_new_privs" in found
    ):
        found.append("no_capabilities")
    return fields


def _check_reach(
    outside_file: str, outside_dir: str, worker: int, found: list[str], notes: dict[str, str]
) -> None:
    """Landlock's writes, reads and scope, and the worker's environment."""
    try:
        open(os.path.join(outside_dir, "canary"), "w").close()
        notes["landlock_fs"] = "wrote outside the work folder"
    except OSError:
        found.append("landlock_fs")
    try:
        with open(outside_file) as handle:
            handle.read()
        notes["landlock_read"] = "read a file outside the work folder"
    except OSError:
        found.append("landlock_read")
    try:
        os.kill(worker, 0)
        notes["landlock_scope"] = "could signal the worker"
    except OSError:
        found.append("landlock_scope")
    try:
        with open(f"/proc/{worker}/environ", "rb") as handle:
            handle.read()
        notes["parent_unreadable"] = "read the worker's environment"
    except OSError:
        found.append("parent_unreadable")


def _check_processes(worker: int, found: list[str], notes: dict[str, str]) -> None:
    """The PID namespace, the subreaper between the runner and the worker, a /proc of the runner's own."""
    if os.getpid() == 1:
        found.append("own_pid_namespace")
    if os.getppid() != worker:
        found.append("runner_reaped")
    pids = (int(p) for p in os.listdir("/proc") if p.isdigit())
    if not os.path.exists(f"/proc/{worker}") and sorted(pids)[:1] == [1]:
        found.append("proc_hidden")
    else:
        notes["proc_hidden"] = "the worker's /proc entry is visible"


def main(argv: list[str]) -> None:
    port, outside_file, outside_dir = int(argv[1]), argv[2], argv[3]
    want_torch, worker = argv[4] == "1", int(argv[5])
    found: list[str] = []
    notes: dict[str, str] = {}
    _check_process(found)
    _check_network(port, found, notes)
    fields = _check_privileges(found)
    _check_reach(outside_file, outside_dir, worker, found, notes)
    _check_processes(worker, found, notes)
    if fields.get("Seccomp", "").strip() == "2":
        found.append("seccomp")
    if want_torch:
        try:
            import torch

            torch.ones(4).sum()
        except BaseException as exc:
            notes["torch"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"found": found, "notes": notes}))


if __name__ == "__main__":
    main(sys.argv)
