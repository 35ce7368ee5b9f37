"""Conversion end to end on tiny random models: exactness, static embeddings, oracle, dynamic k,
save/load round trips and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from moefy.checkpoint import load_converted, save_converted
from moefy.convert import ConvertConfig, configure, convert, ffn_flops_fraction, moe_layers
from moefy.errors import CalibrationError, CheckpointError, InvalidArgumentError, MoefyError
from moefy.ffn import extract_ffn
from moefy.flops import FFNShape, dense_ffn_flops, k_for_budget, moe_ffn_flops
from moefy.specs import find_blocks
from tests.analysis_fixtures import loaded_tiny, random_batches
from tests.tiny_models import model_output, tiny_inputs

FAMILIES = ["llama", "bert", "gpt2", "phi3", "opt", "bloom", "gemma2"]


def _config(**kw) -> ConvertConfig:
    base = dict(num_experts=8, top_k=4, sample_size=512, router_epochs=3, router_hidden=16, kernel="reference", sequential=False)
    base.update(kw)
    return ConvertConfig(**base)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_all_experts_reproduce_dense(model_type: str) -> None:
    loaded = loaded_tiny(model_type)
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    convert(loaded, random_batches(32, 48), _config(top_k=8, method="kmeans"))
    assert len(moe_layers(loaded.model)) == len(find_blocks(loaded.model, loaded.spec))
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)
    configure(loaded.model, top_k=2, selection="all")  # 'all' ignores k
    torch.testing.assert_close(model_output(loaded.model, inputs), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["kmeans", "coactivation", "random", "contiguous"])
@pytest.mark.parametrize("representatives", ["mean", "zero"])
def test_unselected_experts_contribute_their_representative(method: str, representatives: str) -> None:
    """MoE output == dense FFN with every unselected neuron's activation replaced by r_j."""
    loaded = loaded_tiny("llama")
    block = find_blocks(loaded.model, loaded.spec)[0][1]
    ffn = extract_ffn(block, loaded.spec)
    ffn = type(ffn)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ffn.__dict__.items()})
    convert(loaded, random_batches(32, 48), _config(method=method, representatives=representatives, selection="oracle", shared_fraction=0.25))
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


def test_oracle_selects_largest_residual_norms() -> None:
    loaded = loaded_tiny("llama")
    convert(loaded, random_batches(32, 48), _config(selection="oracle"))
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
    convert(loaded, random_batches(32, 48), _config(selection="oracle", top_k=6))
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


def test_router_conversion_and_roundtrip(tmp_path) -> None:
    loaded = loaded_tiny("llama")
    result = convert(loaded, random_batches(32, 48), _config(selection="router", shared_fraction=0.25))
    assert all(0.0 <= r.router_recall <= 1.0 for r in result.layers)
    inputs = tiny_inputs(loaded.model)
    converted_out = model_output(loaded.model, inputs)
    out = save_converted(result, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["moe.safetensors", "moefy.json"]
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary folders left behind
    fresh = loaded_tiny("llama")
    reloaded = load_converted(out, base=fresh)
    torch.testing.assert_close(model_output(reloaded.model, inputs), converted_out)
    assert reloaded.config == result.config
    with pytest.raises(CheckpointError, match="already exists"):
        save_converted(result, out)
    save_converted(result, out, overwrite=True)
    with pytest.raises(CheckpointError, match="differs"):
        load_converted(out, base=loaded_tiny("llama", seed=5))


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:
    loaded = loaded_tiny("llama")
    result = convert(loaded, random_batches(32, 48), _config(selection="oracle"))
    out = save_converted(result, tmp_path / "ckpt")
    (out / "moe.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_converted(out, base=loaded_tiny("llama"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(top_k=9), "--top-k 9"),
        (dict(num_experts=7), "does not divide"),
        (dict(num_experts=256, top_k=2), "between 1 and the FFN width"),
        (dict(eps=(0.1, 0.0)), "eps"),
        (dict(method="metis"), "kmeans"),
        (dict(representatives="median"), "mean, zero"),
        (dict(tau=1.5), "tau"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        convert(loaded_tiny("llama"), random_batches(32, 48), _config(**kwargs))


def test_too_few_calibration_tokens_says_how_many() -> None:
    with pytest.raises(CalibrationError, match=r"got 96, need at least 1024"):
        convert(loaded_tiny("llama"), random_batches(n_seq=2, seq_len=48), _config())


def test_nan_activation_names_the_layer() -> None:
    loaded = loaded_tiny("llama")
    with torch.no_grad():
        find_blocks(loaded.model, loaded.spec)[1][1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"layers\.1"):
        convert(loaded, random_batches(32, 48), _config())


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


def test_flops_fraction_counts_router_and_measured_k() -> None:
    loaded = loaded_tiny("llama")
    convert(loaded, random_batches(32, 48), _config(selection="router"))
    fraction_half = ffn_flops_fraction(loaded.model, measured=False)
    configure(loaded.model, top_k=8)
    assert ffn_flops_fraction(loaded.model, measured=False) > 1.0  # router + adds on top of dense
    configure(loaded.model, top_k=4, selection="oracle")
    assert ffn_flops_fraction(loaded.model) == 1.0  # the oracle computes everything
    assert 0.5 < fraction_half < 1.0


def test_errors_share_one_hierarchy() -> None:
    assert issubclass(CalibrationError, MoefyError) and issubclass(CheckpointError, MoefyError)
