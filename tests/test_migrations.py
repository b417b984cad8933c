"""The migrations build exactly the tables the models declare, on SQLite and PostgreSQL, and come back down."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import app.models  # noqa: F401
from app.core.db import Base
from app.core.migrate import downgrade, upgrade
from tests.conftest import PG_URL, require_url, reset_postgres


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url = require_url("QAAS_TEST_DATABASE_URL", PG_URL)
        reset_postgres(url)
        return url
    return f"sqlite:///{tmp_path / 'migrations.sqlite'}"


def test_upgrade_matches_the_models_and_downgrades_cleanly(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"the models and the migrations disagree: {diff}"
        downgrade(database_url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(database_url)
        assert {"model", "dataset", "job", "job_metrics", "artifact"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


def test_migration_files_follow_the_naming_rule() -> None:
    versions = Path(__file__).resolve().parents[1] / "migrations" / "versions"
    names = sorted(p.name for p in versions.glob("*.py"))
    assert names
    for name in names:
        assert len(name) > 16 and name[4] == "-" and name[7] == "-" and name[10] == "-" and name[15] == "_", (
            name
        )
