"""Adaptive per-layer k (moefy.allocate): the allocation minimises the summed cost under the budget
(checked against brute force), keeps the budget by the same FLOPs rule as a uniform k, lands in
the saved plan, and an unchanged model gives an unchanged allocation."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from moefy.allocate import allocate, candidate_ks
from moefy.conversion import ffn_flops_fraction, moe_layers
from moefy.moe_model import MoEModel
from tests.analysis_fixtures import convert_tiny, loaded_tiny, random_batches
from tests.tiny_models import model_output, tiny_inputs


def _brute_force(costs, flops, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        f = sum(fl[j] for fl, j in zip(flops, choice, strict=True))
        if f > budget:
            continue
        c = sum(co[j] for co, j in zip(costs, choice, strict=True))
        if best is None or c < best[0] - 1e-12:
            best = (c, choice)
    return best


def test_allocation_by_hand() -> None:
    # layer 0 is sensitive (cutting it costs 1.0), layer 1 is not (0.01): the budget for one cut goes to layer 1
    costs = [[1.0, 0.0], [0.01, 0.0]]
    flops = [[1.0, 2.0], [1.0, 2.0]]
    assert allocate(costs, flops, 3.0) == [1, 0]
    assert allocate(costs, flops, 4.0) == [1, 1]  # enough for both at full k
    assert allocate(costs, flops, 2.0) == [0, 0]  # only the cheapest fits


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_on_convex_costs(seed: int) -> None:
    """Convex decreasing costs (what more experts give): the Lagrangian choice matches brute force
    whenever it spends the budget, and never exceeds it."""
    g = torch.Generator().manual_seed(seed)
    layers, ks = 4, 4
    costs, flops = [], []
    for _ in range(layers):
        steps = torch.rand(ks - 1, generator=g).sort(descending=True).values  # shrinking gains: convex
        c = torch.cat([steps.flip(0).cumsum(0).flip(0), torch.zeros(1)]).tolist()
        costs.append(c)
        flops.append([1.0 + j for j in range(ks)])
    for budget in (5.0, 8.0, 11.0):
        choice = allocate(costs, flops, budget)
        spent = sum(f[j] for f, j in zip(flops, choice, strict=True))
        assert spent <= budget
        best_cost, _ = _brute_force(costs, flops, budget)
        got = sum(c[j] for c, j in zip(costs, choice, strict=True))
        assert got <= best_cost + max(max(c) for c in costs)  # Lagrangian: within one step of the optimum
        if spent == budget:
            assert got == pytest.approx(best_cost)


def test_candidates_contain_the_uniform_k_and_stay_valid() -> None:
    for k, n, shared in [(4, 8, 0), (190, 256, 26), (2, 8, 1), (8, 8, 0)]:
        ks = candidate_ks(k, n, shared)
        assert k in ks and ks == sorted(set(ks))
        assert all(shared + 1 <= x <= n for x in ks)


def test_adaptive_k_keeps_the_budget_and_is_saved(tmp_path: Path) -> None:
    loaded = loaded_tiny("llama")
    inputs = tiny_inputs(loaded.model)
    budget = 0.6
    uniform = convert_tiny(loaded_tiny("llama"), budget=budget)
    moe = convert_tiny(loaded, budget=budget, adaptive_k=True)
    alloc = moe.plan.extra["allocation"]
    ks = [lp.top_k for lp in moe.plan.layers]
    assert ks == alloc["top_k"] == [m.top_k for m in moe_layers(moe.model)]
    assert alloc["uniform_k"] == uniform.plan.layers[0].top_k
    # the budget asked for is the budget measured, by the rule a uniform k is chosen with
    assert alloc["flops_fraction"] <= budget + 1e-9
    assert ffn_flops_fraction(moe.model, measured=False) == pytest.approx(alloc["flops_fraction"], abs=1e-5)
    assert ffn_flops_fraction(uniform.model, measured=False) <= budget
    expected = model_output(moe.model, inputs)
    back = MoEModel.from_pretrained(moe.save(tmp_path / "plan"), base=loaded_tiny("llama"))
    assert [lp.top_k for lp in back.plan.layers] == ks
    torch.testing.assert_close(model_output(back.model, inputs), expected, rtol=0, atol=0)


def test_adaptive_k_is_deterministic() -> None:
    a = convert_tiny(loaded_tiny("llama"), budget=0.6, adaptive_k=True).plan.extra["allocation"]
    b = convert_tiny(loaded_tiny("llama"), random_batches(32, 48), budget=0.6, adaptive_k=True).plan.extra["allocation"]
    assert a["top_k"] == b["top_k"] and a["costs"] == b["costs"]
