"""The job contract: every option a job takes, its default and its bounds, defined once.

The API's request (`app.schemas.jobs.JobCreate`, and so OpenAPI and Swagger), the engine's configs, the runner's
spec and the CLIs' flags are all built from the models here. Adding an option is one field here plus its use
(docs/architecture.md#adding-a-job-option).

    options = JobOptions(weight_granularity="per_tensor")          # what a request carries
    config = engine_config("static", "x86", options, BenchmarkOptions())   # what the engine runs: StaticConfig
    StaticConfig(activation_observer="minmax")                       # or built directly, as Python callers do

Pure Python and pydantic: the client, the API, the worker and the engine import it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qaas.contract.vocab import Backend, DataRole, Mode

__all__ = [
    "BenchmarkConfig",
    "BenchmarkOptions",
    "DynamicConfig",
    "EngineConfig",
    "JobOptions",
    "QATConfig",
    "QATOptions",
    "RunnerSpec",
    "StaticConfig",
    "engine_config",
    "explain",
]

MAX_SEED = 2**31 - 1

# Each option once: its type, default, bounds and meaning. The models below only name them.
BackendOption = Annotated[
    Backend, Field(description="An int8 backend, or auto: quantize with each candidate, keep the fastest.")
]
WeightGranularity = Annotated[
    Literal["per_channel", "per_tensor"],
    Field(description="One weight scale per output channel, or one in all."),
]
ActivationObserver = Annotated[
    Literal["minmax", "moving_average", "histogram"],
    Field(description="How activation ranges are observed: histogram is the most accurate, the slowest."),
]
Exclude = Annotated[
    tuple[Annotated[str, Field(min_length=1, pattern=r"\S")], ...],
    Field(
        max_length=256,
        description="Layer names ('features.0'), path prefixes or type names ('Conv2d') kept in float.",
    ),
]
CalibrationBatches = Annotated[
    int, Field(ge=1, le=10_000, description="At most this many calibration batches are observed.")
]
BatchSize = Annotated[int, Field(ge=1, le=1024, description="Calibration batch size.")]
QuantizeEmbeddings = Annotated[
    bool | None,
    Field(
        strict=True,
        description="Also store embedding weights in 8 bits. Default (null): on for Hugging Face models only.",
    ),
]
Seed = Annotated[
    int, Field(ge=0, le=MAX_SEED, description="Seeds the sample order and any generated inputs.")
]
Epochs = Annotated[int, Field(ge=1, le=100, description="Passes over the training set.")]
LearningRate = Annotated[float, Field(gt=0, le=1.0, description="Step size.")]
Loss = Annotated[
    Literal["cross_entropy", "mse"],
    Field(description="cross_entropy: labels are class indices; mse: labels have the output's shape."),
]
Optimizer = Annotated[Literal["sgd", "adam"], Field(description="sgd (momentum 0.9) or adam.")]
TrainBatchSize = Annotated[int, Field(ge=1, le=1024, description="Training batch size.")]
FreezeAfter = Annotated[
    float,
    Field(
        ge=0.0,
        le=1.0,
        description="Fraction of the training steps after which observers and batch-norm statistics freeze.",
    ),
]
BenchBatchSizes = Annotated[
    tuple[Annotated[int, Field(ge=1, le=256)], ...],
    Field(min_length=1, max_length=8, description="Batch sizes to time fp32 against int8, each 1..256."),
]
Threads = Annotated[int, Field(ge=1, le=64, description="Intra-op threads for both models.")]
Iterations = Annotated[int, Field(ge=1, le=10_000, description="Timed runs per model and batch size.")]

DEFAULT_BACKEND = Backend.AUTO


class _Strict(BaseModel):
    """Unknown fields are refused; a value, once validated, is not changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BenchmarkOptions(_Strict):
    """How to time fp32 against int8."""

    batch_sizes: BenchBatchSizes = (1, 8)
    threads: Threads = 1
    iterations: Iterations = 50


class QATOptions(_Strict):
    """Quantization-aware training."""

    epochs: Epochs = 1
    learning_rate: LearningRate = 1e-4
    loss: Loss = "cross_entropy"
    optimizer: Optimizer = "sgd"
    batch_size: TrainBatchSize = 32
    freeze_observers_after: FreezeAfter = 0.5


class JobOptions(_Strict):
    """A job request's `options`: every mode's knobs (each mode reads its own, see engine_config)."""

    weight_granularity: WeightGranularity = "per_channel"
    activation_observer: ActivationObserver = "histogram"
    exclude: Exclude = ()
    calibration_batches: CalibrationBatches = 32
    batch_size: BatchSize = 8
    quantize_embeddings: QuantizeEmbeddings = None
    seed: Seed = 0
    qat: QATOptions = Field(default_factory=QATOptions)


# The engine's configs: one per mode, flat where the request nests, and named by the same option types.
class DynamicConfig(_Strict):
    """Dynamic int8: int8 weights, activations quantized on the fly (Linear, LSTM, GRU). Needs no calibration
    data; evaluation or calibration data, when given, is used for verification.

    Example:
        >>> quantize("model.pt2", DynamicConfig(exclude=("head",)), out_dir="out")
    """

    backend: BackendOption = DEFAULT_BACKEND
    quantize_embeddings: QuantizeEmbeddings = None
    exclude: Exclude = ()
    seed: Seed = 0
    benchmark: BenchmarkOptions = Field(default_factory=BenchmarkOptions)


class StaticConfig(_Strict):
    """Post-training static int8: fuse, observe activations on calibration data, convert.

    Example:
        >>> quantize("cnn.pt2", StaticConfig(activation_observer="minmax"), calibration="calib.npz", out_dir="out")
    """

    backend: BackendOption = DEFAULT_BACKEND
    weight_granularity: WeightGranularity = "per_channel"
    activation_observer: ActivationObserver = "histogram"
    exclude: Exclude = ()
    calibration_batches: CalibrationBatches = 32
    batch_size: BatchSize = 8
    seed: Seed = 0
    benchmark: BenchmarkOptions = Field(default_factory=BenchmarkOptions)


class QATConfig(StaticConfig):
    """Quantization-aware training: fake-quantize, train on labelled data, then convert to int8 (calibration
    data, when given, initialises the observers first).

    Example:
        >>> quantize("cnn.pt2", QATConfig(qat=QATOptions(epochs=2)), train="train.npz", out_dir="out")
    """

    qat: QATOptions = Field(default_factory=QATOptions)


EngineConfig = DynamicConfig | StaticConfig | QATConfig
BenchmarkConfig = BenchmarkOptions  # the engine's name for it

# The engine config each mode runs: it takes the JobOptions fields it names (the others are another mode's).
_MODE_CONFIGS: dict[Mode, type[DynamicConfig] | type[StaticConfig] | type[QATConfig]] = {
    Mode.DYNAMIC: DynamicConfig,
    Mode.STATIC: StaticConfig,
    Mode.QAT: QATConfig,
}


def engine_config(
    mode: str, backend: str, options: JobOptions, benchmark: BenchmarkOptions
) -> DynamicConfig | StaticConfig | QATConfig:
    """The engine's config for a request's mode, backend, options and benchmark.

    Raises:
        ValueError: an unknown mode or backend (a pydantic ValidationError, which is a ValueError).
    """
    cls = _MODE_CONFIGS[Mode(mode)]
    given = options.model_dump()
    taken = {name: given[name] for name in cls.model_fields if name in given}
    return cls(backend=Backend(backend), benchmark=benchmark, **taken)


class RunnerSpec(_Strict):
    """What the worker hands a runner for one job (written as JSON to the runner's spec file).

    Paths are relative to the runner's work folder when the worker writes them (storage keys before
    `workers.tasks` copies the files in); `preprocess` holds an image-folder dataset's preprocessing by role.
    """

    model: str = Field(min_length=1)
    input_shapes: dict[str, Any] | None = None
    mode: Mode
    backend: BackendOption = DEFAULT_BACKEND
    options: JobOptions = Field(default_factory=JobOptions)
    benchmark: BenchmarkOptions = Field(default_factory=BenchmarkOptions)
    calibration: str | None = None
    eval: str | None = None
    train: str | None = None
    preprocess: dict[DataRole, dict[str, Any] | None] | None = None

    def data(self) -> dict[DataRole, str | None]:
        """The dataset path given for each role (None where the job has none)."""
        return {role: getattr(self, role.value) for role in DataRole}

    def config(self) -> DynamicConfig | StaticConfig | QATConfig:
        return engine_config(self.mode, self.backend, self.options, self.benchmark)


def explain(error: ValidationError) -> str:
    """One sentence per problem, each naming the field and what to use ("benchmark.threads: ... 1..64")."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "config"
        ctx = item.get("ctx") or {}
        kind = item["type"]
        if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
            bound = next(iter(ctx.values()))
            words = {
                "greater_than_equal": ">=",
                "less_than_equal": "<=",
                "greater_than": ">",
                "less_than": "<",
            }
            message = f"must be {words[kind]} {bound}, got {item['input']!r}"
        elif kind in ("literal_error", "enum"):
            message = f"{item['input']!r} is unknown: use {ctx.get('expected', '')}"
        elif kind == "too_short":
            message = f"needs at least {ctx.get('min_length')} item(s), e.g. (1,)"
        elif kind == "too_long":
            message = f"takes at most {ctx.get('max_length')} items"
        elif "exclude" in item["loc"]:
            message = f"entry {item['input']!r} is not a layer or type name: use e.g. 'head' or 'Conv2d'"
        elif kind in ("bool_type", "bool_parsing"):
            message = f"must be true or false, got {item['input']!r}"
        elif kind == "extra_forbidden":
            message = "is not an option here: check its spelling and the mode"
        else:
            message = f"{item['msg']}, got {item['input']!r}"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
