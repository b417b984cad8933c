"""`qaas submit` and `qaas jobs` (their flags: qaas.cli): the client's commands. They talk HTTP to a server
through qaas.client (no torch, no server code) and draw progress with rich on a terminal, plain lines elsewhere.

Exit codes: 0 the job succeeded (or was submitted, without --wait); 1 it failed, was cancelled, an upload is
invalid or the server refused the request; 2 a usage error (arguments, missing files, a server URL that is
wrong or does not answer); 130 interrupted (the job goes on).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qaas.contract.flags import FlagError, job_flags
from qaas.contract.formatting import TEXT, summary_table, text_table
from qaas.contract.vocab import JobStatus, UploadStatus

if TYPE_CHECKING:  # imported when a command runs: `qaas --help` needs no httpx
    from qaas.client import Client, Dataset, Job, JobSummary, Model

TIMEOUT_GRACE_S = 30  # --wait outlasts --timeout by this much, so the server's own time limit is what shows


class UsageError(Exception):
    """Wrong arguments: exit 2."""


def guarded(command: Callable[[argparse.Namespace, Client], int]) -> Callable[[argparse.Namespace], int]:
    """The command with an open client, its errors turned into a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from qaas.client import Client, QaasError

        try:
            client = Client(args.server, api_key=args.key)
        except ValueError as exc:
            return _fail(str(exc), code=2)
        with client:
            try:
                _reach(client)
                return command(args, client)
            except UsageError as exc:
                return _fail(str(exc), code=2)
            except QaasError as exc:
                hint = " (pass --key or set QAAS_API_KEY)" if exc.status == 401 else ""
                return _fail(f"{exc.code}: {exc.detail}{hint}")
            except OSError as exc:  # a download folder or report file that cannot be written
                return _fail(str(exc))
            except KeyboardInterrupt:
                return _fail("interrupted; whatever was submitted goes on (qaas jobs list)", code=130)

    return run


def _reach(client: Client) -> None:
    """A server that does not answer at all is a wrong URL (exit 2); anything that answers will do."""
    from qaas.client import QaasConnectionError, QaasError

    try:
        client.health()
    except QaasConnectionError as exc:
        raise UsageError(f"{exc.detail}: is the server running? (--server or QAAS_SERVER)") from None
    except QaasError:
        pass  # e.g. a proxy in front that only forwards /v1


def _fail(message: str, *, code: int = 1) -> int:
    print(f"qaas: {message}", file=sys.stderr)
    return code


def _json_arg(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{flag} is not JSON ({exc}): {text!r}") from None


# --- progress: rich on a terminal, plain lines in a log --------------------------------------------------


class Display:
    """Progress on `stream` (stderr): rich bars when it is a terminal, one plain line per step otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def _progress(self, *columns: Any) -> Any:
        from rich.console import Console
        from rich.progress import Progress

        return Progress(*columns, console=Console(file=self.stream), transient=False)

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    @contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A spinner while the server works on something that has no progress of its own."""
        if not self.live:
            self.line(text)
            yield
            return
        from rich.console import Console

        with Console(file=self.stream).status(text):
            yield

    @contextmanager
    def upload(self, path: Path) -> Iterator[Callable[[int, int], None]]:
        if self.live:
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

            with self._progress(
                TextColumn(f"uploading {path.name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()
            ) as bar:
                task = bar.add_task("upload", total=path.stat().st_size)
                yield lambda sent, total: bar.update(task, completed=sent, total=total)
            return
        shown = [-1]

        def plain(sent: int, total: int) -> None:
            quarter = 4 * sent // total if total else 4
            if quarter > shown[0] and (quarter == 4 or total > 4 << 20):  # small files: one line
                shown[0] = quarter
                self.line(f"uploading {path.name}: {25 * quarter}% of {TEXT.bytes(total)}")

        yield plain

    @contextmanager
    def job(self, job_id: str) -> Iterator[Callable[[Job], None]]:
        started = time.monotonic()
        if self.live:
            from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

            with self._progress(
                TextColumn("{task.description:<24}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[message]}", style="dim"),
            ) as bar:
                task = bar.add_task(job_id, total=100, message="")

                def draw(job: Job) -> None:
                    what = f"{job.status} {job.progress.stage or ''}".strip()
                    message = (job.progress.message or "")[:60]
                    bar.update(task, description=what, completed=job.progress.percent, message=message)

                yield draw
            return
        last: list[Any] = [None, -100.0]

        def plain(job: Job) -> None:
            step = (job.status, job.progress.stage)
            if step != last[0] or job.progress.percent - last[1] >= 10 or job.done:
                last[:] = [step, job.progress.percent]
                self.line(
                    f"[{time.monotonic() - started:6.1f} s] {job.status:<9} {job.progress.stage or '-':<12} "
                    f"{job.progress.percent:5.1f}%  {job.progress.message or ''}"
                )

        yield plain


# --- tables ---------------------------------------------------------------------------------------------


def headline(job: Job) -> str:
    """The job's numbers (qaas.contract.formatting): size, latency per batch size, fidelity, accuracy, then the
    backend, auto's reason for it and the warnings.

    Latency compares int8 with the fp32 model as uploaded and, when the server measured it, with fp32
    compiled the way the int8 model is (TorchScript or AOTInductor): compilation alone can speed a model up.
    """
    backend = f"backend: {job.backend_chosen or 'not chosen yet'} (asked: {job.backend})"
    if not job.metrics:
        return f"no metrics\n{backend}"
    metrics = job.metrics
    lines = [*text_table(*summary_table(metrics)), backend]
    if metrics.backend_choice:
        lines.append(f"  {metrics.backend_choice}")
    return "\n".join(lines + [f"warning: {warning}" for warning in metrics.warnings])


# --- qaas submit ----------------------------------------------------------------------------------------


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a file")
    return path


def _requested(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The job's options and benchmark: --options and --benchmark (JSON), the job flags over them, validated
    by the job contract (a value it refuses is a usage error, in its words); only what was asked is sent."""
    given = {
        "options": _json_arg(args.options, "--options"),
        "benchmark": _json_arg(args.benchmark, "--benchmark"),
    }
    try:
        flags = job_flags(args, {key: value for key, value in given.items() if value is not None})
    except FlagError as exc:
        raise UsageError(str(exc)) from None
    asked = flags.model_dump(mode="json", exclude_unset=True)
    return asked.get("options"), asked.get("benchmark")


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    model_path = _existing(args.model, "the model")
    data_paths = {
        role: _existing(path, f"the {role} dataset")
        for role, path in (("calibration", args.calib), ("train", args.train), ("eval", args.eval))
        if path is not None
    }
    needed = {"static": ("calibration", "--calib"), "qat": ("train", "--train")}.get(args.mode)
    if needed and needed[0] not in data_paths:
        # The server refuses it too (422 dataset_required): say so before a long upload.
        return _fail(
            f"dataset_required: {args.mode} quantization needs {needed[0]} data: pass {needed[1]} FILE"
        )
    input_shapes = _json_arg(args.input_shapes, "--input-shapes")
    options, benchmark = _requested(args)
    if args.out is not None and not args.wait:
        raise UsageError("-o/--out needs --wait: artifacts are downloaded once the job has finished")
    display = Display()
    # No limit of our own unless asked: the server bounds inspections and jobs (QAAS_INSPECT_TIMEOUT_S,
    # timeout_s), and a busy worker can keep an upload queued for as long as the job before it runs.
    limit = args.timeout + TIMEOUT_GRACE_S if args.timeout else None

    with display.upload(model_path) as progress:
        model = client.upload_model(model_path, input_shapes=input_shapes, progress=progress)
    datasets: dict[str, Dataset] = {}
    for role, path in data_paths.items():
        with display.upload(path) as progress:
            datasets[role] = client.upload_dataset(path, progress=progress)
    with display.status("waiting for the server to inspect the uploads"):
        uploads: list[tuple[Path, Model | Dataset]] = [(model_path, client.wait_model(model, timeout=limit))]
        uploads += [(data_paths[role], client.wait_dataset(d, timeout=limit)) for role, d in datasets.items()]
    for path, upload in uploads:
        if upload.status != UploadStatus.READY:
            error = upload.error.code + ": " + upload.error.message if upload.error else upload.status
            return _fail(f"{path} is {upload.status}: {error}")

    job = client.submit(
        model,
        mode=args.mode,
        backend=args.backend,
        calibration_dataset_id=datasets.get("calibration"),
        train_dataset_id=datasets.get("train"),
        eval_dataset_id=datasets.get("eval"),
        options=options,
        benchmark=benchmark,
        timeout_s=args.timeout,
    )
    url = f"{client.url}/v1/jobs/{job.id}"
    if not args.wait:
        print(job.id)
        print(url)
        display.line(f"{job.status}: follow it with `qaas jobs show {job.id}` or GET {url}")
        return 0

    display.line(f"job {job.id} submitted ({url})")
    return _follow(client, display, job, args.out, limit)


def _follow(client: Client, display: Display, job: Job, out: Path | None, timeout: float | None) -> int:
    """Follow the job to its end, then print its numbers and download its artifacts (exit 0) or say why it
    did not succeed (exit 1)."""
    from qaas.client import WaitTimeout

    try:
        with display.job(job.id) as follow:
            job = client.wait(job, timeout=timeout, callback=follow)
    except WaitTimeout as exc:
        return _fail(f"job {job.id} {exc.detail}; it goes on: `qaas jobs cancel {job.id}` stops it")
    except KeyboardInterrupt:
        return _fail(f"stopped following job {job.id}; it goes on: `qaas jobs cancel {job.id}`", code=130)
    return _finish(client, job, out or Path(f"qaas-{job.id}"))


def _finish(client: Client, job: Job, out: Path) -> int:
    if job.status != JobStatus.SUCCEEDED:
        if job.metrics:
            print(headline(job))
        reason = f"{job.error.code}: {job.error.message}" if job.error else job.progress.message or ""
        return _fail(f"job {job.id} {job.status}: {reason}")
    print(f"job {job.id} succeeded: {job.mode} int8")
    print(headline(job))
    for path in client.download_all(job, out):
        artifact = job.artifact(path.name)
        print(f"downloaded {path} ({artifact.size_bytes:,} bytes, sha256 {artifact.sha256} checked)")
    if job.raw.get("load_snippet"):
        print("load it with:\n" + job.raw["load_snippet"].rstrip())
    return 0


# --- qaas jobs ------------------------------------------------------------------------------------------


def _age(job: Job | JobSummary) -> str:
    return job.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if job.created_at else "-"


def cmd_jobs_list(args: argparse.Namespace, client: Client) -> int:
    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    jobs = client.jobs(status=args.status, limit=args.limit or None)
    if args.json:
        print(json.dumps([job.raw for job in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs" + (f" {args.status}" if args.status else ""))
        return 0
    rows = []
    for job in jobs:
        rows.append(
            [
                job.id,
                job.status,
                job.mode,
                job.backend_chosen or job.backend,
                f"{job.progress.percent:.0f}%" if job.status == JobStatus.RUNNING else "",
                TEXT.times(job.size_ratio),
                TEXT.times(job.speedup),
                _age(job),
                job.error.code if job.error else "",
            ]
        )
    header = ["id", "status", "mode", "backend", "progress", "size", "speedup", "created", "error"]
    print("\n".join(text_table(header, rows, align="llllrrrll")))
    return 0


def cmd_jobs_show(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.job_id)
    if args.json:
        print(json.dumps(job.raw, indent=2))
        return 0
    progress = job.progress
    took = ""
    if job.finished_at and job.created_at:
        took = f" in {(job.finished_at - job.created_at).total_seconds():.1f} s"
    lines = [
        f"job       {job.id}",
        f"status    {job.status}{took}",
        f"progress  {progress.stage or '-'} {progress.percent:.0f}%: {progress.message or ''}",
        f"mode      {job.mode}, backend {job.backend_chosen or '-'} (asked: {job.backend})",
        f"model     {job.model_id}",
        f"created   {_age(job)}",
    ]
    if job.error:
        lines.append(f"error     {job.error.code}: {job.error.message}")
    print("\n".join(lines))
    if job.metrics:
        print(headline(job))
    for artifact in job.artifacts:
        print(f"artifact  {artifact.name} ({artifact.size_bytes:,} bytes, sha256 {artifact.sha256})")
    if job.raw.get("report_html_url"):
        print(f"report    {client.url}{job.raw['report_html_url']}")
    return 0


def cmd_jobs_wait(args: argparse.Namespace, client: Client) -> int:
    return _follow(client, Display(), client.job(args.job_id), args.out, args.timeout)


def cmd_jobs_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.job_id)
    if job.status == JobStatus.CANCELLED:
        print(f"{job.id} cancelled")
    else:
        print(f"{job.id} {job.status}: cancelling; its runner is stopped within seconds")
    return 0


def cmd_jobs_report(args: argparse.Namespace, client: Client) -> int:
    if args.html is None:
        print(json.dumps(client.report(args.job_id), indent=2))
        return 0
    page = client.report_html(args.job_id)
    args.html.parent.mkdir(parents=True, exist_ok=True)
    args.html.write_text(page, encoding="utf-8")
    print(f"wrote {args.html} ({len(page.encode()):,} bytes)")
    return 0
