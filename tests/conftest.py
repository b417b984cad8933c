"""Shared fixtures: settings pointed at a temporary data directory, databases built by `alembic upgrade head`,
SQLite always and PostgreSQL / Redis when their URLs are set (required under CI=true)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_URL = os.environ.get("QAAS_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("QAAS_TEST_REDIS_URL")


def require_url(name: str, value: str | None) -> str:
    """Skip without the URL on a developer's machine; fail under CI, where the services must be there."""
    if value:
        return value
    if IN_CI:
        pytest.fail(f"{name} is not set: CI must run these tests against the real server")
    pytest.skip(f"{name} is not set")


def fail_or_skip(reason: str) -> None:
    """A capability this host lacks: skip on a developer's machine, fail under CI (coverage must not vanish)."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def traversable(path: Path) -> Path:
    """Let other users pass through `path`'s folders (o+x, no listing): a root worker's runner runs as
    `nobody` and must reach its work folder inside the data directory, as in a deployment (pytest makes its
    temporary folders 0700)."""
    for folder in [path, *path.parents]:
        if folder.exists() and folder.stat().st_uid == os.geteuid() and not folder.stat().st_mode & 0o001:
            folder.chmod(folder.stat().st_mode | 0o001)
    return path


def processes_in(folder: Path) -> list[int]:
    """PIDs whose working directory is in `folder` (what a runner left behind would be)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(str(folder)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def reset_caches() -> None:
    from app.core.config import get_settings
    from app.core.db import get_engine, get_sessionmaker
    from app.core.queue import get_celery
    from app.core.ratelimit import get_limiter
    from app.core.storage import get_storage

    for cached in (get_sessionmaker, get_engine, get_storage, get_celery, get_limiter, get_settings):
        if cached is get_engine and cached.cache_info().currsize:
            cached().dispose()
        cached.cache_clear()


def reset_postgres(url: str) -> None:
    """Start from an empty schema so that the migrations are applied from scratch."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def configure(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path, database_url: str = "", broker_url: str = ""
) -> None:
    traversable(data_dir.parent)
    monkeypatch.setenv("QAAS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QAAS_DATABASE_URL", database_url)
    monkeypatch.setenv("QAAS_BROKER_URL", broker_url)
    reset_caches()


@pytest.fixture(params=["sqlite", "postgres"])
def db_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_url("QAAS_TEST_DATABASE_URL", PG_URL)
    return request.param


@pytest.fixture
def service_env(db_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Settings for one test: a fresh data dir, a migrated database (SQLite or PostgreSQL), the SQLite broker."""
    from app.core.config import get_settings
    from app.core.migrate import upgrade

    database_url = ""
    if db_backend == "postgres":
        assert PG_URL
        reset_postgres(PG_URL)
        database_url = PG_URL
    configure(monkeypatch, tmp_path / "var", database_url)
    settings = get_settings()
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    yield settings.data_dir
    reset_caches()
