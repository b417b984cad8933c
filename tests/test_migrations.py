"""The migrations build exactly the tables the models declare, on SQLite and PostgreSQL, and come back down."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

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


def test_rows_from_before_tenancy_go_to_the_default_tenant(database_url: str) -> None:
    upgrade(database_url, "0003")
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO model (id, name, size_bytes, sha256, storage_key, status, created_at, updated_at) "
                    "VALUES ('mdl_1', 'm', 1, 'x', 'uploads/mdl_1.bin', 'ready', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO job (id, model_id, status, mode, backend_requested, config, idempotency_key, "
                    "percent, attempts, created_at, updated_at) VALUES ('job_1', 'mdl_1', 'succeeded', 'dynamic', "
                    "'auto', '{}', 'k1', 100, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
        upgrade(database_url)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT tenant_id FROM model")).scalar_one() == "ten_default"
            assert conn.execute(text("SELECT tenant_id FROM job")).scalar_one() == "ten_default"
            assert conn.execute(text("SELECT name FROM tenant")).scalar_one() == "default"
            # The idempotency key is now unique per tenant, not across the service.
            conn.execute(
                text("INSERT INTO tenant (id, name, created_at) VALUES ('ten_b', 'b', CURRENT_TIMESTAMP)")
            )
            conn.execute(
                text(
                    "INSERT INTO job (id, tenant_id, model_id, status, mode, backend_requested, config, "
                    "idempotency_key, percent, attempts, created_at, updated_at) VALUES ('job_2', 'ten_b', "
                    "'mdl_1', 'queued', 'dynamic', 'auto', '{}', 'k1', 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
    finally:
        engine.dispose()
