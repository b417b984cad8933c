"""The `qaas` command. Server subcommands import app or workers lazily, so the client stays light."""

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


def cmd_worker(args: argparse.Namespace) -> int:
    if args.parent_pid is not None:
        from workers.upkeep import die_with_parent

        die_with_parent(args.parent_pid)  # first: until it is armed, a killed `qaas serve` leaves this behind
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
    # `qaas serve` passes its pid: the worker then dies with it (workers.upkeep.die_with_parent).
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
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
