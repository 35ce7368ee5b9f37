"""Every registered expert kernel equals the naive reference: outputs and gradients, across expert
counts and sizes, widths, token counts, k (one, half, all experts), empty (-1) slots, scale or
none, gated and plain FFNs, fp32 and bf16. With one expert holding every neuron the MoE equals
the dense FFN. GPU cases run only where CUDA is available. No test looks at wall-clock time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefy.bench import bench_ffn_layer
from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights
from moefy.kernels import KERNELS, ExpertWeights, get_kernel, reference_expert_ffn
from moefy.kernels.cpu import activation_code
from moefy.kernels.cpu_ext import cpu_ops

# every kernel but the oracle; "cpu" only where its C++ library built (test_cpp_extension_builds
# fails where it should have)
FAST_KERNELS = sorted(name for name in KERNELS if name != "reference" and (name != "cpu" or cpu_ops() is not None))
# (E, S, D): fine-grained to coarse experts; D=100 exercises the kernels' non-vector tails
SHAPES = [(1, 4, 16), (4, 6, 16), (4, 24, 64), (64, 6, 64), (64, 24, 16), (256, 4, 64), (256, 6, 16), (4, 6, 100)]
TOKENS = [1, 3, 70]  # 1 and 3 take the few-token (decode) paths, 70 the batched ones
MAX_SLOTS = 4096  # the reference is a Python loop over tokens x slots: keep each case under a second
K_CHOICES = ["one", "half", "all"]


def _gelu_tanh(v: Tensor) -> Tensor:
    # (exact-erf F.gelu on tiny tensors costs milliseconds per call in some torch CPU builds,
    # and the reference calls it once per slot; it is tested below on few slots)
    return F.gelu(v, approximate="tanh")


def _top_k(num_experts: int, choice: str) -> int:
    return {"one": 1, "half": max(1, num_experts // 2), "all": num_experts}[choice]


def make_weights(
    num_experts: int, size: int, d: int, *, gated: bool, dtype: torch.dtype = torch.float32,
    act: Callable[[Tensor], Tensor] | None = None, bias: bool = True, seed: int = 0,
) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * size if gated else size
    w_in = torch.randn(num_experts, rows, d, generator=gen) / d**0.5
    w_out = torch.randn(num_experts, size, d, generator=gen) / size**0.5
    b_in = 0.5 * torch.randn(num_experts, rows, generator=gen) if bias else None
    return ExpertWeights(
        w_in=w_in.to(dtype), w_out=w_out.to(dtype), act=act or (F.silu if gated else _gelu_tanh), gated=gated,
        b_in=None if b_in is None else b_in.to(dtype),
    )


def make_routing(tokens: int, num_experts: int, top_k: int, *, empty: bool, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Distinct experts per token; with `empty`, some slots (and one whole token) are -1."""
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.rand(tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k].contiguous()
    if empty:
        idx[torch.rand(tokens, top_k, generator=gen) < 0.3] = -1
        if tokens > 1:
            idx[1] = -1
    scale = torch.rand(tokens, top_k, generator=gen)
    return idx, scale


def as_float(w: ExpertWeights) -> ExpertWeights:
    return ExpertWeights(
        w_in=w.w_in.float(), w_out=w.w_out.float(), act=w.act, gated=w.gated,
        b_in=None if w.b_in is None else w.b_in.float(),
    )


def _close(out: Tensor, ref: Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: rounded inputs/outputs, 8 mantissa bits
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


def test_cpp_extension_builds() -> None:
    """The C++ kernels must build on a machine with a compiler and ninja (the fallback is slow)."""
    if os.environ.get("MOEFY_DISABLE_CPP", "") not in ("", "0"):
        pytest.skip("C++ kernels disabled by MOEFY_DISABLE_CPP")
    assert cpu_ops() is not None


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("k_choice", K_CHOICES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}xS{}xD{}".format(*s))
def test_kernels_equal_reference_fp32(shape: tuple[int, int, int], tokens: int, k_choice: str, gated: bool) -> None:
    num_experts, size, d = shape
    top_k = _top_k(num_experts, k_choice)
    tokens = min(tokens, max(16, MAX_SLOTS // top_k))  # still a batch (> 8 tokens) when capped
    seed = num_experts + size + d + tokens + top_k
    weights = make_weights(num_experts, size, d, gated=gated, bias=(tokens != 3), seed=seed)
    idx, scale = make_routing(tokens, num_experts, top_k, empty=(tokens != 1 and top_k > 1), seed=seed)
    use_scale = tokens != 3
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed + 2))
    ref = reference_expert_ffn(x, weights, idx, scale if use_scale else None)
    for name in FAST_KERNELS:
        out = get_kernel(name)(x, weights, idx, scale if use_scale else None)
        _close(out, ref, torch.float32)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", [(4, 6, 16), (64, 24, 64), (256, 4, 64), (4, 6, 100), (8, 5, 40)], ids=str)
def test_kernels_equal_reference_bf16(shape: tuple[int, int, int], tokens: int, gated: bool) -> None:
    num_experts, size, d = shape
    weights = make_weights(num_experts, size, d, gated=gated, dtype=torch.bfloat16, seed=tokens)
    idx, scale = make_routing(tokens, num_experts, max(1, num_experts // 2), empty=True, seed=tokens)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(5)).bfloat16()
    # the oracle in fp32 on the very same (bf16-representable) values
    ref = reference_expert_ffn(x.float(), as_float(weights), idx, scale.bfloat16().float())
    for name in FAST_KERNELS:
        _close(get_kernel(name)(x, weights, idx, scale.bfloat16()), ref, torch.bfloat16)


@pytest.mark.parametrize("act", [F.silu, nn.SiLU(), F.gelu, nn.GELU(approximate="tanh"), F.relu, torch.tanh],
                         ids=["silu", "SiLU", "gelu", "gelu_tanh", "relu", "tanh"])
def test_activations_fused_or_generic(act: Callable[[Tensor], Tensor]) -> None:
    """Known activations take the fused C++ call, unknown ones (tanh) the generic path: both exact."""
    weights = make_weights(64, 6, 64, gated=True, act=act)
    idx, scale = make_routing(3, 64, 4, empty=True)
    x = torch.randn(3, 64)
    ref = reference_expert_ffn(x, weights, idx, scale)
    for name in FAST_KERNELS:
        _close(get_kernel(name)(x, weights, idx, scale), ref, torch.float32)


def test_activation_codes() -> None:
    assert activation_code(F.silu) == activation_code(nn.SiLU()) == 1
    assert activation_code(nn.GELU()) == 2
    assert activation_code(nn.GELU(approximate="tanh")) == 3
    assert activation_code(nn.ReLU()) == 4
    assert activation_code(torch.tanh) == 0
    assert activation_code(lambda v: F.silu(v) * 1.01) == 0


@pytest.mark.parametrize("name", FAST_KERNELS)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("shape,tokens,top_k", [((4, 6, 100), 3, 2), ((64, 24, 64), 24, 16), ((256, 4, 16), 9, 96)])
def test_gradients_equal_reference(
    name: str, gated: bool, shape: tuple[int, int, int], tokens: int, top_k: int
) -> None:
    """Gradients w.r.t. x, scale and all weights (training goes through the kernels). Weights stay
    small: the reference's backward materialises a full weight-sized gradient per slot."""
    num_experts, size, d = shape
    base = make_weights(num_experts, size, d, gated=gated, seed=tokens)
    idx, scale0 = make_routing(tokens, num_experts, top_k, empty=True, seed=tokens)
    x0 = torch.randn(tokens, d, generator=torch.Generator().manual_seed(3))
    probe = torch.randn(tokens, d, generator=torch.Generator().manual_seed(4))
    grads = {}
    for kernel in ("reference", name):
        w = ExpertWeights(
            w_in=base.w_in.clone().requires_grad_(), w_out=base.w_out.clone().requires_grad_(), act=base.act,
            gated=gated, b_in=base.b_in.clone().requires_grad_(),
        )
        x, scale = x0.clone().requires_grad_(), scale0.clone().requires_grad_()
        (get_kernel(kernel)(x, w, idx, scale) * probe).sum().backward()
        grads[kernel] = {"x": x.grad, "scale": scale.grad, "w_in": w.w_in.grad, "w_out": w.w_out.grad,
                         "b_in": w.b_in.grad}
    for key, ref in grads["reference"].items():
        torch.testing.assert_close(grads[name][key], ref, rtol=1e-4, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", FAST_KERNELS)
def test_one_expert_with_every_neuron_is_the_dense_ffn(name: str) -> None:
    d, h, tokens = 64, 96, 70
    gen = torch.Generator().manual_seed(0)
    ffn = FFNWeights(
        w_up=torch.randn(h, d, generator=gen) / 8, w_gate=torch.randn(h, d, generator=gen) / 8,
        w_down=torch.randn(d, h, generator=gen) / 10, act=F.silu, b_up=torch.randn(h, generator=gen),
    )
    weights = ExpertWeights.from_ffn(ffn, torch.randperm(h, generator=gen), num_experts=1)
    x = torch.randn(tokens, d, generator=gen)
    idx = torch.zeros(tokens, 1, dtype=torch.int64)
    torch.testing.assert_close(get_kernel(name)(x, weights, idx, None), ffn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAST_KERNELS)
@pytest.mark.parametrize("bad", [4, -2])
def test_out_of_range_expert_ids_raise(name: str, bad: int) -> None:
    weights = make_weights(4, 6, 16, gated=True)
    idx = torch.tensor([[0, bad]])
    with pytest.raises(InvalidArgumentError):
        get_kernel(name)(torch.randn(1, 16), weights, idx, None)


@pytest.mark.parametrize("name", FAST_KERNELS)
@pytest.mark.parametrize("tokens,top_k", [(0, 2), (3, 0)])
def test_no_tokens_or_no_slots(name: str, tokens: int, top_k: int) -> None:
    weights = make_weights(4, 6, 16, gated=True)
    out = get_kernel(name)(torch.randn(tokens, 16), weights, torch.zeros(tokens, top_k, dtype=torch.int64), None)
    assert out.shape == (tokens, 16) and not out.any()


def test_auto_serves_other_dtypes_through_torch() -> None:
    weights = make_weights(64, 6, 64, gated=True, dtype=torch.float16)
    idx, scale = make_routing(5, 64, 16, empty=True)
    x = torch.randn(5, 64).half()
    ref = reference_expert_ffn(x.float(), as_float(weights), idx, scale)
    torch.testing.assert_close(get_kernel("auto")(x, weights, idx, scale).float(), ref, rtol=1e-2, atol=1e-2)


def test_bench_ffn_layer_reports_medians_and_ratios() -> None:
    """The benchmark library runs end to end on a tiny layer (its figures are not checked)."""
    r = bench_ffn_layer(64, 128, num_experts=8, top_k=2, tokens=3, repeats=2, warmup=1, cold_weights=False)
    assert r["ideal"] == 4 and r["num_experts"] == 8 and r["tokens"] == 3
    assert r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["speedup"] == pytest.approx(r["dense_ms"] / r["moe_ms"])
    with pytest.raises(InvalidArgumentError):
        bench_ffn_layer(64, 128, num_experts=5, top_k=2, tokens=1)


def test_unknown_kernel_names_the_valid_ones() -> None:
    with pytest.raises(InvalidArgumentError, match="torch_grouped"):
        get_kernel("nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
def test_gpu_kernels_equal_reference(tokens: int, dtype: torch.dtype) -> None:
    weights = make_weights(64, 6, 64, gated=True, dtype=dtype)
    idx, scale = make_routing(tokens, 64, 16, empty=True)
    x = torch.randn(tokens, 64).to(dtype)
    ref = reference_expert_ffn(x.float(), as_float(weights), idx, scale.to(dtype).float())
    cuda = ExpertWeights(w_in=weights.w_in.cuda(), w_out=weights.w_out.cuda(), act=weights.act, gated=True,
                         b_in=weights.b_in.cuda())
    for name in ("auto", "torch_decode", "torch_grouped"):
        out = get_kernel(name)(x.cuda(), cuda, idx.cuda(), scale.to(dtype).cuda())
        assert out.device.type == "cuda"
        _close(out.cpu(), ref, dtype)
