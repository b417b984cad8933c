"""Requests per second per API key: a one-second fixed window, counted in Redis when Redis is the broker (so
that several API processes share it) and in this process otherwise (the embedded single-machine default)."""

from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from typing import Protocol

from app.core.config import get_settings

log = logging.getLogger("qaas.ratelimit")


class Limiter(Protocol):
    def hit(self, key: str, limit: int) -> bool:
        """Count one request for `key`; False when it is over `limit` in the current second."""
        ...


class MemoryLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window = 0
        self._counts: dict[str, int] = {}

    def hit(self, key: str, limit: int) -> bool:
        window = int(time.time())
        with self._lock:
            if window != self._window:
                self._window, self._counts = window, {}
            count = self._counts.get(key, 0) + 1
            self._counts[key] = count
        return count <= limit


class RedisLimiter:
    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def hit(self, key: str, limit: int) -> bool:
        name = f"qaas:rate:{key}:{int(time.time())}"
        try:
            pipe = self._client.pipeline()
            pipe.incr(name)
            pipe.expire(name, 2)
            count = int(pipe.execute()[0])
        except Exception as exc:
            # A limiter that cannot count must not take the API down with Redis: let the request through.
            log.warning("rate limit not checked, Redis unreachable (%s)", type(exc).__name__)
            return True
        return count <= limit


@lru_cache
def get_limiter() -> Limiter:
    url = get_settings().broker_url
    if url.startswith(("redis://", "rediss://")):
        return RedisLimiter(url)
    return MemoryLimiter()
