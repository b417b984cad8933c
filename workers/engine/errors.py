"""The one exception the engine raises for problems the user can fix."""

from __future__ import annotations

__all__ = ["EngineError"]


class EngineError(Exception):
    """A problem with the user's input or request; code is stable snake_case, message says what to fix.

    Codes: the job codes of qaas.contract.errors.ErrorCode (docs/errors.md), for example not_a_model,
    invalid_dataset, nothing_quantized or verification_failed; a new code is added to that catalogue first.

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
