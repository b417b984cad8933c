"""Counters over fixed time windows, per key: requests per second per API key, and wrong keys per minute per
client address. Counted in Redis when Redis is the broker (so that several API processes share them) and in
this process otherwise (the embedded single-machine default)."""

from __future__ import annotations

import logging
import math
import threading
import time
from functools import lru_cache
from typing import Protocol

from app.core.config import get_settings

log = logging.getLogger("qaas.ratelimit")


def seconds_left(window_s: int) -> int:
    """Whole seconds until the current `window_s` window ends (at least 1): a Retry-After value."""
    return max(1, math.ceil(window_s - time.time() % window_s))


class Limiter(Protocol):
    def hit(self, key: str, limit: int, window_s: int = 1) -> bool:
        """Count one event for `key`; False when it is over `limit` in the current window of `window_s`."""
        ...

    def count(self, key: str, window_s: int = 1) -> int:
        """The events counted for `key` in the current window, without counting one."""
        ...


class MemoryLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # window length -> (the current window's number, its counts): a new window starts from nothing.
        self._windows: dict[int, tuple[int, dict[str, int]]] = {}

    def _counts(self, window_s: int) -> dict[str, int]:
        window = int(time.time()) // window_s
        current, counts = self._windows.get(window_s, (None, {}))
        if current != window:
            counts = {}
            self._windows[window_s] = (window, counts)
        return counts

    def hit(self, key: str, limit: int, window_s: int = 1) -> bool:
        with self._lock:
            counts = self._counts(window_s)
            count = counts[key] = counts.get(key, 0) + 1
        return count <= limit

    def count(self, key: str, window_s: int = 1) -> int:
        with self._lock:
            return self._counts(window_s).get(key, 0)


class RedisLimiter:
    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    @staticmethod
    def _name(key: str, window_s: int) -> str:
        return f"qaas:rate:{key}:{window_s}:{int(time.time()) // window_s}"

    def hit(self, key: str, limit: int, window_s: int = 1) -> bool:
        name = self._name(key, window_s)
        try:
            pipe = self._client.pipeline()
            pipe.incr(name)
            pipe.expire(name, window_s + 1)
            count = int(pipe.execute()[0])
        except Exception as exc:
            # A limiter that cannot count must not take the API down with Redis: let the request through.
            log.warning("rate limit not checked, Redis unreachable (%s)", type(exc).__name__)
            return True
        return count <= limit

    def count(self, key: str, window_s: int = 1) -> int:
        try:
            value = self._client.get(self._name(key, window_s))
        except Exception as exc:
            log.warning("rate limit not checked, Redis unreachable (%s)", type(exc).__name__)
            return 0
        return int(value) if isinstance(value, bytes | int | str) else 0


@lru_cache
def get_limiter() -> Limiter:
    url = get_settings().broker_url
    if url.startswith(("redis://", "rediss://")):
        return RedisLimiter(url)
    return MemoryLimiter()
