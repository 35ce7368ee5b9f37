"""Adaptive budgets: per-layer k under one global FFN FLOPs budget (issue 12, item 3).

Stage: search → **allocate** → distill → plan. A uniform k spends the budget equally on layers that
are not equally sensitive. After the search, each layer's sensitivity is measured end to end, on
calibration sequences: the KL divergence of the model's next-token distribution (encoders: 1 − cos
of the last hidden state) from the dense model's when that one layer runs at k and every other layer
at the uniform k (`layer_costs`). Assuming the per-layer increases add up, the allocation that
minimises the total under the budget is found by Lagrangian relaxation (`allocate`: each layer picks
argmin cost + λ·FLOPs, λ bisected to the budget; TEAL's greedy per-layer allocation solves the same
problem one step at a time). The budget is then re-checked with the same FLOPs rule the uniform k
uses (router and learned compensation included), so the budget asked for is the budget measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moefy.conversion import layer_shape, moe_layers
from moefy.distill import output_loss, teacher_targets
from moefy.flops import compensation_flops, dense_ffn_flops, moe_ffn_flops
from moefy.models import LoadedModel
from moefy.moe_ffn import MoEFFN
from moefy.plan import ModelPlan
from moefy.routers import router_flops_per_token
from moefy.settings import ConvertConfig
from moefy.text import TokenBatch

log = logging.getLogger(__name__)

ROUTED_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5)  # candidate routed-expert counts, × the uniform one
PROBE_SEQUENCES = 4  # calibration sequences the sensitivities are measured on


@dataclass
class Allocation:
    top_k: list[int]  # per layer
    uniform_k: int
    candidates: list[list[int]]
    costs: list[list[float]]  # per layer, per candidate: loss increase over the uniform model
    base_loss: float  # loss of the uniform model against the dense one
    budget: float
    flops_fraction: float  # of the allocation, by the budget rule
    seconds: float

    def summary(self) -> dict:
        return {
            "top_k": self.top_k, "uniform_k": self.uniform_k, "base_loss": round(self.base_loss, 5),
            "budget": self.budget, "flops_fraction": round(self.flops_fraction, 5), "seconds": round(self.seconds, 1),
            "candidates": self.candidates, "costs": [[round(c, 5) for c in row] for row in self.costs],
        }


def candidate_ks(uniform_k: int, num_experts: int, num_shared: int) -> list[int]:
    """k values tried per layer: the shared experts plus ROUTED_FACTORS × the uniform routed count,
    within [shared + 1, num_experts], sorted, distinct, the uniform k always among them."""
    routed = uniform_k - num_shared
    ks = {min(num_experts, max(num_shared + 1, num_shared + round(routed * f))) for f in ROUTED_FACTORS}
    return sorted(ks | {uniform_k})


def per_token_flops(m: MoEFFN, k: int, config: ConvertConfig) -> float:
    """A layer's FFN FLOPs per token at k, by the rule the uniform k is chosen with
    (`conversion.planned_top_k`): router + compensation the distillation will learn + k experts."""
    shape = layer_shape(m)
    fixed = router_flops_per_token(shape.d_model, m.num_experts - m.num_shared, config.router_hidden)
    if config.distill and config.distill_steps > 0:
        fixed += compensation_flops(shape.d_model, config.compensation, config.compensation_rank)
    return moe_ffn_flops(shape, m.num_experts, k, fixed)


def allocate(costs: Sequence[Sequence[float]], flops: Sequence[Sequence[float]], budget_flops: float) -> list[int]:
    """Indices (one per layer) into each layer's candidates minimising Σ cost under Σ flops ≤
    budget_flops: Lagrangian relaxation, λ bisected; the cheapest choice per layer if even that
    exceeds the budget. Ties in cost go to the cheaper candidate."""
    def pick(lam: float) -> list[int]:
        return [min(range(len(c)), key=lambda j: (c[j] + lam * f[j], f[j])) for c, f in zip(costs, flops, strict=True)]

    def total(choice: list[int]) -> float:
        return sum(f[j] for f, j in zip(flops, choice, strict=True))

    lo, hi = 0.0, 1.0
    if total(pick(lo)) <= budget_flops:
        return pick(lo)
    while total(pick(hi)) > budget_flops and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if total(pick(mid)) > budget_flops:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def _probe_rows(batches: Sequence[TokenBatch], n: int) -> tuple[Tensor, Tensor]:
    """n sequences spread evenly over the calibration batches (so every domain of a mix is probed)."""
    ids = torch.cat([b.input_ids for b in batches])
    mask = torch.cat([b.attention_mask for b in batches])
    rows = torch.linspace(0, ids.shape[0] - 1, min(n, ids.shape[0])).round().long().unique()
    return ids[rows], mask[rows]


@torch.no_grad()
def _loss(loaded: LoadedModel, ids: Tensor, mask: Tensor, targets: dict[int, tuple[Tensor, Tensor]]) -> float:
    device = next(loaded.model.parameters()).device
    res = loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device))
    target = tuple(torch.stack([targets[r][j] for r in range(ids.shape[0])]).to(device) for j in range(2))
    return float(output_loss(loaded, res, target, mask.to(device)))  # type: ignore[arg-type]


def layer_costs(
    loaded: LoadedModel, layers: Sequence[MoEFFN], candidates: Sequence[Sequence[int]], ids: Tensor, mask: Tensor,
    *, progress: bool = False,
) -> tuple[float, list[list[float]]]:
    """(loss of the model as configured, per layer and candidate k: the loss with only that layer
    at k minus it). The loss is `distill.output_loss` against the dense model on ids/mask."""
    targets = teacher_targets(loaded, layers, ids, mask, list(range(ids.shape[0])))
    base = _loss(loaded, ids, mask, targets)
    costs: list[list[float]] = []
    bar = tqdm(total=sum(len(c) - 1 for c in candidates), desc="layer sensitivity", unit="run", disable=not progress)
    for m, ks in zip(layers, candidates, strict=True):
        k0, row = m.top_k, []
        for k in ks:
            if k == k0:
                row.append(0.0)
                continue
            m.configure(top_k=k)
            row.append(_loss(loaded, ids, mask, targets) - base)
            bar.update(1)
        m.configure(top_k=k0)
        m.reset_counters()
        costs.append(row)
    bar.close()
    return base, costs


def adapt_top_k(
    loaded: LoadedModel, plan: ModelPlan, batches: Sequence[TokenBatch], config: ConvertConfig, *, progress: bool = False
) -> Allocation:
    """Choose each layer's k under the conversion's budget (the model must have the plan applied
    with its uniform k); updates the plan's layers and the model's MoE layers in place."""
    budget = config.effective_budget
    if budget is None:
        raise ValueError("adaptive k needs a budget (the conversion was given an explicit --top-k)")
    t0 = time.perf_counter()
    layers = moe_layers(loaded.model)
    if len(layers) != len(plan.layers):
        raise ValueError(f"the model has {len(layers)} MoE layers, the plan {len(plan.layers)}")
    uniform = layers[0].top_k
    candidates = [candidate_ks(m.top_k, m.num_experts, m.num_shared) for m in layers]
    ids, mask = _probe_rows(batches, PROBE_SEQUENCES)
    base, costs = layer_costs(loaded, layers, candidates, ids, mask, progress=progress)
    flops = [[per_token_flops(m, k, config) for k in ks] for m, ks in zip(layers, candidates, strict=True)]
    dense = sum(dense_ffn_flops(layer_shape(m)) for m in layers)
    choice = allocate(costs, flops, budget * dense)
    top_k = [ks[j] for ks, j in zip(candidates, choice, strict=True)]
    for m, lp, k in zip(layers, plan.layers, top_k, strict=True):
        m.configure(top_k=k)
        lp.top_k = k
    fraction = sum(f[j] for f, j in zip(flops, choice, strict=True)) / dense
    alloc = Allocation(top_k, uniform, candidates, costs, base, budget, fraction, time.perf_counter() - t0)
    log.info("adaptive k: %s (uniform %d), FFN FLOPs %.3f of dense, %.0f s", top_k, uniform, fraction, alloc.seconds)
    return alloc
