"""The runner: the child process that loads one untrusted model or dataset and does one job.

    python -m workers.runner inspect-model --file PATH [--input-shapes JSON] --out DIR
    python -m workers.runner inspect-dataset --file PATH --out DIR
    python -m workers.runner quantize --spec SPEC.json --out DIR
    python -m workers.runner recheck --spec SPEC.json --artifact FILE --engine E --first METRICS.json --out DIR

`quantize` runs `recheck` itself, in a second runner process, before it reports success
(workers.engine.recheck).

stdout carries JSON lines only, one event each: {"event": "progress", "stage", "percent", "message"}, then
{"event": "result", "result": {...}} (also written to DIR/result.json) or {"event": "error", "code",
"message"}. Anything else that writes to stdout (torch, native libraries) is sent to stderr. Exit status: 0 on
success, 2 on an EngineError (the user's problem), 1 on anything else (code internal_error).

torch is imported lazily, so that --help answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from qaas.contract.jobs import EngineConfig, RunnerSpec, explain
from qaas.contract.vocab import DataRole
from workers.engine.errors import EngineError

__all__ = ["main"]

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


class Events:
    """Writes protocol events to the real stdout, flushed line by line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, event: dict[str, Any]) -> None:
        self.stream.write(json.dumps(event, allow_nan=False) + "\n")
        self.stream.flush()

    def progress(self, stage: str, percent: float, message: str) -> None:
        self.emit(
            {"event": "progress", "stage": stage, "percent": round(float(percent), 1), "message": message}
        )


def _claim_stdout() -> tuple[IO[str], int]:
    """Keep fd 1 for events and point fd 1 (and sys.stdout) at stderr for everything else."""
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(saved, "w", encoding="utf-8", buffering=1), saved


def _parse_json(text: str | None, code: str, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EngineError(code, f"{what} is not valid JSON ({exc})") from exc


def _inspect_model(args: argparse.Namespace, events: Events) -> dict[str, Any]:
    from workers.engine.inputs.io import inspect_model

    shapes = _parse_json(args.input_shapes, "invalid_input_shapes", "--input-shapes")
    events.progress("loading", 0.0, "inspecting the model")
    return inspect_model(args.file, shapes).to_dict()


def _inspect_dataset(args: argparse.Namespace, events: Events) -> dict[str, Any]:
    from workers.engine.inputs.data import inspect_dataset

    preprocess = _parse_json(args.preprocess, "invalid_dataset", "--preprocess")
    events.progress("loading", 0.0, "inspecting the dataset")
    return inspect_dataset(args.file, preprocess=preprocess).to_dict()


def _dataset_path(spec: RunnerSpec, role: DataRole, work: Path) -> str | None:
    """The dataset file the engine reads for `role`. An image-folder zip is decoded here with its upload's
    preprocessing into an .npz in the runner's own directory, so the engine sees plain arrays."""
    path = spec.data()[role]
    preprocess = (spec.preprocess or {}).get(role)
    if path is None or not preprocess:
        return path
    import numpy as np

    from workers.engine.inputs.data import load_dataset

    arrays = load_dataset(path, preprocess=preprocess)
    target = work / f"{role}.npz"
    np.savez(target, allow_pickle=False, **arrays)
    return str(target)


def _read_spec(path: str) -> RunnerSpec:
    """The job spec the worker wrote (workers.tasks), validated by the job contract.

    Raises:
        EngineError: invalid_config, naming the field and what to use.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise EngineError("invalid_config", f"the job spec {path} cannot be read ({exc})") from exc
    try:
        return RunnerSpec.model_validate_json(text)
    except ValidationError as exc:
        raise EngineError("invalid_config", f"the job spec {path} is not valid: {explain(exc)}") from exc


def _config_of(spec: RunnerSpec) -> EngineConfig:
    try:
        return spec.config()
    except ValidationError as exc:
        raise EngineError("invalid_config", explain(exc)) from exc


def _quantize(args: argparse.Namespace, events: Events) -> dict[str, Any]:
    spec = _read_spec(args.spec)
    config = _config_of(spec)
    # Decoded datasets and the recheck's files: TMPDIR is the runner's own work directory in the sandbox.
    with tempfile.TemporaryDirectory(prefix="qaas-runner-") as scratch:
        return _quantize_in(spec, config, Path(args.out), Path(scratch), events)


def _quantize_in(
    spec: RunnerSpec, config: EngineConfig, out_dir: Path, work: Path, events: Events
) -> dict[str, Any]:
    from workers.engine.api import quantize

    data = {role: _dataset_path(spec, role, work) for role in DataRole}
    result = quantize(
        spec.model,
        config,
        out_dir=out_dir,
        input_shapes=spec.input_shapes,
        calibration=data[DataRole.CALIBRATION],
        eval_data=data[DataRole.EVAL],
        train=data[DataRole.TRAIN],
        progress=events.progress,
    )
    out = result.to_dict(relative_to=out_dir)
    # The image zips are arrays now: the second runner reads those, not the zips again.
    decoded = spec.model_copy(update={role.value: path for role, path in data.items()} | {"preprocess": None})
    checked = _fresh_recheck(decoded, out, out_dir, work, events)
    out["metrics"]["fidelity"] = checked["fidelity"]
    if checked.get("accuracy") is not None:
        out["metrics"]["accuracy"] = checked["accuracy"]
    out["metrics"]["verification"] = {
        "fresh_process": True,
        "batches": checked["batches"],
        "samples": checked["samples"],
    }
    from workers.engine.result import write_json

    # The report and manifest travel with the model: the worker stores them as artifacts, `qaas quantize`
    # leaves them beside it.
    write_json(out_dir / "report.json", out["metrics"])
    write_json(out_dir / "manifest.json", out["manifest"])
    return out


def _fresh_recheck(
    spec: RunnerSpec, out: dict[str, Any], out_dir: Path, work: Path, events: Events
) -> dict[str, Any]:
    """Run `recheck` in a second runner process (see workers.engine.recheck) and return what it measured.

    The child inherits this runner's sandbox and limits. When it fails, the artifacts are removed: a model
    that only works in the process that made it is not a result.

    Raises:
        EngineError: verification_failed (or the child's own error code).
    """
    import subprocess

    events.progress("verifying", 96.0, "loading the artifact in a fresh process and checking it again")
    folder = work / "recheck"
    folder.mkdir(exist_ok=True)
    spec_file, first_file = folder / "spec.json", folder / "first.json"
    spec_file.write_text(spec.model_dump_json(), encoding="utf-8")
    first_file.write_text(json.dumps(out["metrics"]), encoding="utf-8")
    artifact = out_dir / out["artifacts"][0]["file"]
    command = [
        sys.executable, "-m", "workers.runner", "recheck", "--spec", str(spec_file), "--artifact", str(artifact),
        "--engine", str(out["manifest"].get("engine", out["backend"])), "--first", str(first_file),
        "--out", str(folder),
    ]  # fmt: skip
    child = subprocess.run(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=False)
    last: dict[str, Any] = {}
    for line in child.stdout.decode("utf-8", "replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in ("result", "error"):
            last = event
    if last.get("event") == "result" and child.returncode == EXIT_OK:
        return dict(last["result"])
    for entry in out["artifacts"]:
        (out_dir / entry["file"]).unlink(missing_ok=True)
    code = str(last.get("code") or "verification_failed")
    if code == "internal_error" or not last:
        code = "verification_failed"
    message = last.get("message") or f"the fresh-process check ended with status {child.returncode}"
    raise EngineError(code, str(message))


def _recheck(args: argparse.Namespace, events: Events) -> dict[str, Any]:
    spec = _read_spec(args.spec)
    first = json.loads(Path(args.first).read_text(encoding="utf-8"))
    from workers.engine.recheck import recheck

    events.progress("verifying", 0.0, "checking the artifact in a fresh process")
    return recheck(
        spec.mode,
        spec.model,
        _config_of(spec),
        artifact=args.artifact,
        engine=args.engine,
        first=first,
        input_shapes=spec.input_shapes,
        data={role.value: path for role, path in spec.data().items()},
    )


COMMANDS: dict[str, Callable[[argparse.Namespace, Events], dict[str, Any]]] = {
    "inspect-model": _inspect_model,
    "inspect-dataset": _inspect_dataset,
    "quantize": _quantize,
    "recheck": _recheck,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.runner", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser(
        "inspect-model", help="record a model's format, inputs, parameters and layers"
    )
    model.add_argument(
        "--file", required=True, help="the uploaded model (.pt2, TorchScript or a zipped Hugging Face model)"
    )
    model.add_argument("--input-shapes", help='TorchScript only: JSON such as {"x": [null, 16]}')
    model.add_argument("--out", required=True, help="the folder for result.json")
    dataset = commands.add_parser("inspect-dataset", help="record a dataset's tensors, samples and labels")
    dataset.add_argument(
        "--file", required=True, help="the uploaded dataset (.npz, .safetensors, image-folder zip or JSONL)"
    )
    dataset.add_argument("--preprocess", help='image folders: JSON such as {"resize": 256, "crop": 224}')
    dataset.add_argument("--out", required=True, help="the folder for result.json")
    job = commands.add_parser("quantize", help="quantize, verify and benchmark one model")
    job.add_argument(
        "--spec", required=True, help="the job spec (JSON); paths in it are absolute or cwd-relative"
    )
    job.add_argument("--out", required=True, help="the folder for the artifacts and result.json")
    again = commands.add_parser(
        "recheck", help="load an artifact in this fresh process and check it measures as `quantize` found"
    )
    again.add_argument(
        "--spec", required=True, help="the job spec (JSON), datasets already decoded to arrays"
    )
    again.add_argument("--artifact", required=True, help="model.int8.ts or model.int8.aoti.pt2")
    again.add_argument("--engine", required=True, help="the quantized engine a TorchScript artifact runs on")
    again.add_argument("--first", required=True, help="the metrics `quantize` reported (JSON)")
    again.add_argument("--out", required=True, help="the folder for result.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one runner command; returns the process exit status."""
    args = _parser().parse_args(argv)
    stream, saved = _claim_stdout()
    events = Events(stream)
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = COMMANDS[args.command](args, events)
        from workers.engine.result import write_json

        write_json(out / "result.json", result)
        events.emit({"event": "result", "result": result})
        return EXIT_OK
    except EngineError as exc:
        events.emit({"event": "error", "code": exc.code, "message": exc.message})
        return EXIT_USER
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        events.emit({"event": "error", "code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
        return EXIT_INTERNAL
    finally:
        stream.flush()


if __name__ == "__main__":
    sys.exit(main())
