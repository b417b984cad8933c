"""Hugging Face encoders (bert, distilbert, roberta) from a zipped model folder.

Loaded offline by transformers' own classes (never remote code, never pickles), quantized dynamically
(every nn.Linear, and the word embeddings only: quantizing every nn.Embedding breaks BertModel) and traced to
TorchScript as `(input_ids, attention_mask) -> last hidden state`, with batch and sequence length dynamic.
transformers is imported only here and only when a Hugging Face model is used.

    loaded = load_model("bert.zip")                      # format "hf": loaded.module is an HFEncoder
    result = quantize_hf_dynamic(loaded)
    torch.jit.save(result.module, "model.int8.ts")
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qaas.contract.support import listing
from workers.engine.errors import EngineError
from workers.engine.exclude import Exclusions
from workers.engine.inputs.archive import SAVE_HINT, extract_hf_model
from workers.engine.inputs.models import InputSpec, LoadedModel, ModelInfo
from workers.engine.quiet import quiet

__all__ = [
    "INPUT_NAMES",
    "HFEncoder",
    "HFQuantized",
    "embedding_cosine",
    "hf_example_inputs",
    "load_hf",
    "load_hf_directory",
    "load_tokenizer",
    "max_sequence_length",
    "quantize_hf_dynamic",
]

INPUT_NAMES = ("input_ids", "attention_mask")
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
# Shapes the traced artifact is checked at, against the eager int8 model: another batch, another length.
CHECK_SHAPES = ((1, 5), (3, 11))
TRACE_TOLERANCE = 1e-4
# The last hidden state never reads the pooler: a checkpoint saved without it (sentence encoders) is complete.
OPTIONAL_WEIGHTS = ("pooler.",)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
LISTED = 5


def _transformers() -> Any:
    """transformers, imported with the hub switched off: nothing is ever downloaded."""
    os.environ.update(OFFLINE_ENV)  # read by huggingface_hub when it is first imported
    import transformers

    return transformers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The engine's quiet(), with transformers' progress bars and notices off too."""
    logging = _transformers().utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with quiet():
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class HFEncoder(nn.Module):
    """A transformers encoder as `(input_ids, attention_mask) -> last hidden state [batch, seq, hidden]`.

    The float model in this form is what verification and benchmarks call; traced, it is the artifact.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


@dataclass
class HFQuantized:
    """What quantize_hf_dynamic returns.

    Attributes:
        module: the int8 model, traced TorchScript: `(input_ids, attention_mask) -> last hidden state`.
        float_module: the float model with the same signature (eager), to verify against.
        float_traced: the float model traced the same way, to benchmark int8 against the same build.
        quantized: layers stored in int8 (Linear, and the word embeddings when asked).
        float_layers: candidate layers kept in float (excluded ones).
        cosine: mean token cosine of int8 against fp32 last hidden states on random ids (batch 1 × 5 tokens
            and 3 × 11 with padding); verification on real data is the caller's.
        warnings: notes for the report (exclude entries that matched nothing).
        eager: the int8 model before tracing, with the float model's module paths (per-layer SQNR).
        layers: the quantized layers, module path of the transformers model -> float type name.
    """

    module: torch.jit.ScriptModule
    float_module: HFEncoder
    float_traced: torch.jit.ScriptModule
    quantized: int
    float_layers: int
    cosine: float
    warnings: list[str] = field(default_factory=list)
    eager: HFEncoder | None = None
    layers: dict[str, str] = field(default_factory=dict)


def load_hf_directory(directory: str | Path) -> nn.Module:
    """Load an extracted Hugging Face model folder with transformers, offline, as float32 in eval mode.

    Args:
        directory: a folder that extract_hf_model wrote (config.json, *.safetensors).

    Raises:
        EngineError: model_load_failed when transformers refuses the folder or the weights do not fit
            the architecture (a model with missing weights would silently run on random ones).
    """
    transformers = _transformers()
    with _quiet():
        try:
            model, loading = transformers.AutoModel.from_pretrained(
                str(directory),
                trust_remote_code=False,
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
            )
        except Exception as exc:
            raise EngineError(
                "model_load_failed",
                f"transformers could not load the model ({type(exc).__name__}: {exc}); {SAVE_HINT}",
            ) from exc
    missing = sorted(k for k in loading.get("missing_keys", ()) if not k.startswith(OPTIONAL_WEIGHTS))
    mismatched = sorted(str(k) for k in loading.get("mismatched_keys", ()))
    if missing or mismatched:
        problem = (
            f"missing {listing(missing, most=LISTED)}"
            if missing
            else f"wrong shapes for {listing(mismatched, most=LISTED)}"
        )
        raise EngineError(
            "model_load_failed",
            f"the safetensors weights do not fit the architecture in config.json ({problem}); {SAVE_HINT}",
        )
    return model.float().eval()


def max_sequence_length(model: Any) -> int:
    """The longest sequence the model's position embeddings take (RoBERTa counts positions after padding).

    Args:
        model: a transformers model, an HFEncoder, a LoadedModel, or the config.json content as a dict.
    """
    config: Any = model if isinstance(model, Mapping) else _config(model).to_dict()
    length = int(config["max_position_embeddings"])
    if config.get("model_type") == "roberta":  # positions start after the padding index
        length -= int(config.get("pad_token_id") or 0) + 1
    return length


def _config(model: Any) -> Any:
    if isinstance(model, LoadedModel):
        model = model.module
    if isinstance(model, HFEncoder):
        model = model.model
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected a Hugging Face model, an HFEncoder or a LoadedModel, got {type(model)}")
    return config


def _model_info(model: nn.Module, has_tokenizer: bool) -> ModelInfo:
    config = _config(model)
    counts: dict[str, int] = {}
    for name, sub in model.named_modules():
        if name and not any(True for _ in sub.children()):
            counts[type(sub).__name__] = counts.get(type(sub).__name__, 0) + 1
    details = {
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "tokenizer": has_tokenizer,
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "max_length": max_sequence_length(model),
    }
    inputs = [InputSpec(name, [None, None], "int64") for name in INPUT_NAMES]
    parameters = sum(int(p.numel()) for p in model.parameters())
    return ModelInfo("hf", inputs, parameters, dict(sorted(counts.items())), hf=details)


def load_hf(path: str | Path, *, workdir: str | Path | None = None) -> LoadedModel:
    """Load a zipped Hugging Face model: check the archive, extract what transformers needs, load it.

    Args:
        path: the uploaded zip.
        workdir: where to extract (a new folder inside it); a temporary directory kept alive by the
            returned LoadedModel when None.

    Returns:
        LoadedModel with format "hf", `module` an HFEncoder, `directory` the extracted folder.

    Raises:
        EngineError: as detect_model_format and load_hf_directory.
    """
    keep = None
    if workdir is None:
        keep = tempfile.TemporaryDirectory(prefix="qaas-hf-")
        directory = Path(keep.name)
    else:
        directory = Path(tempfile.mkdtemp(prefix="hf-", dir=workdir))
    archive = extract_hf_model(path, directory)
    model = load_hf_directory(directory)
    info = _model_info(model, archive.has_tokenizer)
    return LoadedModel("hf", HFEncoder(model).eval(), info, directory=directory, keep=keep)


def load_tokenizer(directory: str | Path) -> Any:
    """The model's own tokenizer from an extracted folder, offline and without remote code.

    Raises:
        EngineError: unsupported_combination when the folder has no tokenizer files; model_load_failed
            when transformers cannot build it.
    """
    directory = Path(directory)
    if not any((directory / n).is_file() for n in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise EngineError(
            "unsupported_combination",
            "the model has no tokenizer, so JSONL text cannot be tokenized: add its tokenizer files "
            "(tokenizer.json, tokenizer_config.json, vocab.txt) beside config.json in the zip",
        )
    transformers = _transformers()
    with _quiet():
        try:
            return transformers.AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:
            raise EngineError(
                "model_load_failed",
                f"the model's tokenizer could not be loaded ({type(exc).__name__}: {exc}); "
                "save it with tokenizer.save_pretrained(folder)",
            ) from exc


def hf_example_inputs(
    model: Any, batch: int = EXAMPLE_BATCH, seq_len: int = EXAMPLE_SEQ, *, seed: int = 0, padded: bool = False
) -> dict[str, torch.Tensor]:
    """Deterministic random inputs: ids drawn below vocab_size, an attention mask of ones.

    Args:
        model: a LoadedModel, an HFEncoder or a transformers model (for vocab_size and the longest length).
        batch: rows.
        seq_len: tokens per row (capped at the model's longest sequence).
        seed: seeds the ids.
        padded: mask out the second half of the last row, as padding would.

    Example:
        >>> hf_example_inputs(loaded, 4, 16)["input_ids"].shape
        torch.Size([4, 16])
    """
    config = _config(model)
    seq_len = max(1, min(seq_len, max_sequence_length(model)))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(config.vocab_size), (batch, seq_len), generator=generator, dtype=torch.int64)
    mask = torch.ones_like(ids)
    if padded and seq_len > 1:
        mask[-1, (seq_len + 1) // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def embedding_cosine(reference: Any, candidate: Any, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean cosine similarity of two models' last hidden states, token by token, over unmasked tokens.

    Args:
        reference: the float model, called as reference(input_ids, attention_mask).
        candidate: the int8 model, same signature.
        batches: {"input_ids", "attention_mask"} dicts.
    """
    sims = []
    with torch.no_grad():
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            ref, cand = reference(ids, mask).double(), candidate(ids, mask).double()
            cos = nn.functional.cosine_similarity(ref, cand, dim=-1, eps=1e-12)
            sims.append(cos[mask.bool()])
    return float(torch.cat(sims).mean())


def _trace(module: nn.Module, example: Mapping[str, torch.Tensor]) -> torch.jit.ScriptModule:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(
            module.eval(), (example["input_ids"], example["attention_mask"]), check_trace=False
        )
    return traced


def _check_traced(traced: Any, eager: nn.Module, reference: nn.Module, seed: int) -> float:
    """Run the traced int8 model at other shapes against its eager self; return its cosine against fp32."""
    batches = [hf_example_inputs(eager, b, s, seed=seed + b, padded=b > 1) for b, s in CHECK_SHAPES]
    with torch.no_grad():
        for b in batches:
            expected = eager(b["input_ids"], b["attention_mask"])
            try:
                got = traced(b["input_ids"], b["attention_mask"])
            except Exception as exc:
                raise EngineError(
                    "verification_failed",
                    f"the traced int8 model fails at another batch or sequence length ({type(exc).__name__}: "
                    f"{exc})",
                ) from exc
            scale = max(1.0, float(expected.abs().max()))
            if got.shape != expected.shape or float((got - expected).abs().max()) > TRACE_TOLERANCE * scale:
                raise EngineError(
                    "verification_failed",
                    f"the traced int8 model does not follow the input's shape {list(b['input_ids'].shape)}: "
                    "this model type cannot be traced with a dynamic batch and sequence length",
                )
    return embedding_cosine(reference, traced, batches)


def _hf_model(model: Any) -> nn.Module:
    if isinstance(model, (str, Path)):
        return load_hf_directory(model)
    if isinstance(model, LoadedModel):
        model = model.module
    if isinstance(model, HFEncoder):
        model = model.model
    _config(model)  # raises TypeError for anything else
    return model.eval()


def quantize_hf_dynamic(
    model: Any,
    *,
    quantize_embeddings: bool = True,
    exclude: Sequence[str] = (),
    seed: int = 0,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    per_channel: bool = True,
) -> HFQuantized:
    """Quantize a Hugging Face encoder dynamically and trace it to TorchScript.

    Every nn.Linear gets int8 weights (activations quantized on the fly); with quantize_embeddings the word
    embeddings only (`embeddings.word_embeddings`) get 8-bit weights (float qparams). Position and token type
    embeddings stay float. The result is traced as `(input_ids, attention_mask) -> last hidden state` and
    checked at other batch and sequence sizes. Set torch.backends.quantized.engine first (fbgemm, x86): the
    weights are packed for it. The float model is not modified.

    Args:
        model: an extracted model folder, a LoadedModel of format "hf", an HFEncoder or a transformers model.
        quantize_embeddings: also store the word embeddings in 8 bits.
        exclude: layers kept in float: module paths of the transformers model
            ("encoder.layer.0.output.dense"), path prefixes ("encoder.layer.5") or type names ("Linear").
        seed: seeds the random ids used to trace and check when example_inputs is None.
        example_inputs: {"input_ids", "attention_mask"} to trace with (batch of 2 or more and padding in
            one row are best: a specialised shortcut is then never recorded).
        per_channel: one int8 scale per output channel of each Linear (per tensor when False); per channel
            measured 0.977 against 0.948 mean cosine on all-MiniLM-L6-v2.

    Returns:
        HFQuantized: the traced int8 module, the float counterparts, layer counts, a cosine on random ids.

    Raises:
        EngineError: nothing_quantized (everything excluded), verification_failed (the trace does not keep
            the batch or sequence length dynamic), model_load_failed (a folder that does not load).

    Example:
        >>> torch.backends.quantized.engine = "fbgemm"
        >>> q = quantize_hf_dynamic(load_model("bert.zip"))
        >>> torch.jit.save(q.module, "model.int8.ts"); q.cosine
        0.9998
    """
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    float_model = _hf_model(model)
    excluded = Exclusions(exclude)
    linear = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    names = {id(m): n for n, m in float_model.named_modules()}
    candidates = [n for n, m in float_model.named_modules() if isinstance(m, nn.Linear)]
    embeddings = names.get(id(float_model.get_input_embeddings()))  # type: ignore[operator]
    if embeddings is not None and quantize_embeddings:
        candidates.append(embeddings)
    qconfigs: dict[str, Any] = {}
    for name in candidates:
        type_name = "Embedding" if name == embeddings else "Linear"
        if not excluded(name, type_name=type_name):
            qconfigs[name] = float_qparams_weight_only_qconfig if name == embeddings else linear
    if not qconfigs:
        raise EngineError(
            "nothing_quantized", "every Linear layer is excluded: remove some entries from exclude"
        )
    with _quiet():
        quantized = quantize_dynamic(float_model, qconfigs, dtype=torch.qint8)  # a copy
    float_types = {n: type(m).__name__ for n, m in float_model.named_modules()}
    layers = {
        n: float_types[n]
        for n, m in quantized.named_modules()
        if n in qconfigs and "quantized" in type(m).__module__
    }
    count = len(layers)
    example = example_inputs or hf_example_inputs(float_model, seed=seed, padded=True)
    eager = HFEncoder(quantized).eval()
    reference = HFEncoder(float_model).eval()
    traced = _trace(eager, example)
    cosine = _check_traced(traced, eager, reference, seed)
    return HFQuantized(
        module=traced,
        float_module=reference,
        float_traced=_trace(reference, example),
        quantized=count,
        float_layers=len(candidates) - count,
        cosine=round(cosine, 6),
        warnings=excluded.unused_warnings(),
        eager=eager,
        layers=layers,
    )
