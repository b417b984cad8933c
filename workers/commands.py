"""`qaas worker` and `qaas quantize`: the worker's commands, next to what they start.

The `qaas` command (qaas.cli) imports this module by name when one of them runs, so a client install (no torch,
no Celery) never does. `qaas quantize` is the engine alone, no server: the model is loaded in the same
sandboxed runner a job uses, and the same files come out (model.int8.*, report.json, manifest.json). Its job
flags are the job contract's (qaas.contract.flags), as `qaas submit`'s are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when `qaas quantize` runs: the worker arms die_with_parent before anything else
    from qaas.contract.jobs import RunnerSpec


def cmd_worker(args: argparse.Namespace) -> int:
    if args.parent_pid is not None:
        from workers.upkeep import die_with_parent

        die_with_parent(args.parent_pid)  # first: until it is armed, a killed `qaas serve` leaves this behind
    if args.data_dir:
        os.environ["QAAS_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
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


class _Refused(Exception):
    """`qaas quantize` cannot start: the message and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _file(path: Path) -> str:
    if not path.is_file():
        raise _Refused(f"{path} is not a file", 1)
    return str(path.resolve())


def _data(path: Path | None) -> str | None:
    return None if path is None else _file(path)


def _spec(args: argparse.Namespace) -> RunnerSpec:
    """The runner's spec from the command line: paths checked, options validated by the job contract."""
    from pydantic import ValidationError

    from qaas.contract.flags import FlagError, job_flags
    from qaas.contract.jobs import RunnerSpec, explain

    try:
        input_shapes = json.loads(args.input_shapes) if args.input_shapes else None
    except ValueError as exc:
        raise _Refused(f"--input-shapes is not JSON ({exc})", 2) from None
    try:
        given = job_flags(args)
        return RunnerSpec(
            model=_file(args.model),
            input_shapes=input_shapes,
            mode=args.mode,
            backend=args.backend,
            options=given.options,
            benchmark=given.benchmark,
            calibration=_data(args.calib),
            train=_data(args.train),
            eval=_data(args.eval),
        )
    except FlagError as exc:
        raise _Refused(str(exc), 2) from None
    except ValidationError as exc:
        raise _Refused(explain(exc), 2) from None


def summary(result: dict[str, Any]) -> str:
    """The backend, then the numbers as `qaas submit` prints them (qaas.contract.formatting)."""
    from qaas.contract.formatting import summary_lines
    from qaas.contract.metrics import JobMetrics

    metrics = JobMetrics.model_validate(result["metrics"])  # the engine's documents do (tests/engine)
    return "\n".join([f"backend      {result['backend']}", *summary_lines(metrics)])


def _relay(stage: str | None, percent: float | None, message: str | None) -> bool:
    if stage is not None:
        line = f"\r[{stage:>12}] {percent or 0:5.1f}% {message or ''}"
        print(line[:120].ljust(120), end="", file=sys.stderr)
    return False


def cmd_quantize(args: argparse.Namespace) -> int:
    from workers.supervise import run_runner

    try:
        spec = _spec(args)
    except _Refused as exc:
        print(f"qaas quantize: {exc}", file=sys.stderr)
        return exc.status
    out = args.out.resolve()
    work = out / ".qaas-work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(spec.model_dump_json(), encoding="utf-8")
    outcome = run_runner(
        ["quantize", "--spec", str(work / "spec.json"), "--out", str(out)],
        work_dir=work,
        timeout_s=args.timeout,
        threads=spec.benchmark.threads,
        relay=_relay,
    )
    print(file=sys.stderr)
    if outcome.result is None:
        print(f"qaas quantize failed: {outcome.error_code}: {outcome.error_message}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print(summary(outcome.result))
    for artifact in outcome.result["artifacts"]:
        print(f"wrote        {out / artifact['file']}")
    print(f"wrote        {out / 'report.json'}, {out / 'manifest.json'}")
    print(outcome.result["load_snippet"])
    return 0


def _worker_parser(worker: argparse.ArgumentParser) -> None:
    worker.description = "A Celery worker: it runs each job in a sandboxed runner."
    worker.add_argument(
        "--concurrency", type=int, default=None, help="jobs at once (QAAS_WORKER_CONCURRENCY)"
    )
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("--data-dir", default=None)
    # `qaas serve` passes its pid: the worker then dies with it (workers.upkeep.die_with_parent).
    worker.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)


def _quantize_parser(quantize: argparse.ArgumentParser) -> None:
    from qaas.contract.flags import add_job_flags

    quantize.description = (
        "Quantize MODEL to int8 on this machine and write the artifacts, report.json and manifest.json to "
        "the output folder."
    )
    quantize.add_argument("model", type=Path, help="a .pt2 (torch.export) or TorchScript file")
    add_job_flags(quantize)  # --mode, --backend, and a flag per job option (the job contract's)
    quantize.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    quantize.add_argument("--calib", type=Path, help="calibration dataset (.npz or .safetensors)")
    quantize.add_argument("--train", type=Path, help="training dataset with labels (qat)")
    quantize.add_argument("--eval", type=Path, help="evaluation dataset (labels give an accuracy)")
    quantize.add_argument("--input-shapes", help='TorchScript only: JSON such as {"x": [null, 64]}')
    quantize.add_argument("--timeout", type=float, default=3600, help="seconds before the run is stopped")
    quantize.set_defaults(func=cmd_quantize)


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "worker": _worker_parser,
    "quantize": _quantize_parser,
}


def main(argv: Sequence[str]) -> int:
    """Run the command `argv` starts with (one of COMMANDS: `qaas` dispatches here)."""
    from app.commands import dispatch

    return dispatch(COMMANDS, argv)
