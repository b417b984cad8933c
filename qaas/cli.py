"""The `qaas` command. Server subcommands import app or workers lazily, so the client stays light."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    import uvicorn

    from app.core import logs

    # Keep idle connections longer than clients do (httpx and most keep 5 s): a server that closes first races
    # a client reusing the connection, which then sees a reset instead of an answer.
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        timeout_keep_alive=30,
        log_config=logs.uvicorn_log_config(),  # JSON logs: uvicorn's lines go through the root handler
    )


def cmd_worker(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    from app.core.config import get_settings
    from app.core.queue import QUEUE
    from workers import tasks, upkeep
    from workers.celery_app import celery
    from workers.sandbox import harden_worker_process

    # Before any runner starts: a same-uid child must not read this process's memory or environment.
    tasks.WORKER_PROTECTIONS[:] = harden_worker_process()
    settings = get_settings()
    concurrency = args.concurrency or settings.worker_concurrency
    # Heartbeat, reaper and the graceful-shutdown grace period (workers.upkeep).
    loop = upkeep.Upkeep(settings, concurrency, tasks.WORKER_PROTECTIONS)
    upkeep.connect_celery_signals(loop, settings.shutdown_grace_s)
    loop.start()
    # Threads are enough: each job's work happens in its own runner process.
    celery.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--queues={QUEUE}",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={args.loglevel}",
        ]
    )
    return 0


class _WorkerChild:
    """The embedded worker: a child process, restarted if it dies, stopped with the server."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._spawn()
        self.thread.start()

    def _spawn(self) -> None:
        # One machine, one person at the terminal: Ctrl-C hands a running job back after 5 s, not a minute.
        env = {"QAAS_SHUTDOWN_GRACE_S": "5", **os.environ, "QAAS_DATA_DIR": str(self.data_dir)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qaas", "worker", "--loglevel", "warning"], env=env
        )

    def _watch(self) -> None:
        delay = 1.0
        while not self.stopping.is_set():
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None and not self.stopping.is_set():
                log.error("the worker exited with status %s; restarting it in %.0f s", code, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                if not self.stopping.is_set():
                    self._spawn()
            time.sleep(0.5)

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
        _run_uvicorn(args.host, args.port)
    finally:
        worker.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qaas", description="Quantization as a service.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="API and one worker on the embedded default (SQLite), one command")
    serve.add_argument("--host", default=os.environ.get("QAAS_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("QAAS_PORT", "8000")))
    serve.add_argument("--data-dir", default=os.environ.get("QAAS_DATA_DIR", "./var"))
    serve.set_defaults(func=cmd_serve)

    api = sub.add_parser("api", help="the HTTP API alone (QAAS_DATABASE_URL, QAAS_BROKER_URL)")
    api.add_argument("--host", default=os.environ.get("QAAS_HOST", "127.0.0.1"))
    api.add_argument("--port", type=int, default=int(os.environ.get("QAAS_PORT", "8000")))
    api.add_argument("--data-dir", default=None)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="a Celery worker")
    worker.add_argument(
        "--concurrency", type=int, default=None, help="jobs at once (QAAS_WORKER_CONCURRENCY)"
    )
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("--data-dir", default=None)
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--data-dir", default=None)
    migrate.set_defaults(func=cmd_migrate)

    from qaas import admin, offline, submit

    offline.add_parser(sub)
    admin.add_parsers(sub)
    submit.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from app.core import logs  # stdlib only: every subcommand, the client ones too

    logs.configure()  # QAAS_LOG_FORMAT: text, or json (one object per line)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
