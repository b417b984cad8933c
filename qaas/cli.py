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


def cmd_api(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, log_level="info")
    return 0


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
    from app.core.config import get_settings

    settings = get_settings()
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if settings.auth == "disabled":
        where = (
            "only this machine can reach it" if loopback else "ANYONE who can reach this address can use it"
        )
        print(f"qaas: authentication is disabled (QAAS_AUTH=disabled): {where}", file=sys.stderr)
    cmd_migrate(argparse.Namespace(data_dir=str(data_dir)))
    worker = _WorkerChild(data_dir)
    worker.start()
    print(
        f"qaas: API on http://{args.host}:{args.port} (Swagger UI at /docs), data in {data_dir}",
        file=sys.stderr,
    )
    try:
        cmd_api(argparse.Namespace(data_dir=str(data_dir), host=args.host, port=args.port))
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

    from qaas import offline

    offline.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
