"""What a worker does besides jobs: its heartbeat, the reaper, and a graceful shutdown.

`Upkeep` is a daemon thread started by `qaas worker`. Every QAAS_REAPER_INTERVAL_S it records the worker's
heartbeat (with the runner protections a probe child found in force, which /readyz lists) and runs one reaper
pass (app.services.reaper); every ten minutes it deletes the embedded broker's delivered messages. A
database that is down only skips a beat.

On SIGTERM Celery stops taking messages and waits for running jobs; `shutdown_requested` starts the grace
period (QAAS_SHUTDOWN_GRACE_S). A job still running when it ends is stopped and handed back to the queue for
another worker (`handing_back`), so that a deploy never waits for an hour-long job nor loses it.

The worker `qaas serve` starts also gets that SIGTERM when `serve` dies, however it dies (`die_with_parent`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from app.core import queue
from app.core.config import Settings
from app.core.db import session_scope
from app.services import reaper
from workers.sandbox import RunnerLimits, sandbox_gaps, sandbox_report
from workers.sandbox.syscalls import PR_SET_PDEATHSIG, prctl

log = logging.getLogger("qaas.worker")

PRUNE_EVERY_S = 600.0  # the embedded broker's delivered messages are deleted this often
_shutdown_deadline: float | None = None
_shutdown_lock = threading.Lock()


def worker_name() -> str:
    """hostname:pid: the heartbeat's id, and the prefix of the ids this worker claims jobs with."""
    return f"{socket.gethostname()}:{os.getpid()}"


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM to this process when `parent_pid` (qaas serve) dies, even by SIGKILL; exit
    now if it is already gone.

    SIGTERM rather than SIGKILL: it is the graceful shutdown above, so a running job is handed back to the
    queue after the grace period (5 s under serve) and the worker signs off /readyz, where SIGKILL would leave
    the job claimed until its lease ran out. The runners die either way (their own PR_SET_PDEATHSIG is SIGKILL).
    """
    if sys.platform.startswith("linux"):
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # Checked after arming: a parent that died before has already re-parented this process, with no signal.
    if os.getppid() != parent_pid:
        sys.exit(f"qaas worker: the process that started it (pid {parent_pid}) is gone; exiting")


def shutdown_requested(grace_s: float) -> None:
    """Start the grace period (once): jobs running when it ends are handed back."""
    global _shutdown_deadline
    with _shutdown_lock:
        if _shutdown_deadline is None:
            _shutdown_deadline = time.monotonic() + grace_s
            log.warning(
                "shutting down: running jobs have %.0f s to finish before they are handed back", grace_s
            )


def shutting_down() -> bool:
    """True once a shutdown was asked for: the worker starts no new job (a message it had already taken in,
    such as a duplicate the reaper sent, goes back to the queue)."""
    return _shutdown_deadline is not None


def handing_back() -> bool:
    """True once the grace period after a shutdown request is over."""
    deadline = _shutdown_deadline
    return deadline is not None and time.monotonic() >= deadline


class Upkeep(threading.Thread):
    """The heartbeat and reaper loop of one worker process."""

    def __init__(self, settings: Settings, concurrency: int, protections: list[str]) -> None:
        super().__init__(name="qaas-upkeep", daemon=True)
        self.settings = settings
        self.concurrency = concurrency
        self.protections = protections  # what `qaas worker` did to its own process
        self.stopping = threading.Event()
        self.worker_id = worker_name()
        self.sandbox: list[str] = []
        self.gaps: dict[str, str] = {}
        self._next_prune = 0.0

    def _probe(self) -> None:
        limits = RunnerLimits.from_settings(self.settings)
        try:
            self.sandbox = [*sandbox_report(limits), *self.protections]
            self.gaps = sandbox_gaps(limits)
        except Exception as exc:  # the heartbeat still says the worker lives
            log.exception("runner sandbox probe failed")
            self.gaps = {"runner": f"the sandbox probe failed: {type(exc).__name__}: {exc}"}

    def beat_once(self) -> reaper.Reaped | None:
        """One heartbeat and one reaper pass; None when the database could not be reached."""
        try:
            with session_scope() as session:
                reaper.beat(
                    session,
                    self.worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    concurrency=self.concurrency,
                    sandbox=self.sandbox,
                    sandbox_gaps=self.gaps,
                )
            with session_scope() as session:
                reaped = reaper.reap(session, self.settings)
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_EVERY_S
                queue.prune_embedded_broker(self.settings)
        except Exception as exc:
            log.warning("heartbeat and reaper skipped: %s: %s", type(exc).__name__, exc)
            return None
        if reaped:
            log.info("reaper: %s", reaped)
        return reaped

    def run(self) -> None:
        self._probe()
        while not self.stopping.is_set():
            self.beat_once()
            self.stopping.wait(self.settings.reaper_interval_s)

    def stop(self) -> None:
        """Stop the loop and sign the worker off (it leaves /readyz's list at once)."""
        self.stopping.set()
        try:
            with session_scope() as session:
                reaper.signed_off(session, self.worker_id)
        except Exception as exc:
            log.warning("could not sign the worker off: %s", exc)


def connect_celery_signals(upkeep: Upkeep, grace_s: float) -> None:
    """SIGTERM starts the grace period; the end of the worker stops the upkeep loop."""
    from celery.signals import worker_shutdown, worker_shutting_down

    def _shutting_down(**_: Any) -> None:
        shutdown_requested(grace_s)

    def _shutdown(**_: Any) -> None:
        upkeep.stop()

    worker_shutting_down.connect(_shutting_down, weak=False)
    worker_shutdown.connect(_shutdown, weak=False)
