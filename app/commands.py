"""`qaas serve`, `api`, `migrate`, `keys` and `tenants`: the server's commands, next to what they start.

The `qaas` command (qaas.cli) imports this module by name when one of them runs, so a client install (no
FastAPI, no SQLAlchemy) never does. Each command imports the server's modules when it runs, once --data-dir
has set QAAS_DATA_DIR. `keys` and `tenants` are the operator's: they run on a machine that reaches the
database (QAAS_DATABASE_URL, or the embedded SQLite in QAAS_DATA_DIR / --data-dir).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("qaas")


def _apply_data_dir(data_dir: str | None) -> None:
    if data_dir:
        os.environ["QAAS_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())


def cmd_migrate(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    from app.core.config import get_settings
    from app.core.migrate import upgrade

    settings = get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    print("database is at the latest schema", file=sys.stderr)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(host: str) -> str | None:
    """Why the API must not start on `host` with the current settings, or None. Says the auth mode on stderr."""
    from app.core.config import get_settings

    settings = get_settings()
    if settings.auth == "required":
        print(
            "qaas: every /v1 request needs an API key (QAAS_AUTH=required; qaas keys create)", file=sys.stderr
        )
        return None
    if _is_loopback(host):
        print(
            "qaas: authentication is disabled (QAAS_AUTH=disabled): only this machine can reach the API; every "
            "request acts as the tenant 'default'",
            file=sys.stderr,
        )
        return None
    if settings.allow_public_no_auth:
        print(
            f"qaas: WARNING: authentication is disabled on {host}: ANYONE who can reach it can use the API "
            "(QAAS_ALLOW_PUBLIC_NO_AUTH=true)",
            file=sys.stderr,
        )
        return None
    return (
        f"refusing to listen on {host} with QAAS_AUTH=disabled: anyone who reaches it could use the API. Set "
        "QAAS_AUTH=required and create keys (qaas keys create --tenant NAME), listen on 127.0.0.1, or set "
        "QAAS_ALLOW_PUBLIC_NO_AUTH=true if a proxy in front authenticates"
    )


def cmd_api(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    refusal = check_exposure(args.host)
    if refusal:
        print(f"qaas: {refusal}", file=sys.stderr)
        return 2
    _run_uvicorn(args.host, args.port)
    return 0


def _run_uvicorn(host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then return (the caller stops what it started): exits 3 if it never
    started (uvicorn's STARTUP_FAILURE: the port is taken, the app failed)."""
    import uvicorn

    from app.api.timeouts import TimedH11Protocol
    from app.core import logs

    # Keep idle connections longer than clients do (httpx and most keep 5 s): a server that closes first races
    # a client reusing the connection, which then sees a reset instead of an answer.
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        timeout_keep_alive=30,
        http=TimedH11Protocol,  # h11, plus a bound on a request line and headers (QAAS_READ_TIMEOUT_S)
        log_config=logs.uvicorn_log_config(),  # JSON logs: uvicorn's lines go through the root handler
    )
    server = uvicorn.Server(config)

    def stop(_signum: int, _frame: object) -> None:
        server.should_exit = True

    # uvicorn handles SIGTERM while it serves, then puts back the handler it found and raises the signal again.
    # The default handler would end this process right there, before `qaas serve` stops its worker (which was
    # left running); this one only asks uvicorn to stop (at once when it comes before uvicorn serves).
    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, raised again the same way
        server.run()
    if not server.started:
        sys.exit(3)


class _WorkerChild:
    """The embedded worker: a child process, restarted if it dies, stopped with the server.

    It dies with the server too, even one killed with SIGKILL: `--parent-pid` makes it arm PR_SET_PDEATHSIG
    (workers.upkeep.die_with_parent). The kernel sends that signal when the *thread* that forked the child
    exits, so the worker is started from the main thread or from the watching thread, which lives until the
    worker it started is gone."""

    STOP_TIMEOUT_S = 30.0  # after SIGTERM; the worker's own grace (QAAS_SHUTDOWN_GRACE_S) is 5 s under serve

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # no restart after stop() has looked at the process
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._spawn()
        self.thread.start()

    def _spawn(self) -> None:
        # One machine, one person at the terminal: Ctrl-C hands a running job back after 5 s, not a minute.
        env = {"QAAS_SHUTDOWN_GRACE_S": "5", **os.environ, "QAAS_DATA_DIR": str(self.data_dir)}
        command = [sys.executable, "-m", "qaas", "worker", "--loglevel", "warning"]
        self.proc = subprocess.Popen([*command, "--parent-pid", str(os.getpid())], env=env)

    def _watch(self) -> None:
        delay = 1.0
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                if self.stopping.is_set():
                    return  # only now: the worker this thread started is gone
                log.error("the worker exited with status %s; restarting it in %.0f s", code, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)
                with self.lock:
                    if not self.stopping.is_set():
                        self._spawn()
            time.sleep(0.5)

    def stop(self) -> bool:
        """SIGTERM (the worker's graceful shutdown) and wait; SIGKILL after STOP_TIMEOUT_S. False if killed."""
        with self.lock:
            self.stopping.set()
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("the worker did not stop %.0f s after SIGTERM; killing it", self.STOP_TIMEOUT_S)
            proc.kill()
            proc.wait()
            return False
        return True


def cmd_serve(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).expanduser().resolve()
    _apply_data_dir(str(data_dir))

    refusal = check_exposure(args.host)
    if refusal:
        print(f"qaas: {refusal}", file=sys.stderr)
        return 2
    cmd_migrate(argparse.Namespace(data_dir=str(data_dir)))
    worker = _WorkerChild(data_dir)
    worker.start()
    print(
        f"qaas: API on http://{args.host}:{args.port} (Swagger UI at /docs), data in {data_dir}",
        file=sys.stderr,
    )
    try:
        _run_uvicorn(args.host, args.port)  # returns on SIGINT and SIGTERM
    finally:
        stopped = worker.stop()
    return 0 if stopped else 1


def _session() -> Any:
    from app.core.db import session_scope

    return session_scope()


def _fail(message: str) -> int:
    print(f"qaas: {message}", file=sys.stderr)
    return 1


def cmd_keys_create(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
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
    _apply_data_dir(args.data_dir)
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
    _apply_data_dir(args.data_dir)
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
    _apply_data_dir(args.data_dir)
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
    _apply_data_dir(args.data_dir)
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


def _serve_parser(serve: argparse.ArgumentParser) -> None:
    serve.description = (
        "Migrate the database, then serve the API with one worker: the embedded default (SQLite, local "
        "files, all under --data-dir). Ctrl-C stops both."
    )
    serve.add_argument("--host", default=os.environ.get("QAAS_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("QAAS_PORT", "8000")))
    serve.add_argument("--data-dir", default=os.environ.get("QAAS_DATA_DIR", "./var"))
    serve.set_defaults(func=cmd_serve)


def _api_parser(api: argparse.ArgumentParser) -> None:
    api.description = "The HTTP API alone (QAAS_DATABASE_URL, QAAS_BROKER_URL)."
    api.add_argument("--host", default=os.environ.get("QAAS_HOST", "127.0.0.1"))
    api.add_argument("--port", type=int, default=int(os.environ.get("QAAS_PORT", "8000")))
    api.add_argument("--data-dir", default=None)
    api.set_defaults(func=cmd_api)


def _migrate_parser(migrate: argparse.ArgumentParser) -> None:
    migrate.description = "Apply the database migrations."
    migrate.add_argument("--data-dir", default=None)
    migrate.set_defaults(func=cmd_migrate)


def _keys_parser(keys: argparse.ArgumentParser) -> None:
    keys.description = "Create, list and revoke API keys (QAAS_AUTH=required)."
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


def _tenants_parser(tenants: argparse.ArgumentParser) -> None:
    tenants.description = "List the tenants with their usage, set their quotas."
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


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "serve": _serve_parser,
    "api": _api_parser,
    "migrate": _migrate_parser,
    "keys": _keys_parser,
    "tenants": _tenants_parser,
}


def dispatch(commands: Mapping[str, Callable[[argparse.ArgumentParser], None]], argv: Sequence[str]) -> int:
    """Run the command `argv` starts with, one of `commands` (name -> parser builder), with the logs set up."""
    from app.core import logs

    logs.configure()  # QAAS_LOG_FORMAT: text, or json (one object per line)
    name, *rest = argv
    parser = argparse.ArgumentParser(prog=f"qaas {name}")
    commands[name](parser)
    args = parser.parse_args(rest)
    return int(args.func(args) or 0)


def main(argv: Sequence[str]) -> int:
    """Run the command `argv` starts with (one of COMMANDS: `qaas` dispatches here)."""
    return dispatch(COMMANDS, argv)
