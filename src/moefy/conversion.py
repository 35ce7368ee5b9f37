"""Generalized MoEfication of a whole model, in two stages (docs/DESIGN.md):

    search(loaded, calibration, config) -> ModelPlan   calibrate block by block, partition each FFN's
                                                       neurons into experts, representatives, router, k
    apply(loaded, plan, runtime)        -> model       swap each FFN for an `MoEFFN` built from the
                                                       base weights and the plan

`convert()` is the two in a row and returns an `MoEModel`. With `config.sequential` (default) search
applies each block as soon as it is planned, so block i+1 is calibrated — and its router trained —
on the inputs it will really see in the converted model; what search returns is still the plan.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moefy.calibrate import LayerCalibration, WeightSource, calibrate_blockwise
from moefy.distributed import DataParallel
from moefy.errors import CalibrationError, CheckpointError, InvalidArgumentError
from moefy.experts import plan_experts
from moefy.ffn import FFNWeights, extract_ffn, swap_ffn
from moefy.flops import FFNShape, compensation_flops, dense_ffn_flops, k_for_budget, moe_ffn_flops
from moefy.kernels import ExpertWeights
from moefy.kernels.dispatch import pinned_centred_mode
from moefy.models import LoadedModel
from moefy.moe_ffn import MoEFFN
from moefy.plan import BaseIdentity, LayerPlan, ModelPlan, ffn_fingerprint, ffn_sha256
from moefy.routers import ExpertRouter, expert_targets, fit_router, router_flops_per_token
from moefy.search_checkpoint import Resumed, SearchCheckpoint, search_key
from moefy.settings import ConvertConfig, RuntimeConfig
from moefy.specs import find_blocks
from moefy.text import TokenBatch

log = logging.getLogger(__name__)


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def configure(model: nn.Module, **settings: object) -> None:
    """Set top_k / selection / tau on every MoE layer of a model (see `MoEFFN.configure`); the
    low-level twin of `MoEModel.configure`, for code that holds only the HF model."""
    layers = moe_layers(model)
    if not layers:
        raise InvalidArgumentError("the model has no MoE layers; convert it first")
    for m in layers:
        m.configure(**settings)  # type: ignore[arg-type]


def block_moe(block: nn.Module) -> MoEFFN | None:
    return next((m for m in block.modules() if isinstance(m, MoEFFN)), None)


# ---- FLOPs and the budget -> k rule (the one place it lives) ------------------------------------
def ffn_shape(ffn: FFNWeights) -> FFNShape:
    return FFNShape(ffn.d_model, ffn.d_ff, ffn.gated, ffn.b_up is not None, ffn.b_down is not None)


def layer_shape(m: MoEFFN) -> FFNShape:
    return FFNShape(m.d_model, m.num_experts * m.expert_size, m.gated, m.b_in is not None, m.b_out is not None)


def top_k_for_budget(shape: FFNShape, num_experts: int, num_shared: int, router_flops: int, budget: float) -> int:
    """The largest k (shared experts included, at least one routed expert) whose FFN FLOPs, router
    included, stay within `budget` × dense. An infeasible budget is an error, not a silent floor."""
    min_k = min(num_experts, num_shared + 1)
    floor = moe_ffn_flops(shape, num_experts, min_k, router_flops) / dense_ffn_flops(shape)
    if budget < floor - 1e-9:
        raise InvalidArgumentError(
            f"--budget {budget} is infeasible: the router, the {num_shared} shared experts and one routed expert "
            f"already cost {floor:.3f} of the dense FFN; use --budget {floor:.2f} or more, or fewer --shared experts"
        )
    return k_for_budget(shape, num_experts, budget, router_flops, min_k=min_k)


def planned_top_k(shape: FFNShape, config: ConvertConfig) -> int:
    """The k the routers are trained for: `config.top_k`, or the k of `config.budget`."""
    if config.top_k is not None:
        return config.top_k
    budget = config.effective_budget
    assert budget is not None
    ns = config.num_shared
    router = router_flops_per_token(shape.d_model, config.num_experts - ns, config.router_hidden)
    if config.distill and config.distill_steps > 0:  # learned by distillation, paid per token
        router += compensation_flops(shape.d_model, config.compensation, config.compensation_rank)
    return top_k_for_budget(shape, config.num_experts, ns, router, budget)


def check_config_for(loaded: LoadedModel, config: ConvertConfig) -> int:
    """The checks of `config` that need the model (expert count divides the FFN width, the budget
    is feasible, a routed expert is left); run before any calibration. Returns the k to train for."""
    ffn = extract_ffn(find_blocks(loaded.model, loaded.spec)[0][1], loaded.spec)
    config.validate_for(ffn.d_ff)
    top_k = planned_top_k(ffn_shape(ffn), config)
    if top_k <= config.num_shared < config.num_experts:
        raise InvalidArgumentError(f"k={top_k} leaves no routed expert beside {config.num_shared} shared ones")
    return top_k


def router_flops(m: MoEFFN) -> int:
    if m.selection == "router" and m.router is not None and not m.runs_dense:
        return m.router.flops_per_token()
    return 0


def layer_flops(m: MoEFFN, measured: bool = True) -> tuple[float, float, float]:
    """(dense, MoE, MoE without static embeddings) FLOPs per token of one layer as it runs now:
    a layer on its dense path (every expert) costs the dense FFN; oracle selection costs the dense
    FFN (it evaluates every expert to rank them); otherwise router + k of n experts + static adds
    + learned compensation,
    k the mean really computed (dynamic k) when `measured`, else top_k."""
    shape = layer_shape(m)
    dense = float(dense_ffn_flops(shape))
    if m.runs_dense or m.selection == "oracle":
        return dense, dense, dense
    k = m.mean_selected if (measured and m.tokens_seen) else float(m.top_k)
    r = router_flops(m) + m.compensation_flops()  # fixed per-token costs beside the experts
    return dense, moe_ffn_flops(shape, m.num_experts, k, r), moe_ffn_flops(shape, m.num_experts, k, r, static_embeddings=False)


def ffn_flops_fraction(model: nn.Module, measured: bool = True) -> float:
    """MoE FFN FLOPs / dense FFN FLOPs over all converted layers (router included; see `layer_flops`)."""
    totals = [layer_flops(m, measured) for m in moe_layers(model)]
    dense = sum(t[0] for t in totals)
    return sum(t[1] for t in totals) / dense if dense else 1.0


# ---- search ---------------------------------------------------------------------------------------
def base_identity(loaded: LoadedModel) -> BaseIdentity:
    """The dense model's identity, read before any FFN is converted; a folder is recorded by its
    absolute path."""
    blocks = find_blocks(loaded.model, loaded.spec)
    if any(block_moe(b) is not None for _, b in blocks):
        raise InvalidArgumentError("the model is already converted; give a dense base model")
    ffns = [extract_ffn(b, loaded.spec) for _, b in blocks]
    name = str(Path(loaded.name).resolve()) if loaded.name and Path(loaded.name).is_dir() else loaded.name
    return BaseIdentity(
        name=name, model_type=str(loaded.model.config.model_type), num_layers=len(ffns),
        d_model=ffns[0].d_model, d_ff=ffns[0].d_ff, ffn_sha256=ffn_sha256(ffns), ffn_fingerprint=ffn_fingerprint(ffns),
    )


def _check_calibration(batches: list[TokenBatch], config: ConvertConfig) -> None:
    tokens = sum(b.num_tokens for b in batches)
    needed = config.min_calibration_tokens()
    if tokens < needed:
        raise CalibrationError(
            f"too few calibration tokens: got {tokens}, need at least {needed} for {config.num_experts} experts"
        )


def plan_layer(ffn: FFNWeights, calib: LayerCalibration, config: ConvertConfig, top_k: int) -> LayerPlan:
    """Search one FFN: experts (neuron permutation, shared ones first), representatives, static
    importance and a router trained for `top_k`, from the layer's calibration."""
    t0 = time.perf_counter()
    x = calib.sample_x  # (N, D)
    a = ffn.activation(x.to(ffn.w_up.dtype)).float()  # (N, h)
    partition = plan_experts(
        ffn, config.num_experts, config.method, sample_a=a, mean=calib.stats.mean,
        shared_fraction=config.shared_fraction, seed=config.seed + calib.index,
    )
    n, ns = config.num_experts, partition.num_shared
    experts = ExpertWeights.from_ffn(ffn, partition.perm, n)
    mean = calib.stats.mean if config.representatives == "mean" else torch.zeros(ffn.d_ff)
    reps = mean[partition.perm].reshape(n, experts.expert_size).float()  # (E, S)
    residual = expert_targets(experts, reps.to(experts.w_out.dtype), x.to(experts.w_in.dtype), "residual").float()
    targets = residual if config.router_target == "residual" else expert_targets(
        experts, reps.to(experts.w_out.dtype), x.to(experts.w_in.dtype), config.router_target
    ).float()  # (N, E)
    router, recall = None, None
    if top_k < n:
        routed = n - ns
        ks = [top_k - ns] + [max(1, min(routed, round(f * routed))) for f in config.router_k_fractions]
        fit = fit_router(
            x.float(), targets[:, ns:], ks, hidden=config.router_hidden,
            epochs=config.router_epochs, seed=config.seed + calib.index,
        )
        router, recall = fit.router, fit.recall
    if config.static_ranking == "random":
        importance = torch.rand(n, generator=torch.Generator().manual_seed(config.seed + calib.index))
    else:
        importance = residual.mean(0)
    importance[:ns] = float("inf")
    return LayerPlan(
        index=calib.index, block=calib.name, num_experts=n, num_shared=ns, top_k=top_k, perm=partition.perm,
        representatives=reps, importance=importance, router=router, router_recall=recall,
        mean_abs_centred=float((a - calib.stats.mean).abs().mean()), seconds=time.perf_counter() - t0,
    )


def search(
    loaded: LoadedModel,
    calibration: list[TokenBatch],
    config: ConvertConfig,
    *,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
    base: BaseIdentity | None = None,
    weights: WeightSource | None = None,
    parallel: DataParallel | None = None,
) -> ModelPlan:
    """Calibrate block by block and plan every FFN. With `config.sequential` each block is applied
    (with the plan's own runtime) as soon as it is planned; otherwise the model is left dense.
    `checkpoint_dir`: every finished block is saved there and a rerun resumes after the last one
    (`moefy.search_checkpoint`). `base`, `weights`: the base identity and a `WeightSource` for a
    model whose blocks are loaded one at a time (`moefy.streaming`; default: the model in memory).
    `parallel`: data-parallel calibration under torchrun (`moefy.distributed`), every process
    planning the same layers; not with a checkpoint."""
    spec = loaded.spec
    blocks = find_blocks(loaded.model, spec)
    top_k = check_config_for(loaded, config)
    _check_calibration(calibration, config)
    base = base or base_identity(loaded)
    if parallel is not None and checkpoint_dir is not None:
        raise InvalidArgumentError("a data-parallel search does not write a search checkpoint; give one or the other")
    checkpoint, resumed = _open_checkpoint(checkpoint_dir, loaded, base, config, calibration)
    layers: list[LayerPlan] = [] if resumed is None else resumed.layers
    _restore_blocks(loaded, blocks, layers, config)
    bar = tqdm(total=len(blocks), initial=len(layers), desc="converting", unit="layer", disable=not progress)
    t0 = time.perf_counter() - (0.0 if resumed is None else resumed.seconds)

    def on_block(i: int, name: str, block: nn.Module, calib: LayerCalibration) -> None:
        ffn = extract_ffn(block, spec)
        lp = plan_layer(ffn, calib, config, top_k)
        layers.append(lp)
        if config.sequential:
            swap_ffn(block, spec, build_moe(ffn, lp, RuntimeConfig()))
        calib.sample_x = calib.sample_x[:0]  # statistics are not kept after the layer is planned
        recall = "-" if lp.router_recall is None else f"{lp.router_recall:.3f}"
        bar.set_postfix_str(f"{name} k={lp.top_k}/{lp.num_experts} recall={recall}")
        bar.update(1)

    def on_outputs(i: int, hidden: list[torch.Tensor]) -> None:
        if checkpoint is not None:
            checkpoint.save_block(layers[i], hidden if i + 1 < len(blocks) else None, time.perf_counter() - t0)

    try:  # the converted blocks' outputs (the next block's inputs) must not depend on a timing
        with pinned_centred_mode():
            calibrate_blockwise(
                loaded.model, spec, calibration, sample_size=config.sample_size, eps=config.eps,
                on_block=on_block, sequential=config.sequential, keep=False, seed=config.seed, weights=weights,
                start=len(layers), hidden=None if resumed is None else resumed.hidden, on_outputs=on_outputs,
                parallel=parallel,
            )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log.info("searched %d layers in %.1f s", len(layers), seconds)
    return ModelPlan(base=base, config=config, layers=layers, seconds=seconds)


def _open_checkpoint(
    folder: str | Path | None, loaded: LoadedModel, base: BaseIdentity, config: ConvertConfig, calibration: list[TokenBatch]
) -> tuple[SearchCheckpoint | None, Resumed | None]:
    if folder is None:
        return None, None
    dtype = next(loaded.model.parameters()).dtype
    checkpoint = SearchCheckpoint(folder, search_key(base, config, calibration, dtype), base)
    return checkpoint, checkpoint.load()


def _restore_blocks(loaded: LoadedModel, blocks: list[tuple[str, nn.Module]], layers: list[LayerPlan], config: ConvertConfig) -> None:
    """The blocks a resumed search had finished: checked against the model, and (sequential search,
    model in memory) converted as the interrupted run had left them."""
    for lp, (name, block) in zip(layers, blocks, strict=False):
        if lp.block != name:
            raise CheckpointError(f"the search checkpoint's layer {lp.index} is block {lp.block!r}; the model's is {name!r}")
        if config.sequential and not any(p.is_meta for p in block.parameters()):  # streamed blocks stay unloaded
            swap_ffn(block, loaded.spec, build_moe(extract_ffn(block, loaded.spec), lp, RuntimeConfig()))


# ---- apply ----------------------------------------------------------------------------------------
def plan_compensation_flops(lp: LayerPlan) -> int:
    """FLOPs per token of a layer plan's learned compensation (see `MoEFFN.compensation_flops`)."""
    if lp.lowrank is not None:
        return compensation_flops(lp.lowrank[0].shape[1], lp.compensation is not None, lp.lowrank[0].shape[0])
    return 0 if lp.compensation is None else compensation_flops(lp.compensation.shape[0], True, 0)


def runtime_top_k(lp: LayerPlan, shape: FFNShape, runtime: RuntimeConfig) -> int:
    if runtime.top_k is not None:
        return runtime.top_k
    if runtime.budget is not None:
        flops = lp.router.flops_per_token() if (lp.router is not None and runtime.selection == "router") else 0
        flops += plan_compensation_flops(lp)
        return top_k_for_budget(shape, lp.num_experts, lp.num_shared, flops, runtime.budget)
    return lp.top_k


def _layer_settings(lp: LayerPlan, shape: FFNShape, runtime: RuntimeConfig) -> dict:
    k = runtime_top_k(lp, shape, runtime)
    if not max(1, lp.num_shared) <= k <= lp.num_experts:
        raise InvalidArgumentError(
            f"--top-k {k} must be between {max(1, lp.num_shared)} (the shared experts) and {lp.num_experts} (layer {lp.index})"
        )
    selection = runtime.selection
    if selection == "router" and lp.router is None:
        if k < lp.num_experts:
            raise InvalidArgumentError(
                f"layer {lp.index} has no router (it was planned with every expert selected); "
                "use --selection oracle/static/all or re-convert with a smaller --top-k"
            )
        selection = "all"
    return {"top_k": k, "selection": selection, "tau": runtime.tau if runtime.tau is not None else lp.tau,
            "zero_representatives": runtime.zero_representatives}


def build_moe(ffn: FFNWeights, lp: LayerPlan, runtime: RuntimeConfig) -> MoEFFN:
    """The MoE FFN of one dense FFN under a layer plan (expert-major weights in the base dtype)."""
    if ffn.d_ff != lp.perm.shape[0]:
        raise InvalidArgumentError(f"layer {lp.index}: the plan is for an FFN of width {lp.perm.shape[0]}, not {ffn.d_ff}")
    experts = ExpertWeights.from_ffn(ffn, lp.perm.to(ffn.w_up.device), lp.num_experts)
    dtype, device = experts.w_out.dtype, experts.w_out.device
    router = None
    if lp.router is not None:  # the module gets its own copy: the plan stays as searched (fp32, CPU)
        scorer = copy.deepcopy(lp.router).to(device=device, dtype=dtype)
        router = ExpertRouter(scorer, top_k=max(0, lp.top_k - lp.num_shared))
    lowrank = None if lp.lowrank is None else (lp.lowrank[0].to(device, dtype), lp.lowrank[1].to(device, dtype))
    moe = MoEFFN(
        experts=experts, representatives=lp.representatives.to(device, dtype), b_out=ffn.b_down, router=router,
        compensation=None if lp.compensation is None else lp.compensation.to(device, dtype), lowrank=lowrank,
        num_shared=lp.num_shared, importance=lp.importance.to(device), kernel=runtime.kernel, seed=lp.index,
        **_layer_settings(lp, ffn_shape(ffn), runtime),
    )
    moe.perm = lp.perm  # which plan layer built it (apply refuses to reconfigure it under another plan)
    return moe


def apply(loaded: LoadedModel, plan: ModelPlan, runtime: RuntimeConfig | None = None) -> nn.Module:
    """Swap every FFN of `loaded.model` for its MoE FFN (module swap, in place); a block already
    converted under this plan only takes the runtime settings. Returns the model."""
    runtime = runtime or plan.runtime
    blocks = find_blocks(loaded.model, loaded.spec)
    if len(blocks) != len(plan.layers):
        raise InvalidArgumentError(f"the plan has {len(plan.layers)} layers; the model has {len(blocks)}")
    # check every layer's settings (and that converted blocks belong to this plan) before any
    # change: a refused plan or runtime leaves the model as it was
    for (name, block), lp in zip(blocks, plan.layers, strict=True):
        if name != lp.block:
            raise InvalidArgumentError(f"layer {lp.index} of the plan is for block {lp.block!r}; the model's is {name!r}")
        existing = block_moe(block)
        if existing is None:
            if extract_ffn(block, loaded.spec).d_ff != lp.perm.shape[0]:
                raise InvalidArgumentError(f"layer {lp.index}: the plan is for an FFN of width {lp.perm.shape[0]}")
            continue
        if existing.perm is None or not torch.equal(existing.perm, lp.perm) or existing.num_shared != lp.num_shared:
            raise InvalidArgumentError(f"{name} was converted under another plan; apply this plan to a fresh base model")
        _layer_settings(lp, layer_shape(existing), runtime)
    for (_name, block), lp in zip(blocks, plan.layers, strict=True):  # then one layer at a time
        existing = block_moe(block)
        if existing is None:
            swap_ffn(block, loaded.spec, build_moe(extract_ffn(block, loaded.spec), lp, runtime))
        else:
            existing.kernel_name = runtime.kernel
            existing.configure(**_layer_settings(lp, layer_shape(existing), runtime))
    guard_save_pretrained(loaded.model)
    plan.runtime = runtime
    return loaded.model


def _refuse_save_pretrained(*_args: object, **_kwargs: object) -> None:
    raise InvalidArgumentError(
        "save_pretrained() cannot save a moefy model: transformers would reload its MoE FFNs as randomly "
        "initialised MLPs. Use MoEModel.save(DIR) (an adapter folder: the plan only) or MoEModel.export(DIR) "
        "(a standalone folder), then MoEModel.from_pretrained(...) to load it"
    )


def guard_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained` (and `push_to_hub`) raise a clear error on a converted model."""
    for attr in ("save_pretrained", "push_to_hub"):
        if hasattr(model, attr):
            object.__setattr__(model, attr, _refuse_save_pretrained)
