"""Neuron-level selection from the exact gate (moefy.neuron_selection) and its FLOPs (moefy.flops).

Properties: with every neuron kept each method reproduces the dense model for every family; the
installed module sits where the spec says the FFN is; thresholds and top-k keep the fraction
asked for; with no neuron kept the FFN is its representatives' output; FLOPs match a hand count.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights, extract_ffn, ffn_input_module, ffn_output_module
from moefy.flops import FFNShape, dense_ffn_flops, kept_fraction_for_budget, neuron_selection_flops
from moefy.neuron_selection import (
    GateEstimate,
    NeuronSelectionFFN,
    fit_gate_estimate,
    fit_gate_estimates,
    install_neuron_selection,
    neuron_selection_ffn,
    neuron_selection_flops_fraction,
)
from moefy.specs import ArchSpec, find_blocks, resolve_spec
from tests.tiny_models import TINY_CASES, case_id, model_output, tiny_inputs, tiny_model

METHODS = [("cats", "threshold"), ("cats", "top-k"), ("gate-estimate", "top-k"), ("gate-estimate", "threshold")]


def _ffn_inputs(model: nn.Module, spec: ArchSpec, inputs: dict[str, Tensor]) -> list[Tensor]:
    """Every block's FFN inputs x (N, D) during one forward."""
    blocks = find_blocks(model, spec)
    captured: list[list[Tensor]] = [[] for _ in blocks]

    def hook(i: int):
        return lambda _m, args: captured[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [ffn_input_module(b, spec).register_forward_pre_hook(hook(i)) for i, (_, b) in enumerate(blocks)]
    try:
        model_output(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c) for c in captured]


@pytest.fixture(scope="module", params=TINY_CASES, ids=case_id)
def tiny(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, ArchSpec, dict[str, Tensor], list[Tensor], Tensor]:
    """A tiny model, its spec, inputs, its FFN inputs on them and its dense output (read-only)."""
    model = tiny_model(*request.param)
    spec = resolve_spec(model)
    inputs = tiny_inputs(model, batch=2, seq=12)
    return model, spec, inputs, _ffn_inputs(model, spec, inputs), model_output(model, inputs)


@pytest.mark.parametrize(("method", "selection"), METHODS)
def test_every_neuron_kept_is_the_dense_model(tiny, method: str, selection: str) -> None:
    model, spec, inputs, samples, dense = tiny
    model = copy.deepcopy(model)
    layers = install_neuron_selection(model, spec, samples, method=method, selection=selection, kept_fraction=1.0)
    blocks = find_blocks(model, spec)
    assert len(layers) == len(blocks)
    for (_, block), layer in zip(blocks, layers, strict=True):
        assert ffn_output_module(block, spec) is layer  # installed by module swap where the spec says
    torch.testing.assert_close(model_output(model, inputs), dense)
    assert all(m.kept_fraction == 1.0 for m in layers)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_budget_one_keeps_every_cats_neuron(model_type: str) -> None:
    model = tiny_model(model_type)
    spec = resolve_spec(model)
    inputs = tiny_inputs(model)
    samples, dense = _ffn_inputs(model, spec, inputs), model_output(model, inputs)
    assert spec.gated == (model_type == "llama")
    layers = install_neuron_selection(model, spec, samples, method="cats", selection="top-k", budget=1.0)
    assert all(m.top_k == m.ffn.d_ff for m in layers)
    torch.testing.assert_close(model_output(model, inputs), dense)


def _layer0(model_type: str) -> tuple[FFNWeights, Tensor]:
    model = tiny_model(model_type)
    spec = resolve_spec(model)
    samples = _ffn_inputs(model, spec, tiny_inputs(model, batch=4, seq=16))
    return extract_ffn(find_blocks(model, spec)[0][1], spec), samples[0]


@pytest.mark.parametrize("method", ["cats", "gate-estimate"])
def test_threshold_keeps_the_calibrated_fraction_on_its_calibration_inputs(method: str) -> None:
    ffn, x = _layer0("llama")
    module = neuron_selection_ffn(ffn, x, method=method, selection="threshold", kept_fraction=0.3)
    module(x)
    assert module.kept_fraction == pytest.approx(0.3, abs=1 / x.shape[0])


def test_top_k_keeps_k_per_token_and_counts_its_flops() -> None:
    ffn, x = _layer0("llama")
    module = neuron_selection_ffn(ffn, x, method="gate-estimate", selection="top-k", kept_fraction=0.25)
    assert module.top_k == ffn.d_ff // 4
    module(x)
    assert module.kept_fraction == 0.25
    shape = FFNShape(ffn.d_model, ffn.d_ff, gated=True)
    expected = neuron_selection_flops(shape, 0.25, score_flops=9 * ffn.d_ff, mean_representatives=True)
    assert module.flops_per_token() == expected
    assert neuron_selection_flops_fraction([module, module]) == pytest.approx(expected / dense_ffn_flops(shape))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_no_neuron_kept_gives_the_representatives_output(model_type: str) -> None:
    ffn, x = _layer0(model_type)
    zero = neuron_selection_ffn(ffn, x, method="cats", selection="top-k", kept_fraction=0.0)
    b_down = torch.zeros(ffn.d_model) if ffn.b_down is None else ffn.b_down
    torch.testing.assert_close(zero(x), b_down.expand(x.shape[0], -1))
    est = neuron_selection_ffn(ffn, x, method="gate-estimate", selection="top-k", kept_fraction=0.0)
    mean = ffn.activation(x).mean(0)
    torch.testing.assert_close(est(x), ffn.output(mean).expand(x.shape[0], -1))


def test_gate_estimate_fits_an_exactly_linear_up_projection() -> None:
    g = torch.Generator().manual_seed(0)
    w_gate = torch.randn(16, 8, generator=g)
    ffn = FFNWeights(w_up=3 * w_gate, w_down=torch.randn(8, 16, generator=g), act=nn.SiLU(), w_gate=w_gate)
    est = fit_gate_estimate(ffn, torch.randn(512, 8, generator=g))
    torch.testing.assert_close(est.beta, torch.full((16,), 3.0), atol=1e-4, rtol=0)
    assert float(est.resid_var.max()) < 1e-8


def test_gate_estimate_of_a_plain_ffn_is_the_exact_output_error() -> None:
    ffn, x = _layer0("gpt2")
    est = fit_gate_estimate(ffn, x)
    pre = nn.functional.linear(x, ffn.w_up, ffn.b_up)
    a = ffn.act(pre)
    expected = (ffn.w_down**2).sum(0) * (a - a.mean(0)) ** 2
    torch.testing.assert_close(est(pre, a), expected)


def test_fitted_estimates_can_be_installed_instead_of_samples() -> None:
    model = tiny_model("llama")
    spec = resolve_spec(model)
    inputs = tiny_inputs(model)
    samples = _ffn_inputs(model, spec, inputs)
    estimates = fit_gate_estimates(model, spec, samples)
    assert all(isinstance(e, GateEstimate) for e in estimates)
    twin = copy.deepcopy(model)
    a = install_neuron_selection(model, spec, samples, method="gate-estimate", selection="top-k", budget=0.6)
    b = install_neuron_selection(twin, spec, estimates, method="gate-estimate", selection="top-k", budget=0.6)
    assert [m.top_k for m in a] == [m.top_k for m in b]
    torch.testing.assert_close(model_output(model, inputs), model_output(twin, inputs))


def test_flops_hand_counted() -> None:
    gated = FFNShape(d_model=4, d_ff=8, gated=True)
    # gate 2·4·8 = 64 in full; per kept neuron: up row 8 + down column 8 + gate product 1 = 17
    assert dense_ffn_flops(gated) == 200
    assert neuron_selection_flops(gated, 0.5) == 64 + 0.5 * 8 * 17
    assert neuron_selection_flops(gated, 1.0) == 200
    assert kept_fraction_for_budget(gated, 132 / 200) == pytest.approx(0.5)
    # scores 72, + M 4; per kept neuron one more (a − r): 64 + 72 + 4 + 0.5·8·18
    assert neuron_selection_flops(gated, 0.5, score_flops=72, mean_representatives=True) == 212
    plain = FFNShape(d_model=4, d_ff=8, gated=False, bias_in=True, bias_out=True)
    # first projection 64 + its bias 8 in full, b_down 4; per kept neuron its down column 8
    assert dense_ffn_flops(plain) == 140
    assert neuron_selection_flops(plain, 0.25) == 72 + 4 + 0.25 * 8 * 8
    assert neuron_selection_flops(plain, 1.0) == 140
    assert kept_fraction_for_budget(plain, 2.0) == 1.0


def test_infeasible_budget_raises_naming_it() -> None:
    shape = FFNShape(d_model=4, d_ff=8, gated=True)  # the full gate alone is 64/200 = 0.32 of dense
    with pytest.raises(InvalidArgumentError, match=r"budget 0\.3 .*0\.320"):
        kept_fraction_for_budget(shape, 0.3)
    model = tiny_model("llama")
    spec = resolve_spec(model)
    samples = _ffn_inputs(model, spec, tiny_inputs(model))
    with pytest.raises(InvalidArgumentError, match=r"budget 0\.2 "):
        install_neuron_selection(model, spec, samples, method="cats", budget=0.2)
    # nothing was swapped: modules are built before any is installed
    assert not any(isinstance(ffn_output_module(b, spec), NeuronSelectionFFN) for _, b in find_blocks(model, spec))


def test_bad_arguments_are_named() -> None:
    model = tiny_model("llama")
    spec = resolve_spec(model)
    samples = _ffn_inputs(model, spec, tiny_inputs(model))
    with pytest.raises(InvalidArgumentError, match="'random'"):
        install_neuron_selection(model, spec, samples, method="random", kept_fraction=0.5)
    with pytest.raises(InvalidArgumentError, match="1 layers; the model has 2"):
        install_neuron_selection(model, spec, samples[:1], method="cats", kept_fraction=0.5)
    with pytest.raises(InvalidArgumentError, match="threshold selection"):
        install_neuron_selection(model, spec, [None, None], method="cats", selection="threshold", kept_fraction=0.5)
