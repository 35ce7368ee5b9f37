"""Generalized MoEfication of a whole model: search (calibrate, plan experts, representatives,
routers), then apply (swap each FFN for an `MoEFFN`).

`convert()` reads as the pipeline of DESIGN.md. Conversion is block by block: with
`sequential=True` (default) every block is converted before the next one is calibrated, so each
router is trained on the inputs it will really see in the converted model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from moefy.calibrate import DEFAULT_EPS, LayerCalibration, calibrate_blockwise
from moefy.errors import CalibrationError, InvalidArgumentError
from moefy.experts import METHODS, plan_experts, validate_partition
from moefy.ffn import extract_ffn, swap_ffn
from moefy.flops import FFNShape, dense_ffn_flops, k_for_budget, moe_ffn_flops
from moefy.kernels import ExpertWeights
from moefy.models import LoadedModel
from moefy.moe_ffn import SELECTIONS, MoEFFN
from moefy.routers import TARGETS, expert_targets, fit_router
from moefy.specs import find_blocks
from moefy.text import TokenBatch

log = logging.getLogger(__name__)

REPRESENTATIVES = ("mean", "zero")


@dataclass
class ConvertConfig:
    num_experts: int = 128
    top_k: int = 64  # experts computed per token (shared experts included)
    method: str = "coactivation"  # expert construction, see moefy.experts.METHODS
    representatives: str = "mean"  # 'mean' (G-MoEfication) or 'zero' (MoEfication)
    selection: str = "router"  # router | oracle | static | all
    static_ranking: str = "importance"  # static selection: 'importance' (mean residual norm) or 'random'
    router_target: str = "residual"  # residual | sq | mass
    router_hidden: int = 0  # 0: linear router (as good as a 256-wide MLP here, and cheaper)
    router_epochs: int = 10
    router_k_fractions: tuple[float, ...] = ()  # also train the router for these fractions of the routed experts
    shared_fraction: float = 0.0  # fraction of experts always on (highest mean |a - r|)
    tau: float | None = None  # dynamic k: predicted residual mass to keep (capped at top_k)
    sequential: bool = True  # calibrate block i+1 on the outputs of the converted block i
    sample_size: int = 32768  # calibration tokens kept per layer for clustering and routers
    eps: tuple[float, ...] = DEFAULT_EPS
    kernel: str = "auto"
    seed: int = 0

    def validate(self, d_ff: int) -> None:
        validate_partition(d_ff, self.num_experts)
        if not 1 <= self.top_k <= self.num_experts:
            raise InvalidArgumentError(f"--top-k {self.top_k} must be between 1 and --experts {self.num_experts}")
        if self.method not in METHODS:
            raise InvalidArgumentError(f"unknown expert method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.representatives not in REPRESENTATIVES:
            raise InvalidArgumentError(
                f"unknown representatives {self.representatives!r}; valid: {', '.join(REPRESENTATIVES)}"
            )
        if self.selection not in SELECTIONS:
            raise InvalidArgumentError(f"unknown selection {self.selection!r}; valid: {', '.join(SELECTIONS)}")
        if self.router_target not in TARGETS:
            raise InvalidArgumentError(f"unknown router target {self.router_target!r}; valid: {', '.join(TARGETS)}")
        if any(e <= 0 for e in self.eps):
            raise InvalidArgumentError(f"eps values must be > 0, got {self.eps}")
        shared = round(self.shared_fraction * self.num_experts)
        if shared >= self.top_k and self.top_k < self.num_experts:
            raise InvalidArgumentError(
                f"shared_fraction={self.shared_fraction} makes {shared} shared experts, not fewer than --top-k {self.top_k}; "
                "lower --shared (0 for none) or raise --top-k"
            )
        if self.tau is not None and not 0 < self.tau <= 1:
            raise InvalidArgumentError(f"--tau {self.tau} must be in (0, 1]")

    def min_calibration_tokens(self) -> int:
        return max(1024, 8 * self.num_experts)

    def to_json(self) -> dict:
        d = asdict(self)
        d["eps"] = list(self.eps)
        d["router_k_fractions"] = list(self.router_k_fractions)
        return d

    @classmethod
    def from_json(cls, d: dict) -> ConvertConfig:
        d = dict(d)
        d["eps"] = tuple(d.get("eps", DEFAULT_EPS))
        d["router_k_fractions"] = tuple(d.get("router_k_fractions", ()))
        return cls(**d)


@dataclass
class LayerReport:
    index: int
    name: str
    router_recall: float | None
    num_shared: int
    mean_abs_centred: float  # mean |a - r| over the sample
    seconds: float


@dataclass
class ConvertedModel:
    """A converted model (the HF model, its FFNs swapped in place) and what conversion found."""

    loaded: LoadedModel
    config: ConvertConfig
    layers: list[LayerReport] = field(default_factory=list)
    calibrations: list[LayerCalibration] = field(default_factory=list)
    seconds: float = 0.0
    base_identity: dict = field(default_factory=dict)  # the dense model's, recorded before conversion

    @property
    def model(self) -> nn.Module:
        return self.loaded.model


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def configure(model: nn.Module, **kwargs) -> None:
    """Set top_k / selection / tau on every MoE layer (see MoEFFN.configure)."""
    layers = moe_layers(model)
    if not layers:
        raise InvalidArgumentError("the model has no MoE layers; convert it first")
    for m in layers:
        m.configure(**kwargs)


def layer_shape(m: MoEFFN) -> FFNShape:
    return FFNShape(m.d_model, m.num_experts * m.expert_size, m.gated, m.b_in is not None, m.b_out is not None)


def router_flops(m: MoEFFN) -> int:
    if m.selection == "router" and m.router is not None:
        return m.router.flops_per_token()
    return 0


def ffn_flops_fraction(model: nn.Module, measured: bool = True) -> float:
    """MoE FFN FLOPs / dense FFN FLOPs over all converted layers (router included). With
    `measured`, uses the mean number of experts each layer really computed (dynamic k); oracle
    selection counts as full cost."""
    dense = moe = 0.0
    for m in moe_layers(model):
        shape = layer_shape(m)
        dense += dense_ffn_flops(shape)
        if m.selection == "oracle":
            moe += dense_ffn_flops(shape)
            continue
        k = m.mean_selected if measured else m.top_k
        moe += moe_ffn_flops(shape, m.num_experts, k, router_flops(m))
    return moe / dense if dense else 1.0


def top_k_for_budget(model: nn.Module, budget: float) -> int:
    """The top_k meeting an FFN FLOPs budget (fraction of dense, router included) on every layer."""
    m = moe_layers(model)[0]
    return k_for_budget(layer_shape(m), m.num_experts, budget, router_flops(m), min_k=max(1, m.num_shared))


def _check_calibration(batches: list[TokenBatch], config: ConvertConfig) -> None:
    tokens = sum(b.num_tokens for b in batches)
    needed = config.min_calibration_tokens()
    if tokens < needed:
        raise CalibrationError(
            f"too few calibration tokens: got {tokens}, need at least {needed} for {config.num_experts} experts"
        )


def build_moe_layer(ffn_weights, calib: LayerCalibration, config: ConvertConfig) -> tuple[MoEFFN, LayerReport]:
    """Search and build the MoE FFN of one layer from its calibration."""
    t0 = time.perf_counter()
    x = calib.sample_x  # (N, D)
    a = ffn_weights.activation(x.to(ffn_weights.w_up.dtype)).float()  # (N, h)
    mean = calib.stats.mean if config.representatives == "mean" else torch.zeros(ffn_weights.d_ff)
    plan = plan_experts(
        ffn_weights, config.num_experts, config.method, sample_a=a, mean=calib.stats.mean,
        shared_fraction=config.shared_fraction, seed=config.seed + calib.index,
    )
    experts = ExpertWeights.from_ffn(ffn_weights, plan.perm, config.num_experts)
    n, s = config.num_experts, experts.expert_size
    reps = mean[plan.perm].reshape(n, s).to(experts.w_out.dtype)
    targets = expert_targets(experts, reps, x.to(experts.w_in.dtype), config.router_target).float()  # (N, E)
    ns = plan.num_shared
    router, recall = None, None
    if config.selection == "router" and config.top_k < n:
        routed = n - ns
        ks = [config.top_k - ns] + [max(1, min(routed, round(f * routed))) for f in config.router_k_fractions]
        fit = fit_router(
            x, targets[:, ns:], ks, hidden=config.router_hidden,
            epochs=config.router_epochs, seed=config.seed + calib.index,
        )
        router, recall = fit.router.to(experts.w_in.dtype), fit.recall
    if config.static_ranking == "random":
        importance = torch.rand(n, generator=torch.Generator().manual_seed(config.seed + calib.index))
    else:
        residual = targets if config.router_target == "residual" else expert_targets(experts, reps, x, "residual")
        importance = residual.float().mean(0)
    importance[:ns] = float("inf")
    moe = MoEFFN(
        experts=experts, representatives=reps, b_out=ffn_weights.b_down, router=router,
        top_k=config.top_k, num_shared=ns, importance=importance,
        selection=config.selection if (router is not None or config.selection != "router") else "all",
        tau=config.tau, kernel=config.kernel,
    )
    report = LayerReport(
        index=calib.index, name=calib.name, router_recall=recall, num_shared=ns,
        mean_abs_centred=float((a - calib.stats.mean).abs().mean()), seconds=time.perf_counter() - t0,
    )
    return moe, report


def convert(
    loaded: LoadedModel,
    calibration: list[TokenBatch],
    config: ConvertConfig,
    *,
    keep_calibration: bool = False,
    progress: bool = False,
) -> ConvertedModel:
    """Convert every FFN of `loaded.model` in place into an MoE FFN."""
    spec = loaded.spec
    blocks = find_blocks(loaded.model, spec)
    d_ff = extract_ffn(blocks[0][1], spec).d_ff
    config.validate(d_ff)
    _check_calibration(calibration, config)
    result = ConvertedModel(loaded=loaded, config=config, base_identity=loaded.identity())
    bar = tqdm(total=len(blocks), desc="converting", disable=not progress)
    t0 = time.perf_counter()

    def on_block(i: int, name: str, block: nn.Module, calib: LayerCalibration) -> None:
        moe, report = build_moe_layer(extract_ffn(block, spec), calib, config)
        swap_ffn(block, spec, moe)
        result.layers.append(report)
        if not keep_calibration:
            calib.sample_x = calib.sample_x[:0]
        bar.set_postfix_str(f"{name} recall={report.router_recall if report.router_recall is not None else '-'}")
        bar.update(1)

    try:
        result.calibrations = calibrate_blockwise(
            loaded.model, spec, calibration, sample_size=config.sample_size, eps=config.eps,
            on_block=on_block, sequential=config.sequential, keep=True, seed=config.seed,
        )
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    log.info("converted %d layers in %.1f s", len(result.layers), result.seconds)
    return result


def refit_routers(converted: ConvertedModel, top_ks: list[int] | None = None) -> list[float]:
    """Re-fit every layer's router on the kept calibration samples (after representatives
    changed, or for other k). Needs `convert(..., keep_calibration=True)`. Returns recalls."""
    recalls = []
    config = converted.config
    for m, calib in zip(moe_layers(converted.model), converted.calibrations, strict=True):
        if calib.sample_x.shape[0] == 0:
            raise InvalidArgumentError("refit_routers needs the calibration samples: convert with keep_calibration=True")
        x = calib.sample_x.to(m.w_in.dtype)
        targets = expert_targets(m.expert_weights, m.representatives, x, config.router_target).float()
        ks = [k - m.num_shared for k in (top_ks or [m.top_k])]
        fit = fit_router(
            x.float(), targets[:, m.num_shared :], ks, hidden=config.router_hidden,
            epochs=config.router_epochs, seed=config.seed + calib.index,
        )
        m.router = fit.router.to(m.w_in.dtype)
        recalls.append(fit.recall)
    return recalls


def set_representatives(model: nn.Module, kind: str) -> None:
    """Switch every layer's representatives to zeros (MoEfication) — static vectors follow."""
    if kind != "zero":
        raise InvalidArgumentError(f"set_representatives supports 'zero' only, got {kind!r}")
    for m in moe_layers(model):
        with torch.no_grad():
            m.representatives.zero_()
        m.refresh_static()
