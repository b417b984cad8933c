"""The runner's sandbox: what a child process that loads an untrusted model may do, applied between fork and
exec, degrading gracefully where the kernel (or a container's seccomp profile) refuses a protection. The
security model, and what each protection stops, is in docs/security.md.

The child is started through a small trampoline, `python -S -c <boot> SOURCE PLAN ARGV...`, that runs in the
new process before the real program is executed (nothing but exec happens between fork and exec in the worker,
which may have threads). In order, where the plan asks for it and the kernel permits:

1. a new network namespace (`unshare(CLONE_NEWNET)` as root, a user + network namespace otherwise): no
   network at all, not even loopback;
2. the trampoline forks the runner and stays behind as its subreaper (non-dumpable, outside its sandbox),
   with the runner as the init of a PID namespace of its own and a /proc of that namespace only;
3. resource limits: address space (RLIMIT_AS), CPU time (RLIMIT_CPU: SIGXCPU, then SIGKILL 5 s later), file
   size (RLIMIT_FSIZE), processes (RLIMIT_NPROC: it counts every thread of the uid and does not bind root, so it
   is in force only for a non-root runner), no core dumps;
4. no capabilities: the bounding and ambient sets are emptied, so even a runner that stays root executes
   without any (it cannot bypass file permissions nor read the worker's memory or environment);
5. an unprivileged user (`nobody` by default) when the worker is root and that user can read the Python, the
   `workers` package and the inputs (a Python under a 0700 home cannot be started by it); the work directory is
   then handed to that user, mode 0700;
6. `PR_SET_PDEATHSIG(SIGKILL)`: the runner dies with the thread that started it (the worker's);
7. `PR_SET_NO_NEW_PRIVS` and Landlock: writes only inside the work and output directories (plus /dev/null:
   not /tmp, nor /dev/shm; TMPDIR and HOME are the work directory), reads only of the system directories, a
   short list of /etc files, the Python installation, the `workers` package and the inputs (the data
   directory, its SQLite files and the other jobs' folders are out of reach), no TCP bind/connect (ABI >= 4)
   and no signals or abstract unix sockets outside the sandbox (ABI >= 6);
8. a seccomp-BPF deny list, last.

The trampoline prints one JSON line, {"event": "sandbox", "in_force": [...], "gaps": {...}}, on stdout before
it executes the program: what the run actually got. `sandbox_report()` probes once per process what a runner
gets on this host by starting a tiny child under the full sandbox and checking each protection from inside.

Not covered: pathname unix sockets (Landlock cannot restrict connect(2) to them; the user drop and the clean
environment are what stands between a runner and, say, a database socket), reads of world-readable files under
the system directories, and /proc entries that are not ptrace-protected (other processes' command lines).

The modules, by part:
- policy: RunnerLimits (from the settings), the protections' names, and the plan the worker decides;
- spawn: the worker's side, starting a runner through the trampoline, and the worker's own hardening;
- trampoline: the child's side, applying the plan, forking the runner off, reaping and mirroring it;
- syscalls, landlock, seccomp: the kernel interfaces (ctypes), one module each;
- report: sandbox_report() and sandbox_gaps(), verified by the probe program in probe
  (`python -m workers.sandbox.probe`).
"""

from workers.sandbox.policy import MIN_MEMORY_MB, PROTECTIONS, RunnerLimits, SandboxPlan, plan_sandbox
from workers.sandbox.report import sandbox_gaps, sandbox_report
from workers.sandbox.spawn import harden_worker_process, spawn
from workers.sandbox.syscalls import PR_SET_PDEATHSIG
from workers.sandbox.trampoline import apply_plan

__all__ = [
    "MIN_MEMORY_MB",
    "PROTECTIONS",
    "PR_SET_PDEATHSIG",
    "RunnerLimits",
    "SandboxPlan",
    "apply_plan",
    "harden_worker_process",
    "plan_sandbox",
    "sandbox_gaps",
    "sandbox_report",
    "spawn",
]
