"""The trampoline: the child's side of the sandbox, run as `python -S -c BOOT SOURCE_ROOT PLAN_JSON PROGRAM
ARGS...` in the new process before the real program is executed (nothing but exec happens between fork and
exec in the worker, which may have threads). It applies the plan (workers/sandbox/policy.py) in the order
docs/security.md ("The runner") gives, forks the runner off and stays behind as its subreaper, prints one
JSON line, {"event": "sandbox", "in_force": [...], "gaps": {...}, "pid": ...}, on stdout, and executes the
program.

A protection the kernel refuses becomes a named gap; anything else that goes wrong ends the child with status
126 before the program runs: never half-sandboxed by surprise.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import Callable

# Imported here, not when the filter is installed: by then the trampoline may run as a user who cannot read
# this Python's standard library.
from workers.sandbox import landlock, seccomp, syscalls
from workers.sandbox.policy import SandboxPlan, ordered

BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from workers.sandbox.trampoline import boot; boot()"


def boot() -> None:
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


def apply_plan(plan: SandboxPlan) -> tuple[list[str], dict[str, str]]:
    """Apply the plan to this process (the trampoline, before exec). Returns (in force, gaps).

    With `plan.reap` the trampoline forks: this function then returns in the child, the runner (the init of a
    new PID namespace with `plan.pidns`), and the parent stays behind to reap it (_fork_runner)."""
    in_force = ["clean_env", "new_session"]
    gaps = dict(plan.gaps)
    # The worker's thread dies: so does the trampoline, and (below) everything it started.
    syscalls.arm_parent_death_signal(lambda: os.getppid() == plan.parent_pid)
    if plan.netns:
        try:
            syscalls.enter_network_namespace()
            in_force.append("no_network")
        except OSError as exc:
            gaps["no_network"] = f"a new network namespace was refused ({exc.strerror})"
    outside_pid, parent_alive = _become_runner(plan, in_force, gaps)
    capabilities_gone = _limit_and_drop_privileges(plan, in_force, gaps)
    # After the last credential change: a change of uid clears the parent-death signal.
    syscalls.arm_parent_death_signal(parent_alive)
    in_force.append("pdeathsig")
    try:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        in_force.append("no_new_privs")
        # A non-root process without permitted capabilities gains none through execve under no_new_privs.
        if not capabilities_gone and os.geteuid() != 0 and syscalls.permitted_capabilities() == 0:
            capabilities_gone = True
            gaps.pop("no_capabilities", None)
    except OSError as exc:
        gaps["no_new_privs"] = str(exc)
    if capabilities_gone:
        in_force.append("no_capabilities")
    _confine(plan, in_force, gaps)
    plan.outside_pid = outside_pid
    return ordered(in_force), gaps


def _become_runner(
    plan: SandboxPlan, in_force: list[str], gaps: dict[str, str]
) -> tuple[int, Callable[[], bool]]:
    """With `plan.reap`, fork the runner off (in its own PID namespace with `plan.pidns`) and return in it.
    Returns the runner's PID as the worker sees it, and a check that its parent is still alive."""
    parent_alive: Callable[[], bool] = lambda: os.getppid() == plan.parent_pid  # noqa: E731
    outside_pid = os.getpid()
    if not plan.reap:
        return outside_pid, parent_alive
    # A user namespace change may clear the signal: arm it again before the fork.
    syscalls.arm_parent_death_signal(parent_alive)
    outside_pid, parent_alive, refused = _fork_runner(plan.pidns)
    in_force.append("runner_reaped")
    if plan.pidns and refused is None:
        in_force.append("own_pid_namespace")
        try:
            syscalls.mount_own_proc()
            in_force.append("proc_hidden")
        except OSError as exc:
            gaps["proc_hidden"] = f"a /proc of the runner's own could not be mounted ({exc.strerror})"
    elif plan.pidns:
        gaps["own_pid_namespace"] = refused or ""
        gaps["proc_hidden"] = "needs the runner's own PID namespace"
    return outside_pid, parent_alive


def _limit_and_drop_privileges(plan: SandboxPlan, in_force: list[str], gaps: dict[str, str]) -> bool:
    """The resource limits, no capabilities, the unprivileged user. Returns whether the capabilities are
    gone."""
    for name, (soft, hard) in plan.rlimits.items():
        try:
            syscalls.set_rlimit(name, soft, hard)
            in_force.append(name)
        except (OSError, ValueError) as exc:
            gaps[name] = f"setrlimit failed ({exc})"
    # Before the user changes: emptying the bounding set takes CAP_SETPCAP.
    try:
        syscalls.drop_capabilities()
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
    return capabilities_gone


def _confine(plan: SandboxPlan, in_force: list[str], gaps: dict[str, str]) -> None:
    """Landlock, then (the last step before exec) the seccomp filter."""
    if plan.landlock:
        abi = landlock.landlock_abi()
        if abi < 1:
            gaps["landlock_fs"] = "the kernel has no Landlock (or a seccomp profile refuses it)"
        else:
            try:
                in_force += landlock.apply_landlock(plan, abi)
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
            syscalls.unshare_as_caller(syscalls.CLONE_NEWPID | syscalls.CLONE_NEWNS)
        except OSError as exc:
            refused = f"a new PID namespace was refused ({exc.strerror})"
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        # Outside the runner's Landlock domain and seccomp filter: a same-uid runner must not be able to read
        # or write this process's memory through /proc/<pid>/mem.
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        os.close(ready_r)
        os.write(ready_w, f"{pid}\n".encode())
        # ready_w stays open until this process exits: its EOF tells the child that the trampoline is gone.
        _reap_and_mirror(pid, own_namespace=pidns and refused is None)
    os.close(ready_w)
    alive = syscalls.pipe_open(ready_r)
    syscalls.arm_parent_death_signal(lambda: True)  # checked below, once the PID has arrived
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(ready_r, 32)
        if not chunk:
            os._exit(125)  # the trampoline died before the signal was armed
        line += chunk
    return int(line), alive, refused


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
        for child in syscalls.children():
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
