"""`qaas keys` and `qaas tenants`: the operator's commands, run on a machine that reaches the database
(QAAS_DATABASE_URL, or the embedded SQLite in QAAS_DATA_DIR / --data-dir). They import the server lazily."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (QAAS_AUTH=required)")
    keys.add_argument("--data-dir", default=None, help="the embedded default's data folder")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser(
        "create", help="a new key for a tenant (created when new); the key is the last line of stdout"
    )
    create.add_argument("--tenant", required=True, help="tenant name: lower-case letters, digits, . _ -")
    create.add_argument("--name", default="", help="a label to recognise the key by")
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="every key: id, tenant, label, created, last used, revoked")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (key_...): 401 from the next request")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)

    tenants = sub.add_parser("tenants", help="list tenants with their usage, set their quotas")
    tenants.add_argument("--data-dir", default=None, help="the embedded default's data folder")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    tlist = tenants_sub.add_parser("list", help="tenants, their quotas and what they use")
    tlist.set_defaults(func=cmd_tenants_list)
    quota = tenants_sub.add_parser(
        "quota", help="set a tenant's own quotas (default: the QAAS_QUOTA_* settings)"
    )
    quota.add_argument("tenant")
    quota.add_argument(
        "--max-active-jobs", type=int, help="queued + running jobs; 0: no limit; -1: the default"
    )
    quota.add_argument("--max-storage-bytes", type=int, help="stored bytes; 0: no limit; -1: the default")
    quota.set_defaults(func=cmd_tenants_quota)


def _session() -> Any:
    from app.core.db import session_scope

    return session_scope()


def _prepare(args: argparse.Namespace) -> None:
    if args.data_dir:
        os.environ["QAAS_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())


def _fail(message: str) -> int:
    print(f"qaas: {message}", file=sys.stderr)
    return 1


def cmd_keys_create(args: argparse.Namespace) -> int:
    _prepare(args)
    from app.core.errors import QaasError
    from app.services.auth import create_key

    try:
        with _session() as session:
            key, plaintext = create_key(session, args.tenant, args.name)
            key_id, tenant_id = key.id, key.tenant_id
    except QaasError as exc:
        return _fail(exc.detail)
    print(f"created {key_id} for tenant {args.tenant} ({tenant_id}); the key is shown once, store it now:")
    print(plaintext)
    return 0


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def cmd_keys_list(args: argparse.Namespace) -> int:
    _prepare(args)
    from app.services.auth import list_keys

    with _session() as session:
        rows = [
            (
                key.id,
                tenant.name,
                key.name or "-",
                _when(key.created_at),
                _when(key.last_used_at),
                _when(key.revoked_at),
            )
            for key, tenant in list_keys(session)
        ]
    _table(("ID", "TENANT", "NAME", "CREATED", "LAST USED", "REVOKED"), rows)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    _prepare(args)
    from app.core.errors import QaasError
    from app.services.auth import revoke_key

    try:
        with _session() as session:
            key = revoke_key(session, args.key_id)
            print(f"revoked {key.id} (since {_when(key.revoked_at)})")
    except QaasError as exc:
        return _fail(exc.detail)
    return 0


def cmd_tenants_list(args: argparse.Namespace) -> int:
    _prepare(args)
    from sqlalchemy import select

    from app.core.config import get_settings
    from app.models import Tenant
    from app.services import quotas

    settings = get_settings()
    rows = []
    with _session() as session:
        for tenant in session.scalars(select(Tenant).order_by(Tenant.name)):
            max_jobs, max_bytes = quotas.limits(session, settings, tenant.id)
            rows.append(
                (
                    tenant.name,
                    tenant.id,
                    f"{quotas.active_jobs(session, tenant.id)}/{max_jobs or 'unlimited'}",
                    f"{quotas.storage_used(session, tenant.id)}/{max_bytes or 'unlimited'}",
                )
            )
    _table(("TENANT", "ID", "ACTIVE JOBS", "STORED BYTES"), rows)
    return 0


def cmd_tenants_quota(args: argparse.Namespace) -> int:
    _prepare(args)
    from sqlalchemy import select

    from app.models import Tenant

    for value in (args.max_active_jobs, args.max_storage_bytes):
        if value is not None and value < -1:
            return _fail("a quota is a count of 0 or more (0: no limit), or -1 for the QAAS_QUOTA_* default")
    with _session() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == args.tenant))
        if tenant is None:
            return _fail(f"no tenant called {args.tenant!r}: `qaas tenants list` shows them")
        if args.max_active_jobs is not None:
            tenant.max_active_jobs = None if args.max_active_jobs == -1 else args.max_active_jobs
        if args.max_storage_bytes is not None:
            tenant.max_storage_bytes = None if args.max_storage_bytes == -1 else args.max_storage_bytes
        jobs, stored = tenant.max_active_jobs, tenant.max_storage_bytes
    default = "the default"
    print(
        f"tenant {args.tenant}: max active jobs {default if jobs is None else jobs or 'unlimited'}, "
        f"max stored bytes {default if stored is None else stored or 'unlimited'}"
    )
    return 0


def _table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
