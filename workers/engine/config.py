"""Frozen, validated job configurations; `quantize` dispatches on their type."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BACKENDS", "BenchmarkConfig", "DynamicConfig", "QATConfig", "StaticConfig"]

# What each backend serves for each model format and mode is in support.py.
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
        backend: "fbgemm", "x86" or "auto" (measure the candidates on this CPU, keep the faster).
        quantize_embeddings: also store embedding weights in 8 bits; None (the default) means on for
            Hugging Face models (their word embeddings) and off otherwise; True needs a `.pt2` on fbgemm or
            a Hugging Face model.
        exclude: layer names ("encoder.0.linear") or type names ("LSTM") kept in float.
        seed: seeds the random inputs used when no data is given.
        benchmark: how to time the result.

    Example:
        >>> quantize("model.pt2", DynamicConfig(exclude=("head",)), out_dir="out")
    """

    backend: str = "fbgemm"
    quantize_embeddings: bool | None = None
    exclude: tuple[str, ...] = ()
    seed: int = 0
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is unknown: use one of {', '.join(BACKENDS)}")
        if self.quantize_embeddings is not None and not isinstance(self.quantize_embeddings, bool):
            raise ValueError(
                "quantize_embeddings must be true or false (or null: on for Hugging Face models, off otherwise)"
            )
        for name in self.exclude:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(
                    f"exclude entry {name!r} is not a layer or type name: use e.g. 'head' or 'LSTM'"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer 0..{2**32 - 1}, got {self.seed!r}")
        if not isinstance(self.benchmark, BenchmarkConfig):
            raise ValueError("benchmark must be a BenchmarkConfig, e.g. BenchmarkConfig(batch_sizes=(1, 8))")


WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACTIVATION_OBSERVERS = ("minmax", "moving_average", "histogram")
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "adam")


def _check_common(config: StaticConfig | QATConfig) -> None:
    object.__setattr__(config, "exclude", tuple(config.exclude))
    if config.backend not in BACKENDS:
        raise ValueError(f"backend {config.backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    if config.weight_granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(
            f"weight_granularity {config.weight_granularity!r} is unknown: use {' or '.join(WEIGHT_GRANULARITIES)}"
        )
    if config.activation_observer not in ACTIVATION_OBSERVERS:
        raise ValueError(
            f"activation_observer {config.activation_observer!r} is unknown: use one of "
            f"{', '.join(ACTIVATION_OBSERVERS)}"
        )
    for name in config.exclude:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"exclude entry {name!r} is not a layer or type name: use e.g. 'head' or 'Conv2d'"
            )
    for label, value, high in (
        ("calibration_batches", config.calibration_batches, 10_000),
        ("batch_size", config.batch_size, 1024),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(f"{label} must be an integer 1..{high}, got {value!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        raise ValueError(f"seed must be an integer 0..{2**32 - 1}, got {config.seed!r}")
    if not isinstance(config.benchmark, BenchmarkConfig):
        raise ValueError("benchmark must be a BenchmarkConfig, e.g. BenchmarkConfig(batch_sizes=(1, 8))")


@dataclass(frozen=True)
class StaticConfig:
    """Post-training static int8 quantization: fuse, observe activations on calibration data, convert.

    Args:
        backend: "fbgemm", "x86" or "auto" (measure the candidates on this CPU, keep the faster).
        weight_granularity: "per_channel" or "per_tensor" weight scales.
        activation_observer: "minmax", "moving_average" or "histogram" (the most accurate, the slowest).
        exclude: layer names ("features.0") or type names ("Conv2d") kept in float.
        calibration_batches: at most this many batches of the calibration set are observed, 1..10000.
        batch_size: calibration batch size, 1..1024.
        seed: seeds the sample order and any generated inputs.
        benchmark: how to time the result.

    Example:
        >>> quantize("cnn.pt2", StaticConfig(activation_observer="minmax"), calibration="calib.npz", out_dir="out")
    """

    backend: str = "fbgemm"
    weight_granularity: str = "per_channel"
    activation_observer: str = "histogram"
    exclude: tuple[str, ...] = ()
    calibration_batches: int = 32
    batch_size: int = 8
    seed: int = 0
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training: fake-quantize, train on labelled data, then convert to int8.

    Args:
        backend, weight_granularity, activation_observer, exclude, calibration_batches, batch_size, seed,
        benchmark: as for StaticConfig (calibration data, when given, initialises the observers first).
        epochs: passes over the training set, 1..100.
        learning_rate: step size, (0, 1].
        loss: "cross_entropy" (labels are class indices) or "mse" (labels have the output's shape).
        optimizer: "sgd" (momentum 0.9) or "adam".
        train_batch_size: training batch size, 1..1024.
        freeze_observers_after: fraction of the training steps after which observers and batch-norm
            statistics are frozen, 0..1.

    Example:
        >>> quantize("cnn.pt2", QATConfig(epochs=2), train="train.npz", out_dir="out")
    """

    backend: str = "fbgemm"
    weight_granularity: str = "per_channel"
    activation_observer: str = "histogram"
    exclude: tuple[str, ...] = ()
    calibration_batches: int = 32
    batch_size: int = 8
    seed: int = 0
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    epochs: int = 1
    learning_rate: float = 1e-4
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    train_batch_size: int = 32
    freeze_observers_after: float = 0.5

    def __post_init__(self) -> None:
        _check_common(self)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or not 1 <= self.epochs <= 100:
            raise ValueError(f"epochs must be an integer 1..100, got {self.epochs!r}")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is unknown: use {' or '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is unknown: use {' or '.join(OPTIMIZERS)}")
        size = self.train_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1024:
            raise ValueError(f"train_batch_size must be an integer 1..1024, got {size!r}")
        if (
            not isinstance(self.freeze_observers_after, (int, float))
            or not 0 <= self.freeze_observers_after <= 1
        ):
            raise ValueError(f"freeze_observers_after must be in [0, 1], got {self.freeze_observers_after!r}")
