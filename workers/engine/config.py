"""Frozen, validated job configurations; `quantize` dispatches on their type."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BACKENDS", "BenchmarkConfig", "DynamicConfig"]

# "x86" is a valid request that this slice cannot serve yet: quantize() answers unsupported_combination for
# it, so that the config stays the same when the full engine arrives.
BACKENDS = ("fbgemm", "x86", "auto")
MAX_BATCH_SIZE = 256
MAX_THREADS = 64
MAX_ITERATIONS = 10_000


@dataclass(frozen=True)
class BenchmarkConfig:
    """How to time fp32 against int8.

    Args:
        batch_sizes: the batch sizes to time, each 1..256.
        threads: intra-op threads for both models, 1..64.
        iterations: timed runs per model and batch size, 1..10000 (after a warm-up).

    Example:
        >>> BenchmarkConfig(batch_sizes=(1, 8), threads=1, iterations=50)
    """

    batch_sizes: tuple[int, ...] = (1,)
    threads: int = 1
    iterations: int = 50

    def __post_init__(self) -> None:
        # Lists arrive from JSON; store a tuple so the config stays hashable and frozen in spirit.
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if not self.batch_sizes:
            raise ValueError("benchmark.batch_sizes is empty: give at least one batch size, e.g. (1,)")
        for b in self.batch_sizes:
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH_SIZE:
                raise ValueError(
                    f"benchmark batch size {b!r} is out of range: use integers 1..{MAX_BATCH_SIZE}"
                )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int):
            raise ValueError(f"benchmark.threads must be an integer 1..{MAX_THREADS}, got {self.threads!r}")
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"benchmark.threads={self.threads} is out of range: use 1..{MAX_THREADS}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int):
            raise ValueError(f"benchmark.iterations must be an integer 1..{MAX_ITERATIONS}")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(
                f"benchmark.iterations={self.iterations} is out of range: use 1..{MAX_ITERATIONS}"
            )


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic int8 quantization: int8 weights, activations quantized on the fly (Linear, LSTM, GRU).

    Needs no calibration data; evaluation or calibration data, when given, is used for verification.

    Args:
        backend: "fbgemm", "auto" (resolves to fbgemm in this release) or "x86" (comes with the full engine).
        quantize_embeddings: also store nn.Embedding weights in 8 bits (exported `.pt2` models only).
        exclude: layer names ("encoder.0.linear") or type names ("LSTM") kept in float.
        seed: seeds the random inputs used when no data is given.
        benchmark: how to time the result.

    Example:
        >>> quantize("model.pt2", DynamicConfig(exclude=("head",)), out_dir="out")
    """

    backend: str = "fbgemm"
    quantize_embeddings: bool = False
    exclude: tuple[str, ...] = ()
    seed: int = 0
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is unknown: use one of {', '.join(BACKENDS)}")
        if not isinstance(self.quantize_embeddings, bool):
            raise ValueError("quantize_embeddings must be true or false")
        for name in self.exclude:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(
                    f"exclude entry {name!r} is not a layer or type name: use e.g. 'head' or 'LSTM'"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer 0..{2**32 - 1}, got {self.seed!r}")
        if not isinstance(self.benchmark, BenchmarkConfig):
            raise ValueError("benchmark must be a BenchmarkConfig, e.g. BenchmarkConfig(batch_sizes=(1, 8))")
