"""Tenants and API keys: create, list, revoke, and check a presented key.

A key reads `qaas_<key id>.<secret>`: the id (public, shown by `qaas keys list`) finds the row, the secret (256
random bits) is compared by its sha256 in constant time. Only the hash is stored; the key is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest, NotFound
from app.core.ids import new_id
from app.models import ApiKey, Tenant
from app.models.common import utcnow
from app.models.tenant import DEFAULT_TENANT_ID, DEFAULT_TENANT_NAME

KEY_PREFIX = "qaas_"
_KEY = re.compile(r"qaas_(key_[0-9a-z]{26})\.([A-Za-z0-9_-]{43})")
_TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
# last_used_at is a hint for people, not an audit log: one write a minute per key, not one per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class Caller:
    """Who a request acts for. `key_id` is None when authentication is disabled."""

    tenant_id: str
    tenant_name: str
    key_id: str | None = None


ANONYMOUS = Caller(tenant_id=DEFAULT_TENANT_ID, tenant_name=DEFAULT_TENANT_NAME)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def ensure_tenant(session: Session, name: str) -> Tenant:
    """The tenant called `name`, created when new."""
    if not _TENANT_NAME.fullmatch(name):
        raise InvalidRequest(
            f"tenant name {name!r} is not allowed: use 1-100 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            code="invalid_tenant_name",
        )
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the tenant called `tenant` (created when new). Returns the row and the key itself."""
    owner = ensure_tenant(session, tenant)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(id=new_id("key"), tenant_id=owner.id, name=(name or "")[:100], secret_sha256=_digest(secret))
    session.add(key)
    session.flush()
    return key, f"{KEY_PREFIX}{key.id}.{secret}"


def list_keys(session: Session) -> list[tuple[ApiKey, Tenant]]:
    rows = session.execute(
        select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(Tenant.name, ApiKey.id)
    )
    return [(key, tenant) for key, tenant in rows.tuples()]


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key; requests with it answer 401 from the next request on. Revoking twice is harmless."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(
            f"no API key with id {key_id!r}: list them with `qaas keys list`", code="key_not_found"
        )
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def check_key(session: Session, presented: str) -> Caller | None:
    """The caller a presented key stands for, or None when it is malformed, unknown or revoked."""
    match = _KEY.fullmatch(presented.strip())
    if match is None:
        return None
    key_id, secret = match.groups()
    row = session.execute(
        select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.id == key_id)
    ).first()
    # Compare even when the id is unknown, so that timing tells nothing about which ids exist.
    stored = row[0].secret_sha256 if row is not None else "0" * 64
    if not hmac.compare_digest(stored, _digest(secret)) or row is None or row[0].revoked_at is not None:
        return None
    key, tenant = row
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Caller(tenant_id=tenant.id, tenant_name=tenant.name, key_id=key.id)
