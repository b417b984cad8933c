"""The x86 backend: torchao pt2e compiled by AOTInductor for a `.pt2`, torch.ao's x86 engine otherwise.

A `.pt2` program is quantized by torchao's X86InductorQuantizer (pt2e.py, quantizer.py) with the mode's own
calibration batches and training loop, and compiled into an AOTInductor package (aoti.py,
`model.int8.aoti.pt2`) whose speed comes from Inductor's oneDNN int8 kernels. TorchScript and Hugging Face
uploads take the torch.ao flows both engines share (lowering.torchscript) on the x86 engine.
"""

from __future__ import annotations

import copy
from typing import Any

from qaas.contract.backends import X86 as DECLARATION
from workers.engine.checks.layers import ProgramProbe, unavailable
from workers.engine.errors import EngineError
from workers.engine.job import Int8Model, Job
from workers.engine.lowering.base import NOTHING_HINT, Modes, QATRecipe, StaticRecipe
from workers.engine.lowering.torchscript import TorchAOLowering
from workers.engine.lowering.x86.aoti import aoti_model
from workers.engine.lowering.x86.pt2e import example_inputs, freeze_pt2e, pt2e_eval, pt2e_train, quantize_pt2e

__all__ = ["X86", "X86Lowering"]

X86_QAT_LAYERS = (
    "backend x86 trains a fake-quantized program whose layers do not pair one to one with the int8 "
    "program's (its batch norms are folded only when converting); backend fbgemm gives per-layer numbers "
    "for QAT"
)
X86_OBSERVER_NOTE = (
    "activation_observer {observer} is not used by backend x86's QAT: activations use torchao's "
    "moving-average min/max fake quantization"
)


def _pt2e_modes() -> Modes:
    from torchao.quantization.pt2e import disable_fake_quant, enable_fake_quant

    return Modes(
        train=pt2e_train,
        eval=pt2e_eval,
        freeze=freeze_pt2e,
        disable_fake_quant=lambda m: m.apply(disable_fake_quant),
        enable_fake_quant=lambda m: m.apply(enable_fake_quant),
    )


def dynamic_program(job: Job, config: Any) -> Int8Model:
    """torchao pt2e dynamic quantization of the Linear layers, for AOTInductor."""
    recurrent = sum(job.loaded.info.layers.get(kind, 0) for kind in ("LSTM", "GRU"))
    if recurrent:
        job.notes.append("LSTM and GRU layers stay float on backend x86: backend fbgemm quantizes them")
    try:
        quantized = quantize_pt2e(
            job.loaded.program, mode="dynamic", example_inputs=example_inputs(job), exclude=config.exclude
        )
    except EngineError as exc:
        if exc.code != "nothing_quantized":
            raise
        hint = "backend fbgemm quantizes LSTM and GRU layers" if recurrent else NOTHING_HINT
        raise EngineError("nothing_quantized", f"{exc.message}; {hint}") from exc
    made = aoti_model(job, quantized)
    made.float_layers += recurrent
    made.layer_probe = ProgramProbe(job.loaded.module, quantized.program.module())
    return made


def static_program(job: Job, config: Any, recipe: StaticRecipe) -> Int8Model:
    """torchao pt2e (X86InductorQuantizer) calibrated on the recipe's batches, for AOTInductor."""
    quantized = quantize_pt2e(
        job.loaded.program,
        mode="static",
        example_inputs=example_inputs(job),
        calibrate=recipe.calibrate,
        per_channel=config.weight_granularity == "per_channel",
        observer=config.activation_observer,
        exclude=config.exclude,
    )
    job.report("converting", 35.0, "converted to int8 by torchao pt2e")
    made = aoti_model(job, quantized)
    made.layer_probe = ProgramProbe(job.loaded.module, quantized.program.module())
    return made


def qat_program(job: Job, config: Any, recipe: QATRecipe) -> Int8Model:
    """torchao's prepare_qat_pt2e on a copy of the program, trained by the recipe's loop, for AOTInductor."""
    if config.activation_observer != "moving_average":
        job.notes.append(X86_OBSERVER_NOTE.format(observer=config.activation_observer))
    modes = _pt2e_modes()
    trained: dict[str, Any] = {}
    initialise = recipe.initialise

    def calibrate(prepared: Any) -> None:
        if initialise is not None:
            initialise(prepared, modes)

    def train(prepared: Any) -> None:
        for param in prepared.parameters():
            param.requires_grad_(param.is_floating_point())
        recipe.train(prepared, modes)
        reference = copy.deepcopy(prepared)  # the fake-quantized model the int8 one must match
        modes.eval(reference)
        trained["reference"] = reference

    # Training updates the tensors in place, and a program's modules share its tensors: work on a copy.
    quantized = quantize_pt2e(
        copy.deepcopy(job.loaded.program),
        mode="qat",
        example_inputs=example_inputs(job),
        calibrate=calibrate if initialise is not None else None,
        train=train,
        per_channel=config.weight_granularity == "per_channel",
        exclude=config.exclude,
    )
    job.report("converting", 35.0, "converted the trained model to int8 by torchao pt2e")
    job.notes.append(unavailable(X86_QAT_LAYERS))
    return aoti_model(job, quantized, trained.get("reference"))


class X86Lowering(TorchAOLowering):
    """pt2e and AOTInductor for `.pt2` programs; torch.ao on the x86 engine for the other formats."""

    declaration = DECLARATION
    engine = "x86"

    dynamic_program = staticmethod(dynamic_program)
    static_program = staticmethod(static_program)
    qat = staticmethod(qat_program)

    def failure(self, job: Job, exc: Exception) -> EngineError | None:
        """An unexpected failure of torchao's pt2e quantizer or Inductor on a `.pt2` is this backend's limit,
        not the user's mistake nor a qaas bug: unsupported_combination, which `auto` records before it goes
        on with the other candidates."""
        if job.format != "pt2":
            return None
        return EngineError(
            "unsupported_combination",
            f"the x86 backend (torchao pt2e and Inductor) failed on this model ({type(exc).__name__}: "
            f"{str(exc)[:300]}): use backend fbgemm",
        )


X86 = X86Lowering()
