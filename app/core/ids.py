"""Object ids: a type prefix and a ULID-style body, so that ids sort by creation time (cursor pagination)."""

from __future__ import annotations

import secrets
import time
from datetime import datetime

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_CROCKFORD[rem])
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """`prefix_` + 10 chars of milliseconds + 16 random chars (80 bits)."""
    return f"{prefix}_{_encode(time.time_ns() // 1_000_000, 10)}{_encode(secrets.randbits(80), 16)}"


def first_id_at(prefix: str, at: datetime) -> str:
    """The smallest id of `prefix` made at or after `at`: `id >= first_id_at(...)` is a time window that the
    primary key's index serves."""
    return f"{prefix}_{_encode(int(at.timestamp() * 1000), 10)}"
