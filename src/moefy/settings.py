"""The one source of settings: what a conversion searches for (`ConvertConfig`) and how a converted
model runs (`RuntimeConfig`).

The defaults of `ConvertConfig` *are* the recommended settings (measured in README "Results"); the
CLI's flags, their `--help` text and their valid choices are generated from the fields below, and
the Python API takes the same objects, so `moefy convert` and `moefy.convert(...)` with the same
arguments build the same model. Everything here is validated without torch or a model, so a typo
fails in milliseconds; the checks that need the FFN width (`validate_for`) run before any weight is
read.

Search settings are stored once, in the plan (`moefy.plan.ModelPlan.config`). Runtime settings can
change on a converted model at any time (`moefy.conversion.apply`, `MoEModel.configure`) without
re-converting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from moefy.errors import InvalidArgumentError

METHODS = ("kmeans", "coactivation", "random", "contiguous")  # expert construction (moefy.experts)
REPRESENTATIVES = ("mean", "zero")  # G-MoEfication (mean activation) or MoEfication (zero)
ROUTER_TARGETS = ("residual", "sq", "mass")  # moefy.routers.expert_targets
STATIC_RANKINGS = ("importance", "random")  # how `static` selection ranks experts
SELECTIONS = ("router", "oracle", "static", "random", "all")  # moefy.moe_ffn.MoEFFN selection modes
KERNELS = ("auto", "cpu", "torch_decode", "torch_grouped", "reference")  # moefy.kernels.KERNELS
CALIBRATION_LANGUAGES = ("german", "french", "spanish", "italian", "portuguese")  # bundled besides english, code
# Calibration mixes of the bundled text (moefy.text): domain -> share of the calibration sequences.
# "multilingual" (the default) keeps half the text English prose + code and spreads the rest over
# five languages, so a conversion does not fit English alone (README "Calibration"); "english-code"
# is the mix of moefy before it.
CALIBRATION_MIXES: dict[str, dict[str, float]] = {
    "multilingual": {"english": 0.25, "code": 0.25, **{lang: 0.1 for lang in CALIBRATION_LANGUAGES}},
    "english-code": {"english": 0.5, "code": 0.5},
}
DEFAULT_EPS = (0.01, 0.03, 0.1, 0.3)  # soft-sparsity thresholds |a| <= eps reported by calibration
DEFAULT_BUDGET = 0.75  # FFN FLOPs budget of a conversion given neither --top-k nor --budget
DEFAULT_DISTILL_STEPS = 60  # distillation steps of a default conversion (measured: benchmarks/distill_curve.py)
MIN_SAMPLE_SIZE = 64  # sampled tokens per layer below which a router cannot be trained


def _opt(help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None, cli: bool = True) -> dict:
    """Field metadata the CLI reads: help text, flag name, valid choices."""
    return {"help": help, "flag": flag, "choices": choices, "cli": cli}


@dataclass(frozen=True)
class ConvertConfig:
    """How to search for an MoE in a dense model. Defaults are the recommended settings."""

    num_experts: int = field(default=256, metadata=_opt("experts per FFN; must divide the FFN width", flag="--experts"))
    budget: float | None = field(
        default=None,
        metadata=_opt(
            f"FFN FLOPs budget as a fraction of dense, router included; the routers are trained for the k it gives "
            f"(without --top-k: {DEFAULT_BUDGET})"
        ),
    )
    top_k: int | None = field(
        default=None, metadata=_opt("experts per token (shared included) instead of --budget", flag="--top-k")
    )
    method: str = field(default="kmeans", metadata=_opt("expert construction", choices=METHODS))
    shared_fraction: float = field(
        default=0.1, metadata=_opt("fraction of experts always on (highest mean |a - r|); 0 for none", flag="--shared")
    )
    representatives: str = field(
        default="mean", metadata=_opt("value of an unselected neuron: mean (G-MoEfication) or zero", choices=REPRESENTATIVES)
    )
    router_target: str = field(
        default="residual", metadata=_opt("what the router predicts per expert", choices=ROUTER_TARGETS)
    )
    router_hidden: int = field(default=0, metadata=_opt("router hidden width; 0 = linear (as good as an MLP here, cheaper)"))
    router_epochs: int = field(default=10, metadata=_opt("router training epochs over the sampled tokens"))
    router_k_fractions: tuple[float, ...] = field(
        default=(), metadata=_opt("also train each router for these fractions of the routed experts", cli=False)
    )
    static_ranking: str = field(
        default="importance", metadata=_opt("expert ranking for static selection", choices=STATIC_RANKINGS)
    )
    sequential: bool = field(
        default=True, metadata=_opt("calibrate block i+1 on the outputs of the converted block i")
    )
    calibration_sequences: int = field(default=128, metadata=_opt("256-token sequences of calibration text"))
    calibration_mix: str = field(
        default="multilingual",
        metadata=_opt("bundled calibration text when no --calibration-text is given", choices=tuple(CALIBRATION_MIXES)),
    )
    sample_size: int = field(default=32768, metadata=_opt("calibration tokens kept per layer for clustering and routers"))
    adaptive_k: bool = field(
        default=True,
        metadata=_opt("choose each layer's k under the one FFN budget from measured sensitivity (with --budget)"),
    )
    distill: bool = field(
        default=True,
        metadata=_opt("distil the routers, representatives and compensation against the dense model on the calibration text"),
    )
    distill_steps: int = field(default=DEFAULT_DISTILL_STEPS, metadata=_opt("distillation steps (0: skip it)"))
    distill_minutes: float | None = field(
        default=None, metadata=_opt("stop distillation after this many minutes, even before --distill-steps")
    )
    distill_batch: int = field(default=2, metadata=_opt("calibration sequences per distillation step"))
    distill_lr: float = field(default=2e-4, metadata=_opt("peak learning rate of distillation (Adam)"))
    distill_layer_weight: float = field(
        default=1.0, metadata=_opt("weight of per-layer output matching beside the KL to the dense model")
    )
    distill_checkpoint_every: int = field(
        default=25, metadata=_opt("steps between distillation checkpoints", cli=False)
    )
    compensation: bool = field(
        default=True, metadata=_opt("learn a compensation vector per layer for the unselected experts (d FLOPs per token)")
    )
    compensation_rank: int = field(
        default=0, metadata=_opt("rank of a learned low-rank path B·A·x per layer beside the experts (0: none; 4·r·d FLOPs)")
    )
    eps: tuple[float, ...] = field(default=DEFAULT_EPS, metadata=_opt("soft-sparsity thresholds (> 0)", cli=False))
    seed: int = field(default=0, metadata=_opt("random seed"))

    def __post_init__(self) -> None:
        if self.top_k is None and self.budget is None:  # neither given: the default budget, written down
            object.__setattr__(self, "budget", DEFAULT_BUDGET)
        self.validate()

    def validate(self) -> None:
        """Every check that needs no model; raises InvalidArgumentError naming the flag."""
        _check_types(self)
        _positive("--experts", self.num_experts)
        if self.top_k is not None and self.budget is not None:
            raise InvalidArgumentError("give --top-k or --budget, not both")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise InvalidArgumentError(f"--budget {self.budget} must be in (0, 1]")
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise InvalidArgumentError(f"--top-k {self.top_k} must be between 1 and --experts {self.num_experts}")
        _choice("--method", self.method, METHODS)
        _choice("--representatives", self.representatives, REPRESENTATIVES)
        _choice("--router-target", self.router_target, ROUTER_TARGETS)
        _choice("--static-ranking", self.static_ranking, STATIC_RANKINGS)
        _choice("--calibration-mix", self.calibration_mix, tuple(CALIBRATION_MIXES))
        if not 0.0 <= self.shared_fraction < 1.0:
            raise InvalidArgumentError(f"--shared {self.shared_fraction} must be in [0, 1)")
        if self.router_hidden < 0:
            raise InvalidArgumentError(f"--router-hidden {self.router_hidden} must be >= 0 (0: a linear router)")
        _positive("--router-epochs", self.router_epochs)
        _positive("--calibration-sequences", self.calibration_sequences)
        _positive("--sample-size", self.sample_size)
        if self.sample_size < MIN_SAMPLE_SIZE:
            raise InvalidArgumentError(f"--sample-size {self.sample_size} is too small to train a router; use {MIN_SAMPLE_SIZE} or more")
        if not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise InvalidArgumentError(f"--distill-steps {self.distill_steps!r} must be an integer >= 0 (0: skip distillation)")
        if self.distill_minutes is not None and not self.distill_minutes > 0:
            raise InvalidArgumentError(f"--distill-minutes {self.distill_minutes} must be > 0")
        _positive("--distill-batch", self.distill_batch)
        _positive("--distill-checkpoint-every", self.distill_checkpoint_every)
        if not self.distill_lr > 0:
            raise InvalidArgumentError(f"--distill-lr {self.distill_lr} must be > 0")
        if not self.distill_layer_weight >= 0:
            raise InvalidArgumentError(f"--distill-layer-weight {self.distill_layer_weight} must be >= 0")
        if self.compensation_rank < 0:
            raise InvalidArgumentError(f"--compensation-rank {self.compensation_rank} must be >= 0 (0: none)")
        if not self.eps or any(e <= 0 for e in self.eps):
            raise InvalidArgumentError(f"eps values must be > 0, got {self.eps}")
        if any(not 0.0 < f <= 1.0 for f in self.router_k_fractions):
            raise InvalidArgumentError(f"router_k_fractions {self.router_k_fractions} must be in (0, 1]")
        shared = self.num_shared
        if self.top_k is not None and self.top_k < self.num_experts and shared >= self.top_k:
            raise InvalidArgumentError(
                f"--shared {self.shared_fraction} makes {shared} shared experts, not fewer than --top-k {self.top_k}; "
                "lower --shared (0 for none) or raise --top-k"
            )

    def validate_for(self, d_ff: int | None) -> None:
        """The checks that need the model's FFN width (read from its config, before any weight);
        None (not known before loading) checks nothing."""
        if d_ff is not None and d_ff % self.num_experts:
            divisors = [n for n in range(2, min(d_ff, 4096) + 1) if d_ff % n == 0]
            shown = ", ".join(map(str, divisors[:24])) + (" ..." if len(divisors) > 24 else "")
            raise InvalidArgumentError(
                f"--experts {self.num_experts} does not divide the FFN width {d_ff}; valid values include: {shown}"
            )

    @property
    def num_shared(self) -> int:
        return round(self.shared_fraction * self.num_experts)

    @property
    def effective_budget(self) -> float | None:
        """The budget the routers are trained for (None: `top_k` is given)."""
        return None if self.top_k is not None else (self.budget if self.budget is not None else DEFAULT_BUDGET)

    def min_calibration_tokens(self) -> int:
        return max(1024, 8 * self.num_experts)

    def replace(self, **changes: Any) -> ConvertConfig:
        """These settings with `changes`; giving top_k clears budget and the reverse."""
        return dataclasses.replace(self, **_exclusive(changes))

    def to_json(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict, *, source: str = "moefy.json", complete: bool = False) -> ConvertConfig:
        return _from_json(cls, d, source, complete)


@dataclass(frozen=True)
class RuntimeConfig:
    """How a converted model runs; changeable at any time without re-converting. `None` keeps what
    the plan chose (the k its routers were trained for)."""

    top_k: int | None = field(default=None, metadata=_opt("experts per token (shared included)", flag="--top-k"))
    budget: float | None = field(default=None, metadata=_opt("FFN FLOPs budget instead of --top-k"))
    tau: float | None = field(
        default=None, metadata=_opt("dynamic k: keep experts until this fraction of predicted residual mass (cap: k)")
    )
    selection: str = field(
        default="router", metadata=_opt(
            "how experts are picked (oracle: exact, full cost, upper bound; static: one fixed set per layer; "
            "random: uniform per token; baselines)", choices=SELECTIONS,
        ),
    )
    kernel: str = field(default="auto", metadata=_opt("expert kernel", choices=KERNELS))
    zero_representatives: bool = field(
        default=False,
        metadata=_opt("unselected experts count as 0 instead of their representatives (standard MoEfication; a baseline)"),
    )

    def __post_init__(self) -> None:
        _check_types(self)
        if self.top_k is not None and self.budget is not None:
            raise InvalidArgumentError("give --top-k or --budget, not both")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidArgumentError(f"--top-k {self.top_k} must be >= 1")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise InvalidArgumentError(f"--budget {self.budget} must be in (0, 1]")
        if self.tau is not None and not 0.0 < self.tau <= 1.0:
            raise InvalidArgumentError(f"--tau {self.tau} must be in (0, 1]")
        _choice("--selection", self.selection, SELECTIONS)
        _choice("--kernel", self.kernel, KERNELS)

    def replace(self, **changes: Any) -> RuntimeConfig:
        """These settings with `changes`; giving top_k clears budget and the reverse (they exclude
        each other), so a saved budget never blocks a new k."""
        return dataclasses.replace(self, **_exclusive(changes))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, *, source: str = "moefy.json", complete: bool = False) -> RuntimeConfig:
        return _from_json(cls, d, source, complete)


def _exclusive(changes: dict[str, Any]) -> dict[str, Any]:
    """top_k and budget exclude each other: setting one clears the other unless both are given."""
    changes = dict(changes)
    if changes.get("top_k") is not None and "budget" not in changes:
        changes["budget"] = None
    if changes.get("budget") is not None and "top_k" not in changes:
        changes["top_k"] = None
    return changes


def _from_json(cls: Any, d: object, source: str, complete: bool) -> Any:
    """Strict: a non-object or an unknown key (e.g. from a newer moefy) is a clear error; with
    `complete`, so is a missing key."""
    if not isinstance(d, dict):
        raise InvalidArgumentError(f"{source}: settings must be a JSON object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise InvalidArgumentError(
            f"{source}: unknown setting(s) {', '.join(unknown)} (written by a newer moefy?); known: {', '.join(known)}"
        )
    missing = sorted(set(known) - set(d)) if complete else []
    if missing:
        raise InvalidArgumentError(f"{source}: missing setting(s) {', '.join(missing)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise InvalidArgumentError(f"{source}: invalid settings: {e}") from None


def _check_types(obj: Any) -> None:
    """Each field holds a value of its annotated type (a bool is not a number; floats are finite);
    settings also come from JSON files and Python callers, not only from typed CLI flags."""
    for f in fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("tuple"):
            ok = isinstance(value, tuple) and all(_is_number(v) for v in value)
        elif kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = _is_number(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            want = {"tuple": "a list of numbers", "bool": "true or false", "int": "an integer", "float": "a finite number"}
            raise InvalidArgumentError(
                f"{flag_name(f)} {value!r} must be {next((w for k, w in want.items() if kind.startswith(k)), 'text')}"
                + (" or none" if "None" in kind else "")
            )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _positive(flag: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgumentError(f"{flag} {value!r} must be a positive integer")


def _choice(flag: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise InvalidArgumentError(f"{flag} {value!r} is not valid; choose one of: {', '.join(valid)}")


# Per-model overrides of the defaults above, keyed by bundled model name. Empty today: the defaults
# were measured as the best settings on both bundled models (README "Results").
PRESETS: dict[str, dict[str, Any]] = {}


def config_for(model_name: str, **overrides: Any) -> ConvertConfig:
    """The recommended config for a model, with the user's overrides (None = keep the default)."""
    values = {**PRESETS.get(model_name, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return ConvertConfig(**values)


__all__ = ["ConvertConfig", "RuntimeConfig", "PRESETS", "config_for", "flag_name"]
