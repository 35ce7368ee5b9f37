"""The one exception hierarchy of moefy: every user-facing error is a MoefyError.

Errors restate what the user passed and say what would be valid; the CLI turns any
MoefyError into a one-line message and a non-zero exit code.
"""

from __future__ import annotations


class MoefyError(Exception):
    """Base class of every error moefy raises on bad input or a bad environment."""


class UnknownModelError(MoefyError):
    """A model name, id or path that cannot be resolved."""


class UnsupportedArchitectureError(MoefyError):
    """A `config.model_type` with no architecture spec."""


class MissingDependencyError(MoefyError):
    """An optional package is needed and not installed."""

    def __init__(self, package: str, purpose: str, extra: str | None = None) -> None:
        hint = f"pip install {package}" if extra is None else f"pip install 'moefy[{extra}]' (or: pip install {package})"
        super().__init__(f"{purpose} needs the package '{package}', which is not installed. Install it with: {hint}")
        self.package = package


class InvalidArgumentError(MoefyError, ValueError):
    """An argument outside its valid range or set."""


class TextError(MoefyError):
    """Missing, empty or too-short text."""


class CalibrationError(MoefyError):
    """Calibration failed: too few tokens, NaN/inf activations, ..."""


class CheckpointError(MoefyError):
    """A converted-model folder that is missing, corrupt, or made from another base model."""


class EvaluationError(MoefyError):
    """An evaluation that produced no usable number (non-finite loss)."""
