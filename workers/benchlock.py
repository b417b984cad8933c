"""The worker's side of the host's benchmark lock: one benchmark at a time per host (docs/security.md).

A runner never holds the lock itself: it asks its worker through a pipe, and the worker takes the `flock` on a
description of the lock file that only the worker has. Whatever the runner leaves behind (a double-forked
child, a descriptor passed on) therefore holds nothing, the wait and the holding are both bounded, and the lock
is released when the runner ends, whatever it did (docs/security.md).

The protocol, one word per line: the runner writes `acquire` or `release`; the worker answers `wait` (another
benchmark holds the lock; `granted` or `timeout` follows), `granted`, or `timeout` (benchmark without it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

BENCH_LOCK_NAME = "qaas-bench.lock"
MAX_REQUEST_BYTES = 64
# Requests waiting to be answered: a runner that writes faster than the worker answers is slowed by its pipe.
MAX_PENDING = 64


# A lock file path, an open descriptor of one, None for default_bench_lock(), False for no lock at all.
BenchLock = Path | str | int | None | Literal[False]
log = logging.getLogger("qaas.worker")


def default_bench_lock() -> Path:
    """The host's benchmark lock file when the caller names none: the same file the engine falls back to
    when it runs outside a runner, so that both kinds of benchmark take turns."""
    return Path(tempfile.gettempdir()) / BENCH_LOCK_NAME


def open_bench_lock(lock: BenchLock) -> int | None:
    """A new open file description of the lock file for one runner, or None (logged) when there is none.

    Each runner needs its own description: flock locks belong to descriptions, so runners sharing one would
    not exclude each other. A descriptor given by the caller is reopened through /proc for that reason.
    """
    if lock is False:
        return None
    if isinstance(lock, int):
        path, nofollow = Path(f"/proc/self/fd/{lock}"), 0  # a link by nature: the caller's own descriptor
    else:
        path, nofollow = Path(lock or default_bench_lock()), os.O_NOFOLLOW
    fd, problem = None, ""
    # flock needs no write access; O_CREAT only when the file is missing (protected_regular refuses it on
    # another user's file in a sticky /tmp).
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_CREAT):
        try:
            fd = os.open(path, flags | nofollow | os.O_CLOEXEC, 0o666)
            break
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if fd is not None:
        # A lock file is empty and regular: anything else (a link planted in a shared /tmp) is not ours.
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            return fd
        os.close(fd)
        problem = "it is not an empty regular file"
    log.warning("benchmark lock %s cannot be used (%s): this runner benchmarks unlocked", path, problem)
    return None


class LockBroker:
    """Holds the host's benchmark lock for one runner while it asks for it, within `wait_s` of waiting and
    `hold_s` of holding in all. `lock_fd` is the worker's own description of the lock file (None: no lock file
    could be opened; every request is then answered `timeout`)."""

    def __init__(self, lock_fd: int | None, *, wait_s: float, hold_s: float) -> None:
        self.lock_fd = lock_fd
        self.wait_s, self.hold_s = wait_s, hold_s
        self.notes: list[str] = []
        self._requests: queue.Queue[str] = queue.Queue(MAX_PENDING)
        # Runner -> worker (requests) and worker -> runner (answers); the runner's ends are passed to it.
        self._request_r, self.request_w = os.pipe()
        self.answer_r, self._answer_w = os.pipe()
        os.set_blocking(self._answer_w, False)  # a runner that never reads can never block the worker
        self._wanted_at: float | None = None
        self._held_at: float | None = None
        self._held_s = 0.0
        self._reader: threading.Thread | None = None

    @property
    def runner_fds(self) -> tuple[int, int]:
        """The descriptors the runner gets: (answers to read, requests to write)."""
        return self.answer_r, self.request_w

    @property
    def env_value(self) -> str:
        """QAAS_BENCH_LOCK_FD for the runner: "R,W"."""
        return f"{self.answer_r},{self.request_w}"

    @property
    def busy(self) -> bool:
        """Whether the runner waits for the lock or holds it: poll() must then be called often."""
        return self._wanted_at is not None or self._held_at is not None

    def start(self, wake: Callable[[], None]) -> None:
        """Once the runner has its copies: close ours of its ends and read its requests in a thread, which calls
        `wake` after each so that the caller polls at once."""
        os.close(self.answer_r)
        os.close(self.request_w)
        stream = os.fdopen(self._request_r, "rb", buffering=0)
        self._reader = threading.Thread(target=self._read, args=(stream, wake), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes], wake: Callable[[], None]) -> None:
        with stream:
            while True:
                line = stream.readline(MAX_REQUEST_BYTES)
                if not line:
                    return
                self._requests.put(line.strip().decode("ascii", "replace"))
                wake()

    def poll(self) -> None:
        """Answer what the runner asked, and enforce the limits; call it often while the runner runs."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if request == "acquire" and self._wanted_at is None and self._held_at is None:
                self._wanted_at = time.monotonic()
                if not self._try():
                    self._say("wait")
            elif request == "release":
                self._release()
        now = time.monotonic()
        if self._wanted_at is not None and not self._try() and now - self._wanted_at >= self.wait_s:
            self._wanted_at = None
            self.notes.append(
                f"benchmarked without the host's benchmark lock after waiting {self.wait_s:.0f} s for another "
                "benchmark on this host: latencies may be high"
            )
            self._say("timeout")
        if self._held_at is not None and self._held_s + now - self._held_at >= self.hold_s:
            self._release()
            self.notes.append(
                f"held the host's benchmark lock for {self.hold_s:.0f} s, its limit: it was given to the "
                "host's other benchmarks, and latencies measured after that may be high"
            )

    def _try(self) -> bool:
        assert self._wanted_at is not None
        if self.lock_fd is None or self._held_s >= self.hold_s:
            self._wanted_at = None
            self._say("timeout")
            return True
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # a file system without flock: a benchmark is worth more than the lock
            self._wanted_at = None
            self._say("timeout")
            return True
        self._wanted_at, self._held_at = None, time.monotonic()
        self._say("granted")
        return True

    def _release(self) -> None:
        if self._held_at is not None and self.lock_fd is not None:
            self._held_s += time.monotonic() - self._held_at
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
        self._held_at = None

    def _say(self, word: str) -> None:
        with contextlib.suppress(OSError):  # the runner is gone, or reads nothing: its loss
            os.write(self._answer_w, f"{word}\n".encode())

    def close(self) -> None:
        """The runner is gone: release the lock and close every descriptor."""
        self._release()
        self._wanted_at = None
        unread = (self.answer_r, self.request_w, self._request_r) if self._reader is None else ()
        for fd in (self._answer_w, self.lock_fd, *unread):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._reader is not None:
            self._reader.join(timeout=5)
