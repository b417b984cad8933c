"""The `qaas` command. The client's commands (`submit`, `jobs`: qaas.submit) run here; the server's and the
worker's live next to what they start (app/commands.py, workers/commands.py) and are imported by name when
one of them runs. So the client install (`pip install .`: httpx, rich, pydantic) runs `qaas --help` and
`qaas submit`, and `qaas serve` there says which extra to install instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USAGE_ERROR = 2


@dataclass(frozen=True)
class Elsewhere:
    """A command that lives in another package: where, the extra that brings what it needs, its help line."""

    module: str
    extra: str
    help: str


# What each extra of pyproject.toml brings that its commands need, by import name: looked for (not imported)
# before the command's module is, since a command imports them only when it runs (the worker needs torch for
# its runners alone). tests/test_client_install.py checks them against pyproject.toml.
EXTRAS = {
    "server": ("fastapi", "uvicorn", "sqlalchemy", "alembic", "celery", "pydantic_settings"),
    "worker": ("fastapi", "sqlalchemy", "celery", "torch", "torchao", "numpy"),
}

COMMANDS = {
    "serve": Elsewhere(
        "app.commands", "server", "API and one worker on the embedded default (SQLite), one command"
    ),
    "api": Elsewhere("app.commands", "server", "the HTTP API alone (QAAS_DATABASE_URL, QAAS_BROKER_URL)"),
    "worker": Elsewhere("workers.commands", "worker", "a Celery worker"),
    "migrate": Elsewhere("app.commands", "server", "apply database migrations"),
    "quantize": Elsewhere(
        "workers.commands",
        "worker",
        "quantize a model locally, without a server (same outputs and report as a job)",
    ),
    "keys": Elsewhere("app.commands", "server", "create, list and revoke API keys (QAAS_AUTH=required)"),
    "tenants": Elsewhere("app.commands", "server", "list tenants with their usage, set their quotas"),
}


def _connection() -> argparse.ArgumentParser:
    """The flags every client command takes: which server, which key."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--server", metavar="URL", help="the qaas URL (default: $QAAS_SERVER, else http://127.0.0.1:8000)"
    )
    connection.add_argument("--key", help="API key (default: $QAAS_API_KEY)")
    return connection


def _submit_parser(sub: Any, connection: argparse.ArgumentParser) -> None:
    from qaas import submit as run
    from qaas.contract.flags import add_job_flags

    submit = sub.add_parser(
        "submit",
        parents=[connection],
        help="upload a model (and datasets) to a server and quantize it there",
        description="Upload MODEL and the datasets, wait until the server has inspected them, submit a job; "
        "with --wait, follow it, print its numbers and download its artifacts (checked by sha256). "
        "Exit 0 succeeded, 1 failed, 2 usage error.",
    )
    submit.add_argument("model", type=Path, help="a .pt2, a TorchScript file or a zipped Hugging Face folder")
    add_job_flags(submit)  # --mode, --backend, and a flag per job option (the job contract's)
    submit.add_argument("--calib", metavar="FILE", type=Path, help="calibration dataset (static)")
    submit.add_argument("--train", metavar="FILE", type=Path, help="training dataset with labels (qat)")
    submit.add_argument(
        "--eval", metavar="FILE", type=Path, help="evaluation dataset (labels give an accuracy)"
    )
    submit.add_argument(
        "--input-shapes", metavar="JSON", help='TorchScript only: JSON such as {"x": [null, 64]}'
    )
    submit.add_argument(
        "--options",
        metavar="JSON",
        help='job options as JSON, e.g. {"exclude": ["head"], "seed": 1}; a flag below overrides its key',
    )
    submit.add_argument(
        "--benchmark",
        metavar="JSON",
        help='benchmark as JSON, e.g. {"batch_sizes": [1, 32]}; a flag below overrides its key',
    )
    submit.add_argument("--wait", action="store_true", help="follow the job, print its numbers, download")
    submit.add_argument(
        "-o", "--out", metavar="DIR", type=Path, help="with --wait: artifact folder (./qaas-<job id>)"
    )
    submit.add_argument(
        "--timeout",
        metavar="S",
        type=int,
        help="the job's time limit in seconds (timeout_s); --wait waits 30 s longer",
    )
    submit.set_defaults(func=run.guarded(run.cmd_submit))


def _jobs_parser(sub: Any, connection: argparse.ArgumentParser) -> None:
    from qaas import submit as run
    from qaas.contract.vocab import JobStatus

    jobs = sub.add_parser("jobs", help="list, show, cancel jobs on a server; print or save their reports")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_sub.add_parser("list", parents=[connection], help="the newest jobs, one line each")
    listing.add_argument("--status", choices=[status.value for status in JobStatus])
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20; 0: all)")
    listing.add_argument("--json", action="store_true", help="the API's JSON instead of a table")
    listing.set_defaults(func=run.guarded(run.cmd_jobs_list))
    show = jobs_sub.add_parser("show", parents=[connection], help="status, progress, error, numbers")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true", help="the API's JSON instead of a summary")
    show.set_defaults(func=run.guarded(run.cmd_jobs_show))
    wait = jobs_sub.add_parser(
        "wait", parents=[connection], help="follow a job, print its numbers, download (as submit --wait)"
    )
    wait.add_argument("job_id")
    wait.add_argument(
        "-o", "--out", metavar="DIR", type=Path, help="artifact folder (default ./qaas-<job id>)"
    )
    wait.add_argument("--timeout", metavar="S", type=float, help="give up after this many seconds (exit 1)")
    wait.set_defaults(func=run.guarded(run.cmd_jobs_wait))
    cancel = jobs_sub.add_parser("cancel", parents=[connection], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=run.guarded(run.cmd_jobs_cancel))
    report = jobs_sub.add_parser("report", parents=[connection], help="the full report as JSON, or its page")
    report.add_argument("job_id")
    report.add_argument("--html", type=Path, metavar="FILE", help="save the report page to FILE instead")
    report.set_defaults(func=run.guarded(run.cmd_jobs_report))


def build_parser() -> argparse.ArgumentParser:
    """The client's commands, and the others listed by name (each module parses its own arguments)."""
    parser = argparse.ArgumentParser(prog="qaas", description="Quantization as a service.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    connection = _connection()
    _submit_parser(sub, connection)
    _jobs_parser(sub, connection)
    return parser


def _our_module(name: str) -> bool:
    """A module inside qaas's own packages: its absence is a bug, not a missing extra."""
    return "." in name and name.partition(".")[0] in ("app", "workers", "qaas")


def run_elsewhere(name: str, argv: Sequence[str]) -> int:
    """Run `qaas NAME ARGV...` in its module, or say which extra to install (exit 2) when it is missing."""
    command = COMMANDS[name]
    needs = f"qaas {name} needs the {command.extra} extra: pip install 'qaas[{command.extra}]'"
    if any(importlib.util.find_spec(package) is None for package in EXTRAS[command.extra]):
        print(needs, file=sys.stderr)
        return USAGE_ERROR
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        if exc.name is None or _our_module(exc.name):
            raise
        print(needs, file=sys.stderr)
        return USAGE_ERROR
    return int(module.main([name, *argv]))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return run_elsewhere(args[0], args[1:])
    parsed = build_parser().parse_args(args)
    return int(parsed.func(parsed) or 0)
