"""`qaas quantize`: the engine alone, no server. The model is loaded in the same runner child process a job
uses, and the same files come out: model.int8.*, report.json, manifest.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "quantize",
        help="quantize a model locally, without a server (same outputs and report as a job)",
        description="Quantize MODEL to int8 on this machine and write the artifacts, report.json and "
        "manifest.json to the output folder.",
    )
    parser.add_argument("model", type=Path, help="a .pt2 (torch.export) or TorchScript file")
    parser.add_argument("--mode", choices=("dynamic", "static", "qat"), default="dynamic")
    parser.add_argument("--backend", choices=("auto", "fbgemm", "x86"), default="auto")
    parser.add_argument("--calib", type=Path, help="calibration dataset (.npz or .safetensors)")
    parser.add_argument("--train", type=Path, help="training dataset with labels (qat)")
    parser.add_argument("--eval", type=Path, help="evaluation dataset (labels give an accuracy)")
    parser.add_argument("--input-shapes", help='TorchScript only: JSON such as {"x": [null, 64]}')
    parser.add_argument("--exclude", action="append", default=[], help="a layer name or type kept float")
    parser.add_argument("--weight-granularity", choices=("per_channel", "per_tensor"))
    parser.add_argument("--activation-observer", choices=("minmax", "moving_average", "histogram"))
    parser.add_argument("--calibration-batches", type=int)
    parser.add_argument("--batch-size", type=int, help="calibration batch size")
    parser.add_argument("--epochs", type=int, help="qat epochs")
    parser.add_argument("--learning-rate", type=float, help="qat learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="1", help="benchmark batch sizes, comma separated")
    parser.add_argument("--iterations", type=int, default=50, help="benchmark iterations")
    parser.add_argument("--threads", type=int, default=1, help="benchmark threads")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the run is stopped")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.set_defaults(func=run)


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    def path(value: Path | None) -> str | None:
        if value is None:
            return None
        if not value.is_file():
            raise SystemExit(f"qaas quantize: {value} is not a file")
        return str(value.resolve())

    try:
        batch_sizes = [int(part) for part in args.batch_sizes.split(",") if part.strip()]
        input_shapes = json.loads(args.input_shapes) if args.input_shapes else None
    except ValueError as exc:
        raise SystemExit(f"qaas quantize: {exc}") from None
    qat = {"epochs": args.epochs, "learning_rate": args.learning_rate}
    return {
        "model": path(args.model),
        "input_shapes": input_shapes,
        "mode": args.mode,
        "backend": args.backend,
        "options": {
            "exclude": args.exclude,
            "weight_granularity": args.weight_granularity,
            "activation_observer": args.activation_observer,
            "calibration_batches": args.calibration_batches,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "qat": {key: value for key, value in qat.items() if value is not None},
        },
        "benchmark": {"batch_sizes": batch_sizes, "threads": args.threads, "iterations": args.iterations},
        "calibration": path(args.calib),
        "train": path(args.train),
        "eval": path(args.eval),
    }


def summary(result: dict[str, Any]) -> str:
    """The headline numbers as a small table."""
    metrics = result["metrics"]
    size = metrics.get("size") or {}
    lines = [f"backend      {result['backend']}"]
    if size:
        lines.append(
            f"size         {size['fp32_bytes']:,} -> {size['int8_bytes']:,} bytes ({size['ratio']:.2f}x smaller)"
        )
    for row in metrics.get("latency") or []:
        lines.append(
            f"latency b{row['batch_size']:<4} fp32 {row['fp32_ms']['p50']:.3f} ms -> int8 {row['int8_ms']['p50']:.3f} ms "
            f"({row['speedup']:.2f}x)"
        )
    fidelity = metrics.get("fidelity") or {}
    if fidelity:
        lines.append(f"fidelity     cosine {fidelity.get('cosine')}, SQNR {fidelity.get('sqnr_db')} dB")
    accuracy = metrics.get("accuracy") or {}
    if accuracy:
        lines.append(
            f"accuracy     fp32 {accuracy.get('fp32')} -> int8 {accuracy.get('int8')} ({accuracy.get('delta')} points)"
        )
    lines += [f"warning      {w}" for w in metrics.get("warnings") or []]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from workers.supervise import run_runner

    spec = _spec(args)
    out = args.out.resolve()
    work = out / ".qaas-work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))

    def relay(stage: str | None, percent: float | None, message: str | None) -> bool:
        if stage is not None:
            print(
                f"\r[{stage:>12}] {percent or 0:5.1f}% {message or ''}"[:120].ljust(120),
                end="",
                file=sys.stderr,
            )
        return False

    outcome = run_runner(
        ["quantize", "--spec", str(work / "spec.json"), "--out", str(out)],
        work_dir=work,
        timeout_s=args.timeout,
        threads=args.threads,
        relay=relay,
    )
    print(file=sys.stderr)
    if outcome.result is None:
        print(f"qaas quantize failed: {outcome.error_code}: {outcome.error_message}", file=sys.stderr)
        return 1
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(summary(outcome.result))
    for artifact in outcome.result["artifacts"]:
        print(f"wrote        {out / artifact['file']}")
    print(f"wrote        {out / 'report.json'}, {out / 'manifest.json'}")
    print(outcome.result["load_snippet"])
    return 0
