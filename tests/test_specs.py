"""Architecture specs, checked on a tiny random model of every supported family.

The property under test: moefy's canonical view of each FFN (`extract_ffn`) is exact. It equals
the module's own output on random inputs and the model's own intermediate activation during a
whole-model forward; split into experts with every neuron kept it still equals the module; and
swapping every FFN for the canonical one leaves the model's output unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from moefy.errors import UnsupportedArchitectureError
from moefy.ffn import (
    ReferenceFFN,
    check_ffn_view,
    extract_ffn,
    ffn_input_module,
    ffn_output_module,
    swap_ffn,
)
from moefy.kernels import ExpertWeights, reference_expert_ffn
from moefy.specs import (
    SPECS,
    ArchSpec,
    find_blocks,
    get_submodule,
    resolve_spec,
    set_submodule,
    spec_for,
    supported_model_types,
)
from tests.tiny_models import TINY_CASES, case_id, model_output, tiny_inputs, tiny_model

NUM_EXPERTS = 4


@pytest.fixture(scope="module", params=TINY_CASES, ids=case_id)
def tiny(request: pytest.FixtureRequest) -> tuple[PreTrainedModel, ArchSpec]:
    """A tiny model of one family and its resolved spec (shared by the read-only tests)."""
    model = tiny_model(*request.param)
    return model, resolve_spec(model)


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_every_supported_model_type_has_a_tiny_model() -> None:
    assert {mt for mt, _ in TINY_CASES} == set(supported_model_types())


def test_model_types_are_unique_across_specs() -> None:
    model_types = [mt for spec in SPECS for mt in spec.model_types]
    assert len(model_types) == len(set(model_types))


@pytest.mark.parametrize(
    ("variant", "family", "gated"), [("dense", "t5", False), ("gated", "t5-gated", True)]
)
def test_t5_variants_resolve_to_their_layout(variant: str, family: str, gated: bool) -> None:
    spec = resolve_spec(tiny_model("t5", variant))
    assert (spec.family, spec.gated, spec.variants) == (family, gated, ())
    assert spec_for("t5").family == "t5"  # the model_type alone gives the first layout


def test_find_blocks_finds_every_block(tiny: tuple[PreTrainedModel, ArchSpec]) -> None:
    model, spec = tiny
    config = model.config.get_text_config()
    expected = config.num_hidden_layers + (config.num_decoder_layers if config.is_encoder_decoder else 0)
    blocks = find_blocks(model, spec)
    assert len(blocks) == expected
    assert len({name for name, _ in blocks}) == len({id(b) for _, b in blocks}) == expected
    for name, block in blocks:
        assert model.get_submodule(name) is block


@torch.no_grad()
def test_canonical_view_reproduces_each_ffn(tiny: tuple[PreTrainedModel, ArchSpec]) -> None:
    model, spec = tiny
    for i, (_, block) in enumerate(find_blocks(model, spec)):
        x = _randn(2, 5, extract_ffn(block, spec).d_model, seed=i)  # (B, T, D)
        y_model, y_view = check_ffn_view(block, spec, x)
        assert y_model.abs().max() > 0
        torch.testing.assert_close(y_view, y_model)


@torch.no_grad()
def test_activation_matches_whole_model_forward(tiny: tuple[PreTrainedModel, ArchSpec]) -> None:
    """Hooks capture, in a whole-model forward, each FFN's input x, the input a of its down
    projection and its output y; the canonical view must give a(x) and y(x) exactly."""
    model, spec = tiny
    blocks = find_blocks(model, spec)
    seen: dict[tuple[str, str], list[Tensor]] = {}

    def capture(key: tuple[str, str], output: bool = False) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], *rest: Tensor) -> None:
            t = rest[0] if output else args[0]
            seen.setdefault(key, []).append(t.detach().clone())  # clone: Falcon adds into y in place

        return hook

    handles = []
    for name, block in blocks:
        handles.append(ffn_input_module(block, spec).register_forward_pre_hook(capture((name, "x"))))
        handles.append(get_submodule(block, spec.down).register_forward_pre_hook(capture((name, "a"))))
        handles.append(
            ffn_output_module(block, spec).register_forward_hook(capture((name, "y"), output=True))
        )
    try:
        model_output(model, tiny_inputs(model))
    finally:
        for h in handles:
            h.remove()

    for name, block in blocks:
        (x,), (a,), (y,) = seen[(name, "x")], seen[(name, "a")], seen[(name, "y")]
        ffn = extract_ffn(block, spec)
        assert a.shape[-1] == ffn.d_ff
        torch.testing.assert_close(ffn.activation(x), a)
        torch.testing.assert_close(ffn(x), y)


@torch.no_grad()
def test_experts_with_every_neuron_kept_reproduce_each_ffn(tiny: tuple[PreTrainedModel, ArchSpec]) -> None:
    model, spec = tiny
    gen = torch.Generator().manual_seed(0)
    for i, (_, block) in enumerate(find_blocks(model, spec)):
        ffn = extract_ffn(block, spec)
        x = _randn(6, ffn.d_model, seed=i)  # (T, D)
        y_model, _ = check_ffn_view(block, spec, x)
        weights = ExpertWeights.from_ffn(
            ffn, perm=torch.randperm(ffn.d_ff, generator=gen), num_experts=NUM_EXPERTS
        )
        idx = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen) for _ in range(x.shape[0])])  # (T, E)
        y = reference_expert_ffn(x, weights, idx)
        if ffn.b_down is not None:
            y = y + ffn.b_down
        torch.testing.assert_close(y, y_model)


@torch.no_grad()
def test_swapping_in_the_canonical_ffn_keeps_model_output(tiny: tuple[PreTrainedModel, ArchSpec]) -> None:
    model, spec = tiny
    model = copy.deepcopy(model)
    inputs = tiny_inputs(model)
    before = model_output(model, inputs)
    calls = []
    for _, block in find_blocks(model, spec):
        new = ReferenceFFN(extract_ffn(block, spec))
        new.register_forward_hook(lambda *_: calls.append(1))
        swap_ffn(block, spec, new)
        assert ffn_output_module(block, spec) is new
    after = model_output(model, inputs)
    assert len(calls) == len(find_blocks(model, spec))  # every swapped FFN really ran
    torch.testing.assert_close(after, before)


def test_unknown_model_type_lists_supported_types() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'mystery'") as err:
        spec_for("mystery")
    for model_type in supported_model_types():
        assert model_type in str(err.value)


def test_resolve_spec_rejects_unknown_models() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="no config.model_type.*llama"):
        resolve_spec(nn.Linear(2, 2))

    class Mystery(nn.Module):
        config = SimpleNamespace(model_type="mystery")

    with pytest.raises(UnsupportedArchitectureError, match="'mystery'.*supported model types.*llama"):
        resolve_spec(Mystery())


def test_resolve_spec_rejects_a_layout_that_does_not_match() -> None:
    model = tiny_model("llama")
    set_submodule(model, "model.layers.1.mlp", nn.Identity())
    with pytest.raises(UnsupportedArchitectureError, match="model.layers.1 has no 'mlp.up_proj'"):
        resolve_spec(model)
