"""Conversion end to end on tiny random models: exactness, static embeddings, oracle, dynamic k,
search vs apply, budgets and FLOPs, and clear errors for bad input. (Plans saved, loaded and
re-applied: tests/test_plan.py.)"""

from __future__ import annotations

import pytest
import torch

from moefy.conversion import (
    apply,
    configure,
    ffn_flops_fraction,
    layer_shape,
    moe_layers,
    search,
    top_k_for_budget,
)
from moefy.errors import CalibrationError, CheckpointError, InvalidArgumentError, MoefyError
from moefy.ffn import extract_ffn
from moefy.flops import FFNShape, dense_ffn_flops, k_for_budget, moe_ffn_flops
from moefy.moe_model import MoEModel
from moefy.settings import RuntimeConfig
from moefy.specs import find_blocks
from tests.analysis_fixtures import convert_tiny, loaded_tiny, random_batches, tiny_settings
from tests.tiny_models import model_output, tiny_inputs

FAMILIES = ["llama", "bert", "gpt2", "phi3", "opt", "bloom", "gemma2"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_all_experts_reproduce_dense(model_type: str) -> None:
    loaded = loaded_tiny(model_type)
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    moe = convert_tiny(loaded, top_k=8, method="kmeans")
    assert isinstance(moe, MoEModel) and moe.model is loaded.model and moe.loaded is loaded
    assert len(moe_layers(loaded.model)) == len(find_blocks(loaded.model, loaded.spec)) == len(moe.plan.layers)
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)
    configure(loaded.model, top_k=2, selection="all")  # 'all' ignores k
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_runtime_with_every_expert_is_dense_after_a_sparse_search(model_type: str) -> None:
    """Searched for k=4 (routers trained), run with k = all experts: the dense model again, through
    both the high-level (MoEModel.configure) and the low-level (apply with a RuntimeConfig) path."""
    loaded = loaded_tiny(model_type)
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    moe = convert_tiny(loaded, shared_fraction=0.25)
    sparse = model_output(loaded.model, inputs)
    assert not torch.allclose(sparse, dense, atol=1e-4)
    moe.configure(top_k=8)
    assert moe.runtime.top_k == 8 and all(m.top_k == 8 for m in moe_layers(loaded.model))
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)
    apply(loaded, moe.plan, RuntimeConfig(kernel="reference"))  # back to the k the routers were trained for
    torch.testing.assert_close(model_output(loaded.model, inputs), sparse)


@pytest.mark.parametrize("method", ["kmeans", "coactivation", "random", "contiguous"])
@pytest.mark.parametrize("representatives", ["mean", "zero"])
def test_unselected_experts_contribute_their_representative(method: str, representatives: str) -> None:
    """MoE output == dense FFN with every unselected neuron's activation replaced by r_j."""
    loaded = loaded_tiny("llama")
    block = find_blocks(loaded.model, loaded.spec)[0][1]
    ffn = extract_ffn(block, loaded.spec)
    ffn = type(ffn)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ffn.__dict__.items()})
    convert_tiny(loaded, method=method, representatives=representatives, selection="oracle", shared_fraction=0.25)
    moe = moe_layers(loaded.model)[0]
    x = torch.randn(10, moe.d_model)
    idx = moe.select(x)  # (T, K)
    assert (idx[:, :2] == torch.tensor([0, 1])).all()  # 2 shared experts always selected
    assert all(len(set(row.tolist())) == row.numel() for row in idx)
    # brute force in the original neuron order
    perm = _recover_perm(ffn, moe)
    a = ffn.activation(x)
    r = torch.empty(ffn.d_ff)
    r[perm] = moe.representatives.reshape(-1)
    keep = torch.zeros(10, ffn.d_ff, dtype=torch.bool)
    for t in range(10):
        for e in idx[t].tolist():
            keep[t, perm[e * moe.expert_size : (e + 1) * moe.expert_size]] = True
    expected = ffn.output(torch.where(keep, a, r.expand_as(a)))
    torch.testing.assert_close(moe(x), expected, rtol=1e-4, atol=1e-5)
    if representatives == "zero":
        assert moe.representatives.abs().max() == 0


def _recover_perm(ffn, moe) -> torch.Tensor:
    """Which original neuron sits at each expert-major position (match up-projection rows)."""
    rows = moe.w_in[:, moe.expert_size :].reshape(-1, moe.d_model)  # up rows, expert-major
    dist = torch.cdist(rows, ffn.w_up)
    return dist.argmin(1)


def test_plan_permutation_is_the_expert_layout() -> None:
    """The plan's perm is exactly the neuron order of the expert-major weights apply builds."""
    loaded = loaded_tiny("llama")
    ffn = extract_ffn(find_blocks(loaded.model, loaded.spec)[0][1], loaded.spec)
    w_up = ffn.w_up.clone()
    moe = convert_tiny(loaded, shared_fraction=0.25)
    lp, m = moe.plan.layers[0], moe_layers(loaded.model)[0]
    assert torch.equal(torch.sort(lp.perm).values, torch.arange(ffn.d_ff))
    torch.testing.assert_close(m.w_in[:, m.expert_size :].reshape(-1, m.d_model), w_up[lp.perm], rtol=0, atol=0)
    torch.testing.assert_close(m.representatives, lp.representatives, rtol=0, atol=0)
    assert lp.num_shared == m.num_shared == 2 and lp.top_k == m.top_k == 4
    assert torch.isinf(lp.importance[:2]).all() and torch.isfinite(lp.importance[2:]).all()


def test_oracle_selects_largest_residual_norms() -> None:
    loaded = loaded_tiny("llama")
    convert_tiny(loaded, selection="oracle")
    moe = moe_layers(loaded.model)[0]
    x = torch.randn(6, moe.d_model)
    w = moe.expert_weights
    norms = torch.stack(
        [torch.stack([((w.expert_activation(x[t : t + 1], e) - moe.representatives[e]) @ moe.w_out[e]).norm()
                      for e in range(moe.num_experts)]) for t in range(6)]
    )
    torch.testing.assert_close(moe.oracle_scores(x), norms, rtol=1e-4, atol=1e-6)
    chosen = moe.select(x).sort(1).values
    torch.testing.assert_close(chosen, torch.topk(norms, 4, dim=1).indices.sort(1).values)


def test_dynamic_k_keeps_fewer_experts() -> None:
    loaded = loaded_tiny("llama")
    convert_tiny(loaded, selection="oracle", top_k=6)
    moe = moe_layers(loaded.model)[0]
    x = torch.randn(32, moe.d_model)
    moe.configure(tau=1.0)
    assert (moe.select(x) >= 0).all()  # τ = 1 needs the whole capped prefix
    moe.configure(tau=0.3)
    idx = moe.select(x)
    assert ((idx >= 0).sum(1) >= 1).all() and (idx < 0).any()
    moe.reset_counters()
    moe(x)
    assert 1 <= moe.mean_selected < 6


def test_runtime_tau_reaches_every_layer_and_lowers_measured_flops() -> None:
    loaded = loaded_tiny("llama")
    moe = convert_tiny(loaded, top_k=6)
    inputs = tiny_inputs(loaded.model, batch=4, seq=16)
    model_output(loaded.model, inputs)
    fixed = ffn_flops_fraction(loaded.model)
    moe.configure(tau=0.3)
    assert moe.runtime.tau == 0.3 and all(m.tau == 0.3 and m.top_k == 6 for m in moe_layers(loaded.model))
    for m in moe_layers(loaded.model):
        m.reset_counters()
    model_output(loaded.model, inputs)
    assert all(1 <= m.mean_selected < 6 for m in moe_layers(loaded.model))
    assert ffn_flops_fraction(loaded.model) < fixed
    moe.configure(tau=None)
    assert all(m.tau is None for m in moe_layers(loaded.model))


def test_search_returns_a_plan_and_apply_swaps_once() -> None:
    """search with sequential=False leaves the model dense; apply swaps every FFN; applying again
    only changes the runtime (the same MoE modules stay in place)."""
    loaded = loaded_tiny("llama")
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    config, runtime = tiny_settings()
    plan = search(loaded, random_batches(32, 48), config)
    assert moe_layers(loaded.model) == []
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=0, atol=0)
    assert plan.config == config and len(plan.layers) == 2 and [lp.index for lp in plan.layers] == [0, 1]
    assert all(lp.top_k == 4 and lp.router is not None and 0.0 <= lp.router_recall <= 1.0 for lp in plan.layers)
    apply(loaded, plan, runtime)
    layers = moe_layers(loaded.model)
    assert len(layers) == 2 and plan.runtime == runtime
    sparse = model_output(loaded.model, inputs)
    apply(loaded, plan, runtime.replace(top_k=8))
    assert [id(m) for m in moe_layers(loaded.model)] == [id(m) for m in layers]
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)
    apply(loaded, plan, runtime)
    torch.testing.assert_close(model_output(loaded.model, inputs), sparse)


def test_sequential_search_converts_as_it_goes() -> None:
    """With sequential=True the first block sees the same inputs as without, so its plan is the
    same; the model is converted when search returns."""
    a, b = loaded_tiny("llama"), loaded_tiny("llama")
    config, _ = tiny_settings()
    plan_seq = search(a, random_batches(32, 48), config.replace(sequential=True))
    plan_par = search(b, random_batches(32, 48), config)
    assert len(moe_layers(a.model)) == 2 and moe_layers(b.model) == []
    assert torch.equal(plan_seq.layers[0].perm, plan_par.layers[0].perm)
    torch.testing.assert_close(plan_seq.layers[0].representatives, plan_par.layers[0].representatives)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(top_k=9), "--top-k 9"),
        (dict(num_experts=7), "--experts 7 does not divide the FFN width 128"),
        (dict(num_experts=256, top_k=2), "does not divide the FFN width 128"),
        (dict(eps=(0.1, 0.0)), "eps"),
        (dict(method="metis"), "--method 'metis'.*kmeans"),
        (dict(representatives="median"), "mean, zero"),
        (dict(budget=0.5, top_k=4), "not both"),
        (dict(budget=1.5), "--budget 1.5"),
        (dict(budget=0.01), "--budget 0.01 is infeasible"),
        (dict(shared_fraction=0.5), "shared experts, not fewer than --top-k 4"),
        (dict(router_epochs=0), "--router-epochs"),
        (dict(tau=1.5), "--tau 1.5"),
        (dict(selection="best"), "--selection 'best'.*router, oracle, static, random, all"),
        (dict(kernel="cuda"), "--kernel 'cuda'"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs: dict, match: str) -> None:
    loaded = loaded_tiny("llama")
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    with pytest.raises(InvalidArgumentError, match=match):
        convert_tiny(loaded, **kwargs)
    assert moe_layers(loaded.model) == []  # nothing converted
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=0, atol=0)


def test_too_few_calibration_tokens_says_how_many() -> None:
    with pytest.raises(CalibrationError, match=r"got 96, need at least 1024"):
        convert_tiny(loaded_tiny("llama"), random_batches(n_seq=2, seq_len=48))


def test_nan_activation_names_the_layer() -> None:
    loaded = loaded_tiny("llama")
    with torch.no_grad():
        find_blocks(loaded.model, loaded.spec)[1][1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"layers\.1"):
        convert_tiny(loaded)


def test_runtime_without_router_needs_another_selection() -> None:
    """Planned with every expert (no router trained): a smaller runtime k must pick a selection."""
    loaded = loaded_tiny("llama")
    moe = convert_tiny(loaded, top_k=8)
    assert all(lp.router is None for lp in moe.plan.layers)
    with pytest.raises(InvalidArgumentError, match="has no router"):
        moe.configure(top_k=4)
    moe.configure(top_k=4, selection="oracle")
    assert all(m.top_k == 4 and m.selection == "oracle" for m in moe_layers(loaded.model))


def test_flops_hand_computed() -> None:
    shape = FFNShape(d_model=4, d_ff=8, gated=True)
    assert dense_ffn_flops(shape) == 3 * 2 * 4 * 8 + 8  # three projections + the gate product
    # k=2 of n=4 (S=2): half the core, plus k+1 static-embedding adds of width d
    assert moe_ffn_flops(shape, 4, 2) == 100 + 4 * 3
    # without static embeddings: (n-k) products r_e W_e (2·S·d each) and their sum (d each)
    assert moe_ffn_flops(shape, 4, 2, static_embeddings=False) == 100 + 2 * (2 * 2 * 4) + 2 * 4
    assert moe_ffn_flops(shape, 4, 4, router_flops=10) == 200 + 10 + 4 * 5
    assert k_for_budget(shape, 4, 0.6) == 2  # 112 <= 120 < 166
    plain = FFNShape(d_model=4, d_ff=8, gated=False, bias_in=True, bias_out=True)
    assert dense_ffn_flops(plain) == 2 * 2 * 4 * 8 + 8 + 4


def test_top_k_for_budget_hand_computed() -> None:
    shape = FFNShape(d_model=4, d_ff=8, gated=True)  # dense 200; k of 4: 50k + 4(k+1) + router
    assert top_k_for_budget(shape, 4, 0, 0, 0.6) == 2  # 112 <= 120 < 166
    assert top_k_for_budget(shape, 4, 0, 10, 0.6) == 1  # with a 10-FLOP router k=2 costs 122 > 120
    assert top_k_for_budget(shape, 4, 1, 0, 0.6) == 2  # one shared + one routed: 112
    assert top_k_for_budget(shape, 4, 0, 0, 1.0) == 3  # 166 <= 200 < 220 (k=4: dense + static adds)
    with pytest.raises(InvalidArgumentError, match=r"--budget 0.5 is infeasible.*0\.560"):
        top_k_for_budget(shape, 4, 1, 0, 0.5)  # one shared + one routed expert already cost 112/200


def test_budget_sets_the_planned_k() -> None:
    """budget: the largest k whose FLOPs (router included) fit, and the routers are trained for it;
    a runtime budget re-derives k on the converted model."""
    loaded = loaded_tiny("llama")
    moe = convert_tiny(loaded, budget=0.75, top_k=None, router_hidden=0)
    m = moe_layers(loaded.model)[0]
    shape, router = layer_shape(m), m.router.flops_per_token()
    k = moe.plan.layers[0].top_k
    dense = dense_ffn_flops(shape)
    assert moe_ffn_flops(shape, 8, k, router) <= 0.75 * dense < moe_ffn_flops(shape, 8, k + 1, router)
    assert all(lp.top_k == k for lp in moe.plan.layers) and all(x.top_k == k for x in moe_layers(loaded.model))
    assert ffn_flops_fraction(loaded.model, measured=False) <= 0.75
    moe.configure(budget=0.5)
    k_half = m.top_k
    assert k_half < k and moe_ffn_flops(shape, 8, k_half, router) <= 0.5 * dense
    assert ffn_flops_fraction(loaded.model, measured=False) <= 0.5


def test_flops_fraction_counts_router_and_measured_k() -> None:
    loaded = loaded_tiny("llama")
    convert_tiny(loaded, selection="router")
    fraction_half = ffn_flops_fraction(loaded.model, measured=False)
    configure(loaded.model, top_k=8)
    assert ffn_flops_fraction(loaded.model, measured=False) == 1.0  # every expert: the dense path, no router
    configure(loaded.model, top_k=4, selection="all")
    assert ffn_flops_fraction(loaded.model, measured=False) == 1.0
    configure(loaded.model, top_k=4, selection="oracle")
    assert ffn_flops_fraction(loaded.model) == 1.0  # the oracle computes everything
    assert 0.5 < fraction_half < 1.0


def test_configure_needs_a_converted_model() -> None:
    with pytest.raises(InvalidArgumentError, match="no MoE layers"):
        configure(loaded_tiny("llama").model, top_k=2)


def test_errors_share_one_hierarchy() -> None:
    assert issubclass(CalibrationError, MoefyError) and issubclass(CheckpointError, MoefyError)
    assert issubclass(InvalidArgumentError, MoefyError) and issubclass(InvalidArgumentError, ValueError)
