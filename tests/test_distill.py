"""Distillation (search → distill → plan): the training forward has the converted model's value,
every expert selected is still the dense model exactly, a distilled plan saves and reloads to the
same logits, compensation FLOPs are counted in the budget, an interrupted run resumes to the same
plan, and the loss goes down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefy import api
from moefy.conversion import layer_flops, moe_layers, top_k_for_budget
from moefy.distill import (
    _training,
    add_compensation,
    dense_mode,
    distilled_layers,
    lr_factor,
    sequence_order,
    trainable_tensors,
)
from moefy.errors import InvalidArgumentError
from moefy.flops import FFNShape, compensation_flops, dense_ffn_flops, moe_ffn_flops
from moefy.moe_model import MoEModel
from moefy.settings import ConvertConfig
from tests.analysis_fixtures import loaded_tiny, random_batches, tiny_settings
from tests.tiny_models import model_output, tiny_inputs

STEPS = 12


def _distilled(model_type: str = "llama", **kw):
    """A tiny model converted and distilled for a few steps: (loaded, MoEModel, dense logits, inputs)."""
    loaded = loaded_tiny(model_type)
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    settings = dict(distill=True, distill_steps=STEPS, distill_batch=4, distill_lr=1e-2, compensation_rank=2,
                    shared_fraction=0.25) | kw
    config, runtime = tiny_settings(**settings)
    moe = api.convert(loaded, config, calibration=random_batches(32, 48), runtime=runtime)
    return loaded, moe, dense, inputs


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])  # gated; plain GeLU with biases; encoder
def test_distilled_plan_round_trip_and_dense_when_every_expert_selected(model_type: str, tmp_path: Path) -> None:
    loaded, moe, dense, inputs = _distilled(model_type)
    summary = moe.plan.extra["distillation"]
    assert summary["steps"] == STEPS and summary["resumed_from"] == 0
    assert all(lp.compensation is not None and lp.lowrank is not None for lp in moe.plan.layers)
    assert any(float(lp.compensation.abs().max()) > 0 for lp in moe.plan.layers)  # training moved it
    converted = model_output(loaded.model, inputs)
    assert not torch.allclose(converted, dense)

    folder = moe.save(tmp_path / "plan")
    back = MoEModel.from_pretrained(folder, base=loaded_tiny(model_type))
    torch.testing.assert_close(model_output(back.model, inputs), converted, rtol=0, atol=0)
    for a, b in zip(moe.plan.layers, back.plan.layers, strict=True):
        torch.testing.assert_close(a.compensation, b.compensation, rtol=0, atol=0)
        torch.testing.assert_close(a.lowrank[1], b.lowrank[1], rtol=0, atol=0)

    # every expert selected: the dense model, compensation and all (it only acts on the sparse path)
    back.configure(top_k=8)
    torch.testing.assert_close(model_output(back.model, inputs), dense, rtol=1e-4, atol=1e-5)
    moe.configure(selection="all")
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)


def test_training_forward_has_the_converted_value_and_a_gradient_for_every_expert() -> None:
    loaded = loaded_tiny("llama")
    config, runtime = tiny_settings(distill=False, compensation_rank=2)
    moe = api.convert(loaded, config, calibration=random_batches(32, 48), runtime=runtime)
    inputs = tiny_inputs(loaded.model)
    layers = [m for _, m in distilled_layers(loaded, moe.plan)]
    assert len(layers) == 2
    for m in layers:
        add_compensation(m, config)
        with torch.no_grad():
            m.compensation.normal_()  # type: ignore[union-attr]
            m.lowrank_b.normal_()  # type: ignore[union-attr]
    sparse = model_output(loaded.model, inputs)
    params = trainable_tensors(layers)
    before = [p.requires_grad for p in loaded.model.parameters()]
    with _training(loaded.model, layers, params), torch.enable_grad():
        out = loaded.model(**inputs).logits
        torch.testing.assert_close(out, sparse, rtol=1e-4, atol=1e-4)  # the forward value is the MoE's
        out.pow(2).mean().backward()
        router_w = layers[0].router.scorer.net[-1].weight  # type: ignore[union-attr, index]
        assert router_w.grad is not None
        # unselected experts get a gradient too (the rows of experts no token picked are not zero)
        assert int((router_w.grad.abs().sum(1) > 0).sum()) == router_w.shape[0]
        assert layers[0].compensation.grad is not None  # type: ignore[union-attr]
    assert [p.requires_grad for p in loaded.model.parameters()] == before  # restored
    torch.testing.assert_close(model_output(loaded.model, inputs), sparse, rtol=0, atol=0)


def test_teacher_is_the_dense_model() -> None:
    loaded = loaded_tiny("llama")
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    config, runtime = tiny_settings()
    api.convert(loaded, config, calibration=random_batches(32, 48), runtime=runtime)
    layers = moe_layers(loaded.model)
    with dense_mode(layers):
        torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)
    assert all(m.selection == "router" and m.top_k == 4 for m in layers)  # restored


def test_distillation_lowers_its_loss() -> None:
    _, moe, _, _ = _distilled(distill_steps=40, distill_batch=8, distill_lr=3e-3)
    kl = moe.plan.extra["distillation"]
    assert kl["probe_after"] < kl["probe_before"]


def test_interrupted_distillation_resumes_to_the_same_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(distill=True, distill_steps=10, distill_checkpoint_every=4, distill_lr=1e-2, compensation_rank=2)
    config, runtime = tiny_settings(**settings)
    batches = random_batches(32, 48)

    def run(checkpoint: Path | None) -> MoEModel:
        return api.convert(loaded_tiny("llama"), config, calibration=batches, runtime=runtime, checkpoint_dir=checkpoint)

    whole = run(None)
    ckpt = tmp_path / "ckpt"
    import moefy.distill as d

    real = d.save_checkpoint
    calls = []

    def dies_after_second(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill right after step 8's checkpoint

    monkeypatch.setattr(d, "save_checkpoint", dies_after_second)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt)
    monkeypatch.setattr(d, "save_checkpoint", real)
    resumed = run(ckpt)
    assert resumed.plan.extra["distillation"]["resumed_from"] == 8
    for a, b in zip(whole.plan.layers, resumed.plan.layers, strict=True):
        for k, v in a.tensors().items():
            torch.testing.assert_close(b.tensors()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # a checkpoint of other settings is not used
    other = api.convert(loaded_tiny("llama"), config.replace(distill_lr=2e-2), calibration=batches, runtime=runtime,
                        checkpoint_dir=ckpt)
    assert other.plan.extra["distillation"]["resumed_from"] == 0


def test_compensation_flops_are_counted() -> None:
    d, h, n, k, r = 32, 128, 8, 4, 2
    assert compensation_flops(d, True, 0) == d
    assert compensation_flops(d, True, r) == d + 2 * r * d + 2 * d * r + d
    assert compensation_flops(d, False, 0) == 0
    _, moe, _, _ = _distilled(compensation_rank=r, distill_steps=2)
    m = moe_layers(moe.model)[0]
    shape = FFNShape(d, h, gated=True)
    router = m.router.flops_per_token()  # type: ignore[union-attr]
    dense, total, _ = layer_flops(m, measured=False)
    assert dense == dense_ffn_flops(shape)
    assert total == moe_ffn_flops(shape, n, k, router) + d + 4 * r * d + d
    # the budget -> k rule pays for them: a budget that fits k without compensation may not fit with it
    config = ConvertConfig(num_experts=n, budget=0.75, shared_fraction=0.0, router_hidden=0, compensation_rank=r)
    plain = top_k_for_budget(shape, n, 0, 2 * d + 2 * d * n, 0.75)
    paid = top_k_for_budget(shape, n, 0, 2 * d + 2 * d * n + compensation_flops(d, True, r), 0.75)
    assert paid <= plain
    from moefy.conversion import planned_top_k

    assert planned_top_k(shape, config) == paid
    assert planned_top_k(shape, config.replace(distill=False)) == plain


def test_data_order_and_schedule_are_functions_of_the_step() -> None:
    a = [sequence_order(20, s, 4, seed=3) for s in range(12)]
    assert a == [sequence_order(20, s, 4, seed=3) for s in range(12)]
    assert sorted(x for rows in a[:5] for x in rows) == list(range(20))  # an epoch sees every sequence once
    assert lr_factor(0, 100) == pytest.approx(0.1) and lr_factor(10, 100) == pytest.approx(1.0)
    assert lr_factor(99, 100) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("flags, message", [
    (["--distill-steps", "-1"], "--distill-steps -1 must be an integer >= 0"),
    (["--distill-minutes", "0"], "--distill-minutes 0.0 must be > 0"),
    (["--distill-lr", "-1"], "--distill-lr -1.0 must be > 0"),
    (["--compensation-rank", "-2"], "--compensation-rank -2 must be >= 0"),
])
def test_bad_distillation_flags_are_one_line_errors(flags: list[str], message: str, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "moefy.cli", "convert", "smollm2-135m", "--out", str(tmp_path / "o"), *flags],
                         capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_python_api_refuses_bad_settings() -> None:
    with pytest.raises(InvalidArgumentError, match="--distill-batch"):
        ConvertConfig(distill_batch=0)
    with pytest.raises(InvalidArgumentError, match="--distill-steps"):
        ConvertConfig(distill_steps=1.5)  # type: ignore[arg-type]
