"""Inspections are picked fairly across tenants: a tenant whose uploads hang until the inspection time limit keeps
at most its share of the workers, and another tenant's upload goes next (app/services/stored.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from app.core.db import session_scope
from app.models import Dataset, Model
from app.models.common import utcnow
from app.models.tenant import Tenant
from app.services.stored import CLAIM_MARGIN_S, claim_next_inspection

TIMEOUT_S = 300.0


def _upload(cls: type[Model] | type[Dataset], object_id: str, tenant_id: str, age_s: float) -> None:
    with session_scope() as session:
        session.add(
            cls(
                id=object_id,
                tenant_id=tenant_id,
                name=object_id,
                size_bytes=1,
                sha256="0" * 64,
                storage_key=f"uploads/{object_id}.bin",
                status="inspecting",
                created_at=utcnow() - timedelta(seconds=age_s),
            )
        )


def _claim() -> str | None:
    with session_scope() as session:
        picked = claim_next_inspection(session, timeout_s=TIMEOUT_S)
    return None if picked is None else picked[1]


def test_the_tenant_with_fewer_inspections_running_goes_first(service_env: Path) -> None:
    with session_scope() as session:
        session.add_all([Tenant(id="ten_a", name="a"), Tenant(id="ten_b", name="b")])
    # Tenant a uploaded three hanging models first; tenant b one dataset and one model later.
    for n in range(3):
        _upload(Model, f"mdl_a{n}", "ten_a", age_s=100 - n)
    _upload(Dataset, "ds_b0", "ten_b", age_s=50)
    _upload(Model, "mdl_b1", "ten_b", age_s=40)

    assert _claim() == "mdl_a0"  # nobody runs anything: the oldest upload
    assert _claim() == "ds_b0"  # a runs one now: b's oldest, a dataset, before a's second model
    assert _claim() == "mdl_a1"  # one each: the oldest again
    assert _claim() == "mdl_b1"
    assert _claim() == "mdl_a2"
    assert _claim() is None  # every waiting upload is claimed: a second message of one does nothing


def test_a_claim_of_a_dead_worker_is_taken_again(service_env: Path) -> None:
    _upload(Model, "mdl_x", "ten_default", age_s=10)
    assert _claim() == "mdl_x"
    assert _claim() is None
    with session_scope() as session:
        model = session.get(Model, "mdl_x")
        assert model is not None
        model.inspection_started_at = utcnow() - timedelta(seconds=TIMEOUT_S + CLAIM_MARGIN_S + 1)
    assert _claim() == "mdl_x"


def test_finished_inspections_are_not_claimed(service_env: Path) -> None:
    _upload(Model, "mdl_done", "ten_default", age_s=10)
    with session_scope() as session:
        model = session.get(Model, "mdl_done")
        assert model is not None
        model.status = "ready"
    assert _claim() is None
