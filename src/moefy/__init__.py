"""moefy: turn dense pretrained transformers into real, faster Mixture-of-Experts models
without retraining their weights (Generalized MoEfication, EMNLP 2024), and see what happened.

    import moefy
    moe = moefy.convert("smollm2-135m")          # search a plan and apply it (recommended settings)
    moe.save("runs/smol-moe")                    # adapter folder: moefy.json + plan.safetensors
    moe = moefy.MoEModel.from_pretrained("runs/smol-moe")

The names below are imported lazily, so `import moefy` (and a settings error in the CLI) costs no
torch import.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "ConvertConfig": "moefy.settings",
    "RuntimeConfig": "moefy.settings",
    "MoEModel": "moefy.moe_model",
    "convert": "moefy.api",
    "convert_plan": "moefy.api",
    "load": "moefy.api",
    "evaluate_model": "moefy.api",
    "search": "moefy.conversion",
    "apply": "moefy.conversion",
    "ModelPlan": "moefy.plan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'moefy' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
