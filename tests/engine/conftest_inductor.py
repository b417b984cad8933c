"""One Inductor cache (TORCHINDUCTOR_CACHE_DIR) for the whole test session, kept between runs.

A plugin file: tests/engine/conftest.py imports the fixture, so that it applies to every engine test; other
test folders can load it with `pytest_plugins = ["tests.engine.conftest_inductor"]`. A cache the caller
already chose (TORCHINDUCTOR_CACHE_DIR set) is used as it is. Subprocesses (the runner) inherit it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CACHE_NAME = "qaas-test-inductor-cache"


@pytest.fixture(scope="session", autouse=True)
def inductor_cache() -> Iterator[Path]:
    """AOTInductor compiles cost 5-40 s each on 2 cores; with a warm cache the same model compiles faster."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    path = Path(chosen) if chosen else Path(tempfile.gettempdir()) / CACHE_NAME
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
        yield path
