"""The one exception the engine raises for problems the user can fix."""

from __future__ import annotations

__all__ = ["EngineError"]


class EngineError(Exception):
    """A problem with the user's input or request; code is stable snake_case, message says what to fix.

    Codes: not_a_model, pickle_not_allowed, native_code_not_allowed, unsupported_format,
    input_shapes_required, invalid_input_shapes, invalid_dataset, dataset_mismatch, nothing_quantized,
    verification_failed, unsupported_combination, model_load_failed.

    Example:
        >>> raise EngineError("input_shapes_required", "TorchScript has no shapes: pass input_shapes")
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The error as the runner reports it: {"code", "message"}."""
        return {"code": self.code, "message": self.message}
