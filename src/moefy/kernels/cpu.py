"""The C++ CPU expert kernel (`expert_ffn_cpu.cpp`): block-sparse products over the selected
experts' rows, read in place, for one token and for batches alike.

Inference with a recognised activation (SiLU, GeLU, tanh-GeLU, ReLU) is one fused C++ call. When
gradients are needed, or the activation is not recognised, the same primitives run as two
autograd Functions with the activation in torch between them:

    pre = grouped_in(x, W_in)          (T*K, S_in)    backward: dx = grouped_out(dpre, W_in)
    a   = act(gate) ⊙ up · scale       (T*K, S)       torch autograd
    out = grouped_out(a, W_out)        (T, D)         backward: da = grouped_in(dout, W_out)
    weight gradients: grouped_wgrad (per-expert outer products, only active experts non-zero)

The MoE layer's inference path (`cpu_centred_expert_ffn`) is the same fused call with the
activations centred on the representatives, a ← a − r_e, and the output started at M + b_out, so the
static-embedding term costs nothing extra: y = M + b_out + Σ_{e∈S} (a_e − r_e) W_out[e].

Sums are fp32. bf16 weights are widened on load, except that a bf16 model on a CPU with
AVX512-BF16 multiplies bf16 by bf16 (vdpbf16ps), as torch's own bf16 matmul does: in the input
projection always, and in the fused call's down projection for batches. The output has x's dtype.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError, MoefyError
from moefy.kernels.cpu_ext import cpu_ops
from moefy.kernels.slots import check_inputs, gated_activation
from moefy.kernels.weights import ExpertWeights

# Activation codes of the C++ source (enum Act).
_KNOWN_ACTIVATIONS: dict[int, Callable[[Tensor], Tensor]] = {
    1: F.silu,
    2: F.gelu,
    3: lambda v: F.gelu(v, approximate="tanh"),
    4: F.relu,
}
_act_codes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def activation_code(act: Callable[[Tensor], Tensor]) -> int:
    """The C++ code of `act` (0: not recognised), found by evaluating it on a probe, so any module
    or function that computes SiLU/GeLU/ReLU (torch's, transformers', a lambda) is recognised."""
    try:
        return _act_codes[act]
    except (KeyError, TypeError):
        pass
    probe = torch.linspace(-9.0, 9.0, 181, dtype=torch.float32)
    code = 0
    with torch.no_grad():
        try:
            got = act(probe)
        except Exception:  # an activation that rejects a plain tensor: leave it to the torch path
            got = None
        if isinstance(got, Tensor) and got.shape == probe.shape and got.dtype == probe.dtype:
            for c, ref in _KNOWN_ACTIVATIONS.items():
                if torch.allclose(got, ref(probe), rtol=1e-6, atol=1e-6):
                    code = c
                    break
    try:
        _act_codes[act] = code
    except TypeError:  # not weak-referenceable: recomputed each call
        pass
    return code


def _ops() -> Any:
    ops = cpu_ops()
    if ops is None:
        raise MoefyError("the C++ CPU expert kernels are unavailable (see the warning logged at first use)")
    return ops


class _GroupedIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor, slots: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(x, w, offsets, slots)
        ctx.k, ctx.b_dtype = k, None if b is None else b.dtype
        return _ops().grouped_in(x, w, b, offsets, slots, k)  # (T*K, S_in) fp32

    @staticmethod
    def backward(ctx: Any, dpre: Tensor) -> tuple[Tensor | None, ...]:
        x, w, offsets, slots = ctx.saved_tensors
        ops, k = _ops(), ctx.k
        dpre = dpre.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = ops.grouped_out(dpre, w, offsets, slots, k, x.shape[0]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = ops.grouped_wgrad(dpre, x, offsets, slots, k, w.shape[0]).to(w.dtype)
        if ctx.needs_input_grad[2]:
            counts = offsets[1:] - offsets[:-1]
            expert_of_slot = torch.repeat_interleave(torch.arange(w.shape[0]), counts)
            db = dpre.new_zeros(w.shape[0], w.shape[1]).index_add_(0, expert_of_slot, dpre[slots]).to(ctx.b_dtype)
        return dx, dw, db, None, None, None


class _GroupedOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, w: Tensor, offsets: Tensor, slots: Tensor, k: int, tokens: int) -> Tensor:
        ctx.save_for_backward(a, w, offsets, slots)
        ctx.k = k
        return _ops().grouped_out(a, w, offsets, slots, k, tokens)  # (T, D) fp32

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        a, w, offsets, slots = ctx.saved_tensors
        ops, k = _ops(), ctx.k
        dout = dout.contiguous()
        da = dw = None
        if ctx.needs_input_grad[0]:
            da = ops.grouped_in(dout, w, None, offsets, slots, k).to(a.dtype)
        if ctx.needs_input_grad[1]:
            dw = ops.grouped_wgrad(a, dout, offsets, slots, k, w.shape[0]).to(w.dtype)
        return da, dw, None, None, None, None


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


CPU_DTYPES = (torch.float32, torch.bfloat16)  # weight dtypes the C++ kernels read


def cpu_expert_ffn(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None = None) -> Tensor:
    """The expert FFN with the C++ kernels (CPU tensors, fp32 or bf16 weights); differentiable."""
    check_inputs(x, weights, idx, scale)
    if weights.w_in.dtype not in CPU_DTYPES or weights.w_out.dtype != weights.w_in.dtype:
        raise InvalidArgumentError(
            f"the cpu kernel reads float32 or bfloat16 weights, got w_in {weights.w_in.dtype} and w_out "
            f"{weights.w_out.dtype}; use the 'auto' or 'torch_grouped' kernel for other dtypes"
        )
    ops = _ops()
    w_in, w_out, b_in = weights.w_in.contiguous(), weights.w_out.contiguous(), weights.b_in
    b_in = None if b_in is None else b_in.contiguous()
    try:
        if not _needs_grad(x, w_in, w_out, b_in, scale):
            code = activation_code(weights.act)
            if code:
                return ops.fused_expert_ffn(x, w_in, b_in, w_out, idx, scale, code, weights.gated)
        offsets, slots = ops.build_groups(idx, weights.num_experts)
    except RuntimeError as err:
        if "out of range" in str(err):
            raise InvalidArgumentError(str(err).splitlines()[0]) from None
        raise
    t, k = idx.shape
    pre = _GroupedIn.apply(x, w_in, b_in, offsets, slots, k)  # (T*K, S_in) fp32
    a = gated_activation(pre, weights)  # (T*K, S)
    if scale is not None:
        a = a * scale.reshape(-1, 1)
    out = _GroupedOut.apply(a.float().contiguous(), w_out, offsets, slots, k, t)  # (T, D) fp32
    return out.to(x.dtype)


def centred_kernel_applies(x: Tensor, weights: ExpertWeights, centre: Tensor, out_init: Tensor | None = None) -> bool:
    """Whether `cpu_centred_expert_ffn` runs here: CPU tensors, fp32/bf16 weights, a recognised
    activation, no gradients needed, and the C++ library built."""
    w_in, w_out = weights.w_in, weights.w_out
    return (
        x.device.type == "cpu" and w_in.device.type == "cpu" and w_in.dtype in CPU_DTYPES
        and w_out.dtype == w_in.dtype and not _needs_grad(x, w_in, w_out, weights.b_in, centre, out_init)
        and cpu_ops() is not None and activation_code(weights.act) != 0
    )


def cpu_centred_expert_ffn(
    x: Tensor, weights: ExpertWeights, idx: Tensor, centre: Tensor, out_init: Tensor | None = None
) -> Tensor | None:
    """out_init + Σ_j (a_{idx[t, j]}(x_t) − centre[e]) W_out[e] in one C++ call (inference: no
    gradients): the MoE layer's M + Σ (v_e − m_e) with the representatives as `centre` (E, S) and
    M (D,) as `out_init` (None: 0). None where the fused C++ kernel does not apply
    (`centred_kernel_applies`): the caller then takes its general path."""
    if not centred_kernel_applies(x, weights, centre, out_init):
        return None
    check_inputs(x, weights, idx, None)
    b_in = weights.b_in
    try:
        return cpu_ops().fused_expert_ffn(
            x, weights.w_in.contiguous(), None if b_in is None else b_in.contiguous(), weights.w_out.contiguous(),
            idx, None, activation_code(weights.act), weights.gated, centre, out_init,
        )
    except RuntimeError as err:
        if "out of range" in str(err):
            raise InvalidArgumentError(str(err).splitlines()[0]) from None
        raise


def cpu_routed_expert_ffn(
    x: Tensor, weights: ExpertWeights, router: nn.Linear, x_mean: Tensor | None, x_scale: Tensor | None,
    num_shared: int, k_routed: int, centre: Tensor, out_init: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """A converted layer's inference step in one C++ call: the linear router on the standardised
    input, (x − x_mean) ⊙ x_scale, its top `k_routed` routed experts joined after the `num_shared`
    shared ones, and the centred fused expert kernel (`cpu_centred_expert_ffn`).

    Returns (out (T, D), idx (T, num_shared + k_routed) int64, logits (T, R) fp32), or None where
    the C++ path does not apply (see `centred_kernel_applies`; also a router that needs gradients or
    is not a CPU float32/bfloat16 matrix). Sums are fp32, the router's included."""
    if not routed_kernel_applies(x, weights, router, x_mean, x_scale, centre, out_init):
        return None
    w_r, b_r, b_in = router.weight, router.bias, weights.b_in
    try:
        out, idx, logits = cpu_ops().routed_expert_ffn(
            x.contiguous(), x_mean, x_scale, w_r.contiguous(), b_r, num_shared, k_routed,
            weights.w_in.contiguous(), None if b_in is None else b_in.contiguous(), weights.w_out.contiguous(),
            activation_code(weights.act), weights.gated, centre, out_init,
        )
    except RuntimeError as err:
        raise InvalidArgumentError(str(err).splitlines()[0]) from None
    return out, idx, logits


def routed_kernel_applies(
    x: Tensor, weights: ExpertWeights, router: nn.Linear, x_mean: Tensor | None, x_scale: Tensor | None,
    centre: Tensor, out_init: Tensor | None = None,
) -> bool:
    """Whether `cpu_routed_expert_ffn` runs here: `centred_kernel_applies`, and a CPU float32/bfloat16
    router matrix that needs no gradients."""
    w_r = router.weight
    return (
        centred_kernel_applies(x, weights, centre, out_init) and not _needs_grad(w_r, router.bias, x_mean, x_scale)
        and w_r.device.type == "cpu" and w_r.dtype in CPU_DTYPES
    )
