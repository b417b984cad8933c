"""qaas.contract.formatting: the numbers of a metrics document as the report page, the CLIs and bench/ write them.

The document is built from the contract's models, shaped as a static ResNet-18 job in auto mode reports one
(tests/engine/test_metrics_contract.py proves the engine writes this shape), then read back from its JSON as
the API serves it.
"""

from __future__ import annotations

import math

import pytest

from qaas.contract.formatting import (
    PAGE,
    TEXT,
    Headline,
    backend_table,
    finite,
    headline,
    headline_latency,
    latency_table,
    summary_lines,
    summary_table,
    text_table,
    worst_layers,
)
from qaas.contract.metrics import (
    Accuracy,
    BackendRow,
    Environment,
    Fidelity,
    JobMetrics,
    LatencyRow,
    LayerError,
    Layers,
    Percentiles,
    Size,
    Verification,
)

CHOICE = "x86 is the fastest int8 model (x86 3.1 ms, fbgemm 4.21 ms), at batch 1 on this CPU"
WARNING = "int8 is not faster than fp32 compiled the same way (TorchScript) at batch 64"


def _row(batch: int, fp32: float, int8: float, same: float | None = None) -> LatencyRow:
    return LatencyRow(
        batch_size=batch,
        threads=1,
        fp32_ms=Percentiles(p50=fp32, p95=fp32 * 1.1),
        int8_ms=Percentiles(p50=int8, p95=int8 * 1.1),
        speedup=round(fp32 / int8, 3),
        fp32_same_build_ms=None if same is None else Percentiles(p50=same, p95=same * 1.1),
        speedup_same_build=None if same is None else round(same / int8, 3),
    )


def _document(**changes: object) -> JobMetrics:
    built = JobMetrics(
        size=Size(fp32_bytes=46_830_571, int8_bytes=11_792_385, ratio=3.971, int8_weight_bytes=11_690_112),
        latency=[_row(1, 12.482, 3.104, same=10.951), _row(8, 88.31, 19.87, same=80.2)],
        fidelity=Fidelity(sqnr_db=27.41, cosine=0.998871, max_abs_error=0.3127, top1_agreement=0.984),
        accuracy=Accuracy(fp32=69.76, int8=69.34, delta=-0.42),
        layers=Layers(
            quantized=21,
            float=1,
            per_layer=[
                LayerError(name="conv1", type="Conv2d", sqnr_db=31.2),
                LayerError(name="layer4.1.conv2", type="Conv2d", sqnr_db=17.9),
                LayerError(name="fc", type="Linear", sqnr_db=24.7),
            ],
        ),
        environment=Environment(
            cpu="Intel(R) Xeon(R) Platinum 8480+",
            isa=["avx2", "avx512_vnni", "amx_int8"],
            torch="2.13.0+cpu",
            engine="x86",
            threads=1,
            load_average=0.42,
        ),
        verification=Verification(fresh_process=True, batches=8, samples=64),
        warnings=[WARNING],
        backends={
            "fbgemm": BackendRow(int8_ms_p50=4.21, cosine=0.99871, artifact="model.int8.ts"),
            "x86": BackendRow(int8_ms_p50=3.104, cosine=0.998871, artifact="model.int8.ts"),
            "onnxruntime": BackendRow(
                error={"code": "backend_unavailable", "message": "onnxruntime is not installed"}
            ),
        },
        backend_choice=CHOICE,
    )
    # As the API serves it: the stored JSON, validated again.
    return JobMetrics.model_validate(built.model_dump(mode="json") | changes)


@pytest.fixture
def metrics() -> JobMetrics:
    return _document()


def test_numbers_in_both_notations() -> None:
    assert (TEXT.times(3.971), PAGE.times(3.971), TEXT.times(3.971, 3)) == ("3.97x", "3.97×", "3.971x")
    assert (TEXT.change(4.021), TEXT.change(0.8), PAGE.change(1.0)) == (
        "4.02x faster",
        "0.80x slower",
        "1.00× faster",
    )
    assert TEXT.change(0.5, "smaller", "larger") == "0.50x larger"
    assert (TEXT.db(27.41), TEXT.cosine(0.998871), TEXT.percent(69.76)) == ("27.4 dB", "0.998871", "69.76%")
    assert (TEXT.pp(-0.42), TEXT.pp(0.1), TEXT.pp(0)) == ("-0.42 pp", "+0.10 pp", "+0.00 pp")
    assert [TEXT.ms(v) for v in (123.4, 88.31, 3.104, 0.41234)] == ["123", "88.3", "3.10", "0.412"]
    assert [TEXT.bytes(v) for v in (512, 11_792_385, 46_830_571, 2_500_000_000)] == [
        "512 B",
        "11.8 MB",
        "46.8 MB",
        "2.5 GB",
    ]
    # What is not a finite number is missing, in each notation's sign; ints are numbers, bools are not.
    for value in (None, math.nan, math.inf, True, "3.97", [1]):
        assert finite(value) is None
        assert (TEXT.times(value), PAGE.db(value), PAGE.ms(value), TEXT.change(value)) == ("-", "—", "—", "-")
    assert finite(4) == 4.0 and TEXT.times(4) == "4.00x"


def test_cells_write_any_json_value() -> None:
    assert [PAGE.cell(v) for v in (None, True, 0.42, 12, "x86", ["avx2", "amx_int8"], [])] == [
        "—",
        "true",
        "0.42",
        "12",
        "x86",
        "avx2, amx_int8",
        "[]",
    ]
    assert TEXT.cell({"b": 1, "a": [None]}) == '{"a": [null], "b": 1}'


def test_headline_cards_on_the_page(metrics: JobMetrics) -> None:
    assert headline(metrics, PAGE) == [
        Headline("Smaller", "3.97×", "fp32 46.8 MB → int8 11.8 MB", "good"),
        Headline(
            "Faster",
            "4.02×",
            "at batch 1: p50 12.5 ms → 3.10 ms; 3.53× against fp32 compiled the same way",
            "good",
        ),
        Headline("Accuracy", "-0.42 pp", "top-1 69.76% → 69.34%", ""),
        Headline("Output cosine", "0.998871", "SQNR 27.4 dB against fp32", ""),
    ]
    plain = headline(metrics)  # TEXT: ASCII only, for a terminal
    assert plain[0] == Headline("Smaller", "3.97x", "fp32 46.8 MB -> int8 11.8 MB", "good")
    assert all(card.value.isascii() and card.detail.isascii() for card in plain)


def test_headline_tones_and_the_parts_a_job_may_lack(metrics: JobMetrics) -> None:
    worse = _document(
        size={"fp32_bytes": 1000, "int8_bytes": 1100, "ratio": 0.909},
        latency=[_row(4, 1.0, 1.25).model_dump(mode="json")],
        accuracy={"fp32": 90.0, "int8": 87.5, "delta": -2.5},
    )
    assert [(c.label, c.value, c.tone) for c in headline(worse)] == [
        ("Smaller", "0.91x", "bad"),
        ("Slower", "0.80x", "bad"),
        ("Accuracy", "-2.50 pp", "bad"),
        ("Output cosine", "0.998871", ""),
    ]
    least = _document(latency=[], accuracy=None)
    assert [c.label for c in headline(least)] == ["Smaller", "Output cosine"]


def test_the_headline_speedup_is_at_batch_1_else_the_first_batch_size(metrics: JobMetrics) -> None:
    first = metrics.latency[0]
    assert headline_latency(metrics) == first
    at_8_then_1 = _document(latency=[r.model_dump(mode="json") for r in reversed(metrics.latency)])
    assert headline_latency(at_8_then_1) == first  # batch 1, as the job's `speedup` column
    only_8 = _document(latency=[metrics.latency[1].model_dump(mode="json")])
    assert headline_latency(only_8) == metrics.latency[1]
    assert headline_latency(_document(latency=[])) is None


def test_summary_table_is_what_the_clis_print(metrics: JobMetrics) -> None:
    header, rows = summary_table(metrics)
    assert header == ["", "fp32", "int8", "change", "vs fp32 compiled alike"]
    assert rows == [
        ["size", "46.8 MB", "11.8 MB", "3.97x smaller", ""],
        ["latency p50, batch 1", "12.5 ms", "3.10 ms", "4.02x faster", "3.53x faster"],
        ["latency p50, batch 8", "88.3 ms", "19.9 ms", "4.44x faster", "4.04x faster"],
        ["SQNR (int8 vs fp32)", "", "27.4 dB", "", ""],
        ["cosine (int8 vs fp32)", "", "0.998871", "", ""],
        ["top-1 accuracy", "69.76%", "69.34%", "-0.42 pp", ""],
    ]
    # Without a same-build measurement the last column goes; without labels, the accuracy row.
    eager = _document(latency=[_row(1, 2.0, 1.0).model_dump(mode="json")], accuracy=None)
    header, rows = summary_table(eager)
    assert header == ["", "fp32", "int8", "change"] and all(len(row) == 4 for row in rows)
    assert [row[0] for row in rows] == [
        "size",
        "latency p50, batch 1",
        "SQNR (int8 vs fp32)",
        "cosine (int8 vs fp32)",
    ]


def test_summary_lines_align_the_table_then_say_why_and_warn(metrics: JobMetrics) -> None:
    lines = summary_lines(metrics)
    table = lines[:7]
    assert lines[7:] == [f"auto: {CHOICE}", f"warning: {WARNING}"]
    by_label = {line.split("  ")[0]: line for line in table}
    assert by_label["size"].endswith("3.97x smaller")  # what tests/test_client_cli.py reads
    assert len({len(line) for line in table[2:4]}) == 1  # latency rows end in the right-aligned last column
    assert table[0].rstrip().endswith("vs fp32 compiled alike") and table[0].startswith(" ")
    assert all(line.isascii() for line in lines)
    assert summary_lines(_document(backend_choice=None, warnings=[]))[-1].startswith("top-1 accuracy")


def test_text_table_pads_columns() -> None:
    assert text_table(["name", "ms"], [["a", "1.50"], ["longer", "12.25"]]) == [
        "name       ms",
        "a        1.50",
        "longer  12.25",
    ]
    assert text_table(["a", "b"], [["x", "y"]], align="rl") == ["a  b", "x  y"]


def test_latency_table_on_the_page(metrics: JobMetrics) -> None:
    header, rows = latency_table(metrics, PAGE)
    assert header[4] == "speedup" and len(header) == len(rows[0]) == 7
    assert rows[0] == ["1", "1", "12.5 / 13.7", "3.10 / 3.41", "4.02×", "11.0", "3.53×"]
    eager = _document(latency=[_row(64, 500.0, 125.0).model_dump(mode="json")])
    assert latency_table(eager, PAGE)[1] == [["64", "1", "500 / 550", "125 / 138", "4.00×", "—", "—"]]


def test_worst_layers_first_and_unmeasured_last(metrics: JobMetrics) -> None:
    assert [layer.name for layer in worst_layers(metrics)] == ["layer4.1.conv2", "fc", "conv1"]
    per_layer = [
        {"name": "nan", "type": "ReLU", "sqnr_db": math.nan},
        {"name": "a", "type": "Linear", "sqnr_db": 40},
    ]
    with_nan = _document(layers={"quantized": 2, "float": 0, "per_layer": per_layer})
    assert [layer.name for layer in worst_layers(with_nan)] == ["a", "nan"]
    assert worst_layers(_document(layers=None)) == []
    assert worst_layers(_document(layers={"quantized": 2, "float": 0, "per_layer": None})) == []


def test_backend_table_for_auto(metrics: JobMetrics) -> None:
    header, rows = backend_table(metrics, PAGE)
    assert header == ["backend", "int8_ms_p50", "cosine", "artifact", "error"]
    assert rows == [
        ["fbgemm", "4.21", "0.998710", "model.int8.ts", "—"],
        ["x86", "3.10", "0.998871", "model.int8.ts", "—"],
        ["onnxruntime", "—", "—", "—", "backend_unavailable: onnxruntime is not installed"],
    ]
    # A key a newer worker adds is shown too, as a cell.
    newer = _document(backends={"x86": {"int8_ms_p50": 3.1, "cosine": 0.99, "compile_s": 12.5}})
    assert backend_table(newer) == (
        ["backend", "int8_ms_p50", "cosine", "compile_s"],
        [["x86", "3.10", "0.990000", "12.5"]],
    )
    assert backend_table(_document(backends=None)) == ([], [])
