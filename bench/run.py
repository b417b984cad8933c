"""Run the benchmarks and print their tables: `python -m bench.run [--quick] [--only engine,ort,service,poll]
[--markdown FILE]`. See bench/README.md for what each table measures."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.engine_vs_fp32 import EngineRun, Settings, engine_tables, run_case, weights_ratio
from bench.models import Prepared, cases, prepare, tiny_cnn_case
from bench.ort_peer import PeerResult, best_run, peer_table, run_peer
from bench.tables import Table, Target, environment, fmt, markdown_header, ratio

PARTS = ("engine", "ort", "service", "poll")
SPEEDUP_TARGET, SQNR_TARGET, PEER_TARGET, BERT_TARGET, WEIGHTS_TARGET = 5.0, 29.0, 1.4, 3.0, 3.9


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and few iterations: a smoke run")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--models", help="comma-separated model keys (default: all): " + ", ".join(cases()))
    parser.add_argument("--backends", help="comma-separated engine backends (default: each model's own)")
    parser.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    parser.add_argument("--poll-rate", type=float, default=200.0, help="poll requests per second")
    parser.add_argument("--poll-seconds", type=float, help="poll duration (default 20, 3 with --quick)")
    parser.add_argument("--work", type=Path, help="keep the models, datasets and artifacts in this folder")
    return parser


def _split(text: str | None, allowed: tuple[str, ...] | list[str], what: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [i for i in items if i not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (use {', '.join(allowed)})")
    return items


def _best_at_batch1(runs: list[EngineRun], key: str) -> EngineRun | None:
    return best_run([r for r in runs if r.case.key == key])


def _at_least(name: str, value: float | None, wanted: float, unit: str, digits: int = 2) -> Target:
    measured = "-" if value is None else f"{fmt(value, digits)}{unit}"
    return Target(name, f">= {wanted:g}{unit}", measured, None if value is None else value >= wanted)


def targets(runs: list[EngineRun], peers: list[PeerResult], extra: list[Target], *, quick: bool) -> Table:
    """The issue's targets next to what was measured (speedups: the engine's best backend at batch 1)."""
    found: list[Target] = []
    resnet = _best_at_batch1(runs, "resnet18")
    if resnet is not None:
        row = resnet.row(1)
        name = f"ResNet-18 static int8 vs fp32 eager, batch 1 ({resnet.chosen})"
        found.append(_at_least(name, row["speedup"] if row else None, SPEEDUP_TARGET, "x"))
        sqnr = resnet.result.metrics["fidelity"].get("sqnr_db")
        found.append(_at_least(f"ResNet-18 static int8 SQNR ({resnet.chosen})", sqnr, SQNR_TARGET, " dB"))
    for peer in peers:
        if peer.prepared.case.key == "resnet18" and peer.rows and peer.ours is not None:
            row = peer.rows[0]
            name = f"ResNet-18 our int8 vs ORT int8, batch {row['batch_size']} ({peer.ours.chosen})"
            faster = ratio(row["ort_int8"], row.get("ours"))
            found.append(_at_least(name, faster, PEER_TARGET, "x faster"))
    bert = _best_at_batch1(runs, "bert")
    if bert is not None:
        row = bert.row(1)
        name = f"{bert.case.name} dynamic int8 vs fp32 eager, batch 1 ({bert.chosen})"
        found.append(_at_least(name, row["speedup"] if row else None, BERT_TARGET, "x"))
    for key in dict.fromkeys(r.case.key for r in runs):
        best = _best_at_batch1(runs, key)
        if best is not None:
            name = f"{best.case.name} size on weights ({best.chosen})"
            found.append(_at_least(name, weights_ratio(best), WEIGHTS_TARGET, "x", digits=3))
    table = Table("Targets (from the issue)", ["target", "wanted", "measured", "result"])
    for t in found + extra:
        verdict = "not measured" if t.met is None else "met" if t.met else "missed"
        table.add(t.name, t.wanted, t.measured, verdict)
    table.notes = [
        "speedups and SQNR are the engine's (best backend at batch 1); random-weight models: see "
        "bench/README.md on what SQNR means here",
    ]
    if quick:
        table.notes.insert(
            0, "--quick: smaller models and inputs than the issue's; the verdicts are for smoke only"
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = _split(args.only, PARTS, "part") or PARTS
    all_cases = cases(quick=args.quick)
    keys = _split(args.models, list(all_cases), "model") or tuple(all_cases)
    backends = _split(args.backends, ("fbgemm", "x86", "auto"), "backend")
    settings = Settings.for_run(quick=args.quick, backends=backends)
    env = environment(settings.threads)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="qaas-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"[bench] work folder {work}; {env['cpu']} ({env['isa']}), torch {env['torch']}")
    tables: list[Table] = []
    extra: list[Target] = []
    runs: list[EngineRun] = []
    peers: list[PeerResult] = []
    prepared: dict[str, Prepared] = {}
    skipped = Table("Models that did not run", ["model", "why"])
    try:
        if "engine" in only or "ort" in only:
            for key in keys:
                case = all_cases[key]
                try:
                    case_runs = run_case(case, settings, work, log=log)
                except Exception as exc:  # the model could not even be built or exported: say so, go on
                    log(f"[engine] {case.name}: failed ({type(exc).__name__}: {exc})")
                    skipped.add(case.name, f"{type(exc).__name__}: {exc}")
                    continue
                runs += case_runs
                if case_runs:
                    prepared[key] = case_runs[0].prepared
                if "ort" in only and case_runs:
                    log(f"[ort] {case.name}: exporting, quantizing, timing")
                    peer = _peer(prepared[key], best_run(case_runs), settings, work)
                    log(f"[ort] {case.name}: {peer.error or f'{peer.seconds:.1f} s'}")
                    peers.append(peer)
            if "engine" in only:
                tables += engine_tables(runs, settings)
            if "ort" in only:
                tables.append(peer_table(peers, settings))
            if skipped.rows:
                tables.append(skipped)
        if "service" in only or "poll" in only:
            try:
                extra += _service_parts(only, args, settings, work, prepared, tables)
            except Exception as exc:  # the tables measured so far still print
                failed = Table("Service", ["part", "result"])
                failed.add("service / poll", f"failed: {type(exc).__name__}: {exc}")
                tables.append(failed)
        tables.append(targets(runs, peers, extra, quick=args.quick))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(f"qaas benchmarks ({'quick' if args.quick else 'full'}), {env['date']}")
    print("\n".join(f"  {k}: {v}" for k, v in env.items()))
    for table in tables:
        print()
        print(table.text())
    print(f"\nfinished in {elapsed / 60:.1f} min")
    if args.markdown:
        command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
        body = [markdown_header(env | {"run time": f"{elapsed / 60:.1f} min"}, command.strip())]
        body += [t.markdown() for t in tables]
        args.markdown.write_text("\n\n".join(body) + "\n", encoding="utf-8")
        log(f"[bench] wrote {args.markdown}")
    return 0


def _peer(prepared: Prepared, ours: EngineRun | None, settings: Settings, work: Path) -> PeerResult:
    """run_peer, with a failure while timing (after export and quantization) turned into the row's reason."""
    try:
        return run_peer(prepared, ours, settings, work)
    except Exception as exc:
        failed = PeerResult(prepared, ours, "static QDQ" if prepared.case.mode == "static" else "dynamic")
        failed.error = f"failed while timing ({type(exc).__name__}: {exc})"
        return failed


def _service_parts(
    only: tuple[str, ...],
    args: argparse.Namespace,
    settings: Settings,
    work: Path,
    prepared: dict[str, Prepared],
    tables: list[Table],
) -> list[Target]:
    from bench.poll import poll_load, poll_table
    from bench.service import Server, run_service_job, service_overhead, service_table, upload

    found: list[Target] = []
    folder = work / "service"
    folder.mkdir(parents=True, exist_ok=True)
    log("[service] starting qaas serve")
    with Server(folder) as server:
        job_id = None
        if "service" in only:
            model = prepared.get("resnet18") or prepare(
                cases(quick=args.quick)["resnet18"], work / "resnet18"
            )
            log(f"[service] one static job on {model.case.name}: service, qaas quantize, in-process")
            result = service_overhead(server, model, settings, folder)
            table, target = service_table(result)
            tables.append(table)
            found.append(target)
            job_id = result.job_id
        if "poll" in only:
            if job_id is None:
                tiny = prepare(tiny_cnn_case(), work / "tiny")
                model_id, dataset_id, _ = upload(server, tiny)
                job_id = run_service_job(server, tiny, (model_id, dataset_id), 3)[0]["id"]
            seconds = args.poll_seconds or (3.0 if args.quick else 20.0)
            log(f"[poll] GET /v1/jobs/{job_id} at {args.poll_rate:.0f}/s for {seconds:.0f} s")
            table, target = poll_table(poll_load(server.url, job_id, rate=args.poll_rate, seconds=seconds))
            tables.append(table)
            found.append(target)
    return found


if __name__ == "__main__":
    sys.exit(main())
