"""The speed paths of issue 13 compute what the plain paths compute: every instruction-set variant
of the C++ kernels equals the reference (outputs and gradients); the fused static term (activations
centred on the representatives) and the batched dense fallback equal the kernel-plus-static-vectors
formulation, whichever the measured cost model picks; the MoE layer's fast inference path equals its
general path (compensation included); the decode profile runs on a tiny model. No wall-clock
assertions.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moefy.bench_model import profile_decode
from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights
from moefy.kernels import ExpertWeights, dispatch, get_kernel, reference_expert_ffn
from moefy.kernels.cpu_ext import available_isas, cpu_ops, forced_isa
from moefy.kernels.dispatch import centred_expert_ffn, dense_centred_expert_ffn
from moefy.moe_ffn import MoEFFN
from moefy.routers import ExpertRouter, MLPRouter
from tests.test_kernels import _close, as_float, make_routing, make_weights
from tests.tiny_models import tiny_inputs, tiny_model

needs_cpp = pytest.mark.skipif(cpu_ops() is None, reason="the C++ kernels did not build here")


def _centred_reference(x: Tensor, weights: ExpertWeights, idx: Tensor, centre: Tensor) -> Tensor:
    """Σ_j (v_e − m_e) with m_e = centre[e] W_out[e]: the reference kernel minus the static vectors."""
    static = torch.einsum("es,esd->ed", centre, weights.w_out)
    valid = (idx >= 0).to(x.dtype)
    chosen = F.embedding_bag(idx.clamp_min(0), static, per_sample_weights=valid, mode="sum")
    return reference_expert_ffn(x, weights, idx, None) - chosen


@needs_cpp
@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_every_isa_variant_equals_reference(isa: str, dtype: torch.dtype, tokens: int) -> None:
    """Each instruction-set build (AVX-512+BF16 / AVX-512 / AVX2 / baseline where the host runs them)
    through the fused call and the autograd path; vector tails (D=100), dynamic k (-1 slots)."""
    for e, s, d, gated in ((64, 6, 100, True), (16, 24, 64, False)):
        weights = make_weights(e, s, d, gated=gated, dtype=dtype, seed=tokens)
        idx, scale = make_routing(tokens, e, e // 2, empty=tokens > 1, seed=tokens)
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(1)).to(dtype)
        scale = scale.to(dtype)
        ref = reference_expert_ffn(x.float(), as_float(weights), idx, scale.float())
        with forced_isa(isa):
            assert cpu_ops() is not None, f"the {isa} variant did not build"
            out = get_kernel("cpu")(x, weights, idx, scale)
        _close(out, ref, dtype)


@needs_cpp
@pytest.mark.parametrize("isa", available_isas())
def test_every_isa_variant_gradients(isa: str) -> None:
    weights = make_weights(32, 6, 40, gated=True, seed=2)
    idx, scale0 = make_routing(10, 32, 8, empty=True, seed=2)
    x0 = torch.randn(10, 40, generator=torch.Generator().manual_seed(3))
    grads = {}
    for run in ("reference", isa):
        w = ExpertWeights(w_in=weights.w_in.clone().requires_grad_(), w_out=weights.w_out.clone().requires_grad_(),
                          act=weights.act, gated=True, b_in=weights.b_in.clone().requires_grad_())
        x, scale = x0.clone().requires_grad_(), scale0.clone().requires_grad_()
        if run == "reference":
            out = reference_expert_ffn(x, w, idx, scale)
        else:
            with forced_isa(isa):
                out = get_kernel("cpu")(x, w, idx, scale)
        out.square().sum().backward()
        grads[run] = [x.grad, scale.grad, w.w_in.grad, w.w_out.grad, w.b_in.grad]
    for got, ref in zip(grads[isa], grads["reference"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_unknown_isa_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgumentError, match="avx2"), forced_isa("sse9"):
        pass


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("tokens,k", [(1, 1), (1, 32), (5, 16), (40, 48), (40, 64)])
def test_centred_kernel_and_dense_fallback_equal_reference(
    tokens: int, k: int, gated: bool, dtype: torch.dtype
) -> None:
    """Σ (v_e − m_e) by the fused sparse kernel, by the dense fallback and by `auto` (which measures
    and picks one) all equal the reference, for fixed and dynamic k (-1 slots)."""
    e, s, d = 64, 6, 100
    weights = make_weights(e, s, d, gated=gated, dtype=dtype, seed=k)
    centre = (0.1 * torch.randn(e, s, generator=torch.Generator().manual_seed(k))).to(dtype)
    idx, _ = make_routing(tokens, e, k, empty=tokens > 1 and k < e, seed=k)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    ref = _centred_reference(x.float(), as_float(weights), idx, centre.float())
    dispatch.clear_centred_choices()
    with torch.no_grad():
        for mode in ("sparse", "dense", "auto", "auto"):  # the second auto uses the recorded choice
            out = centred_expert_ffn(x, weights, idx, centre, mode)
            assert out is not None
            _close(out, ref, dtype)
    if tokens > dispatch.DECODE_MAX_TOKENS:
        assert set(dispatch._choices.values()) <= {"sparse", "dense"} and dispatch._choices


@needs_cpp
@pytest.mark.parametrize("pinned", ["sparse", "dense"])
def test_pinned_mode_replaces_the_timed_choice(pinned: str) -> None:
    """Under `pinned_centred_mode`, `auto` on a batch runs the pinned path bit for bit and measures
    nothing (a sequential search's saved outputs must not depend on a timing); outside it, `auto`
    times again; a bad mode is refused."""
    e, s, d = 32, 6, 48
    weights = make_weights(e, s, d, gated=True, seed=3)
    centre = 0.1 * torch.randn(e, s, generator=torch.Generator().manual_seed(3))
    idx, _ = make_routing(40, e, 12, empty=True, seed=3)
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(4))
    dispatch.clear_centred_choices()
    with torch.no_grad():
        want = centred_expert_ffn(x, weights, idx, centre, pinned)
        with dispatch.pinned_centred_mode(pinned):
            got = centred_expert_ffn(x, weights, idx, centre, "auto")
        assert got is not None and want is not None
        assert torch.equal(got, want) and not dispatch._choices
        centred_expert_ffn(x, weights, idx, centre, "auto")
    assert dispatch._choices
    with pytest.raises(InvalidArgumentError, match="sparse, dense"), dispatch.pinned_centred_mode("auto"):
        pass


def test_dense_fallback_is_pure_torch_and_differentiable() -> None:
    weights = make_weights(8, 4, 16, gated=True, seed=1)
    centre = torch.randn(8, 4)
    idx, _ = make_routing(6, 8, 3, empty=True)
    x = torch.randn(6, 16, requires_grad=True)
    ref = _centred_reference(x.detach(), weights, idx, centre)
    out = dense_centred_expert_ffn(x, weights, idx, centre)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None
    with pytest.raises(InvalidArgumentError, match="sparse"):
        centred_expert_ffn(x, weights, idx, centre, "fast")


def _moe_layer(*, compensation: bool, lowrank: bool, kernel: str = "auto", seed: int = 0) -> MoEFFN:
    e, s, d, ns = 16, 6, 40, 2
    gen = torch.Generator().manual_seed(seed)
    weights = make_weights(e, s, d, gated=True, bias=False, seed=seed)
    scorer = MLPRouter(d, e - ns, hidden=0)
    with torch.no_grad():
        scorer.net.weight.copy_(torch.randn(e - ns, d, generator=gen))
    return MoEFFN(
        experts=weights, representatives=0.1 * torch.randn(e, s, generator=gen), b_out=torch.randn(d, generator=gen),
        router=ExpertRouter(scorer, top_k=6 - ns), top_k=6, num_shared=ns, kernel=kernel,
        compensation=torch.randn(d, generator=gen) if compensation else None,
        lowrank=(torch.randn(3, d, generator=gen), torch.randn(d, 3, generator=gen)) if lowrank else None,
    )


@pytest.mark.parametrize("tokens", [1, 3, 30])
@pytest.mark.parametrize("compensation,lowrank", [(False, False), (True, False), (True, True)])
def test_moe_layer_fast_path_equals_general_path(tokens: int, compensation: bool, lowrank: bool) -> None:
    """The fused inference path (static term folded into the kernel, cached M) and the general path
    (the reference kernel plus embedding_bag of the static vectors) give the same layer output,
    routing and counters; in training mode gradients still reach the router."""
    fast = _moe_layer(compensation=compensation, lowrank=lowrank).eval()
    slow = copy.deepcopy(fast)
    slow.kernel_name = "reference"
    x = torch.randn(2, tokens, 40, generator=torch.Generator().manual_seed(tokens))
    dispatch.clear_centred_choices()
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the cached M (and the recorded choice)
            torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-4)
    assert fast.last_routing is not None and slow.last_routing is not None
    # the same routed sets (the fused decode path and torch.topk order an unsorted top-k differently)
    torch.testing.assert_close(fast.last_routing.idx.sort(1).values, slow.last_routing.idx.sort(1).values)
    torch.testing.assert_close(fast.last_routing.logits, slow.last_routing.logits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast.last_routing.probs, slow.last_routing.probs, rtol=1e-5, atol=1e-5)
    assert fast.experts_selected == slow.experts_selected == 2 * 2 * tokens * 6
    with torch.no_grad():  # M follows the representatives after refresh_static()
        fast.representatives.mul_(2.0), slow.representatives.mul_(2.0)
        fast.refresh_static(), slow.refresh_static()
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-4)
    fast.train()
    assert fast.router is not None
    for p in fast.router.parameters():
        p.requires_grad_(True)
    fast(x).square().sum().backward()
    assert fast.router.scorer.net.weight.grad is not None and fast.router.scorer.net.weight.grad.abs().sum() > 0


def test_profile_decode_reports_every_stage() -> None:
    """`moefy bench --profile` on a tiny Llama whose FFNs are swapped for MoE layers (figures not checked)."""
    dense = tiny_model("llama")
    moe = copy.deepcopy(dense)
    for i, block in enumerate(moe.model.layers):
        mlp = block.mlp
        ffn = FFNWeights(w_up=mlp.up_proj.weight.detach(), w_gate=mlp.gate_proj.weight.detach(),
                         w_down=mlp.down_proj.weight.detach(), act=F.silu)
        experts = ExpertWeights.from_ffn(ffn, torch.arange(ffn.d_ff), num_experts=16)
        block.mlp = MoEFFN(experts=experts, representatives=torch.zeros(16, ffn.d_ff // 16), b_out=None,
                           router=ExpertRouter(MLPRouter(ffn.d_model, 16, hidden=0), top_k=8), top_k=8)
        del i
    prompt = tiny_inputs(dense, batch=1, seq=5)["input_ids"]
    r = profile_decode(dense, moe, prompt, new_tokens=4, repeats=1)
    for key in ("dense_step_ms", "moe_step_ms", "dense_layer_us", "layer_fused_us", "layer_router_us", "layer_select_us",
                "layer_kernel_us", "layer_static_us", "layer_other_us", "layer_total_us"):
        assert key in r, key
    assert r["layers"] == 2 and r["layer_total_us"] > 0
    assert all("_join_shared" not in vars(m) for m in moe.modules())  # stage wrappers removed


def test_bench_layer_reports_its_roofline() -> None:
    """The layer benchmark times a plain sum over the same weights in its interleaved loop and
    reports each side's rate against it (figures not checked)."""
    from moefy.bench import bench_ffn_layer

    r = bench_ffn_layer(64, 128, num_experts=8, top_k=2, tokens=1, repeats=2, warmup=1, cold_weights=False)
    assert r["read_ms"] > 0 and r["read_gbps"] > 0
    for side in ("dense", "moe", "moe_all"):
        assert r[f"{side}_roofline"] == pytest.approx(r[f"{side}_gbps"] / r["read_gbps"])
    assert r["all_vs_dense"] == pytest.approx(r["dense_ms"] / r["moe_all_ms"])


@pytest.mark.parametrize("argv,message", [
    (["bench", "--profile", "--no-layers"], "--profile needs --model"),
    (["bench", "--clock", "cpu", "--threads", "2", "--no-layers"], "--clock cpu needs --threads 1"),
    (["bench", "--prefill", "4by256", "--no-layers"], "not ROWSxTOKENS"),
    (["bench", "--prefill", "0x256", "--no-layers"], "rows must be 1..64"),
])
def test_bench_cli_rejects_inconsistent_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from moefy.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(argv) == 2
    finally:
        torch.set_num_threads(threads)
    assert message in capsys.readouterr().err


def _routed_layer(*, e: int = 24, s: int = 6, d: int = 40, ns: int = 3, k: int = 9, dtype: torch.dtype = torch.float32,
                  bias: bool = True, seed: int = 0) -> MoEFFN:
    """A layer whose linear router has a non-trivial standardisation (x_mean, x_scale) and bias."""
    gen = torch.Generator().manual_seed(seed)
    weights = make_weights(e, s, d, gated=True, bias=bias, dtype=dtype, seed=seed)
    scorer = MLPRouter(d, e - ns, hidden=0)
    with torch.no_grad():
        scorer.net.weight.copy_(torch.randn(e - ns, d, generator=gen))
        scorer.net.bias.copy_(torch.randn(e - ns, generator=gen))
        scorer.x_mean.copy_(0.1 * torch.randn(d, generator=gen))
        scorer.x_scale.copy_(1 + 0.2 * torch.rand(d, generator=gen))
    scorer.to(dtype)
    return MoEFFN(
        experts=weights, representatives=(0.1 * torch.randn(e, s, generator=gen)).to(dtype),
        b_out=torch.randn(d, generator=gen).to(dtype), router=ExpertRouter(scorer, top_k=k - ns), top_k=k,
        num_shared=ns, compensation=torch.randn(d, generator=gen).to(dtype),
    ).eval()


def _staged(layer: MoEFFN) -> MoEFFN:
    """The same layer forced onto the staged path (router module, torch top-k, reference kernel)."""
    slow = copy.deepcopy(layer)
    slow.kernel_name = "reference"
    return slow


@needs_cpp
@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("tokens", [1, 2, 8])
@pytest.mark.parametrize("ns,k", [(3, 9), (0, 5), (3, 24), (0, 1)])
def test_fused_decode_path_equals_staged_path(isa: str, tokens: int, ns: int, k: int) -> None:
    """Router, top-k, shared experts, kernel, static term and compensation in one C++ call give the
    staged path's output and routed sets, on every ISA build; k = every expert and k = 1 included."""
    layer = _routed_layer(ns=ns, k=k, seed=tokens + k)
    slow = _staged(layer)
    x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), forced_isa(isa):
        fused = layer._fused_decode(x)  # called directly: with k = every expert, forward runs dense
        got = layer(x)
    with torch.no_grad():
        ref = slow(x)
    assert fused is not None, "the fused path did not apply"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    if k == 24:  # every expert: the dense FFN exactly, plus the compensation vector the dense path skips
        assert layer.compensation is not None
        torch.testing.assert_close(fused - layer.compensation, ref, rtol=1e-5, atol=1e-4)
    else:
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-4)
        assert layer.last_routing is not None and slow.last_routing is not None
        assert torch.equal(layer.last_routing.idx.sort(1).values, slow.last_routing.idx.sort(1).values)
        assert layer.experts_selected == 2 * tokens * k  # _fused_decode's call and the forward


@needs_cpp
def test_fused_decode_path_bf16_selects_a_true_top_k() -> None:
    """bf16: the fused router sums in fp32 (torch's bf16 linear rounds its logits to bf16, so ties may
    break differently): its selection is a top-k of fp32 logits, and the output equals the
    reference kernel on that selection."""
    layer = _routed_layer(dtype=torch.bfloat16, ns=2, k=10, seed=3)
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    routing = layer.last_routing
    assert routing is not None
    scorer = layer.router.scorer  # type: ignore[union-attr]
    z = (x.float() - scorer.x_mean.float()) * scorer.x_scale.float()
    logits = z @ scorer.net.weight.float().T + scorer.net.bias.float()
    chosen = logits.gather(1, routing.idx)
    rest = logits.scatter(1, routing.idx, float("-inf"))
    assert (chosen.min(1).values >= rest.max(1).values - 1e-3).all()
    idx = layer.with_shared(routing.idx)
    ref = _centred_reference(x.float(), as_float(layer.expert_weights), idx, layer.representatives.float())
    ref = ref + layer.static.float().sum(0) + layer.b_out.float() + layer.compensation.float()  # type: ignore[union-attr]
    _close(y, ref, torch.bfloat16)


@needs_cpp
def test_fused_decode_path_steps_aside_where_it_does_not_apply() -> None:
    """Dynamic k, an MLP router, batches, gradients and other kernels take the staged path."""
    x = torch.randn(1, 40)
    layer = _routed_layer()
    with torch.no_grad():
        assert layer._fused_decode(x) is not None
        assert layer._fused_decode(torch.randn(dispatch.DECODE_MAX_TOKENS + 1, 40)) is None
        layer.configure(tau=0.9)
        assert layer._fused_decode(x) is None
        layer.configure(tau=None, selection="oracle")
        assert layer._fused_decode(x) is None
        layer.configure(selection="router")
    assert layer._fused_decode(x.requires_grad_()) is None  # gradients wanted
    mlp = _routed_layer()
    mlp.router.scorer = MLPRouter(40, 21, hidden=8)  # type: ignore[union-attr]
    with torch.no_grad():
        assert mlp._fused_decode(x.detach()) is None
        torch.testing.assert_close(mlp(x.detach()), _staged(mlp)(x.detach()), rtol=1e-5, atol=1e-4)


@needs_cpp
def test_fused_decode_op_rejects_bad_shapes() -> None:
    from moefy.kernels.cpu import cpu_routed_expert_ffn

    layer = _routed_layer()
    scorer = layer.router.scorer  # type: ignore[union-attr]
    centre = layer.representatives
    with torch.no_grad(), pytest.raises(InvalidArgumentError, match="k_routed"):
        cpu_routed_expert_ffn(torch.randn(1, 40), layer.expert_weights, scorer.net, None, None, 3, 22, centre)
    with torch.no_grad(), pytest.raises(InvalidArgumentError, match="num_shared"):
        cpu_routed_expert_ffn(torch.randn(1, 40), layer.expert_weights, scorer.net, None, None, 2, 4, centre)
