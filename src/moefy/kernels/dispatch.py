"""`auto`: the fastest correct expert kernel for the inputs at hand.

CPU with fp32/bf16 weights: the C++ kernels for every batch size (one fused call for inference;
autograd Functions when gradients are needed); without them (no compiler, other dtypes) the
pure-torch paths below. Other devices: the torch decode path for a few tokens
(embedding_bag down projection) and the padded grouped path for batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.kernels.cpu import (
    CPU_DTYPES,
    activation_code,
    centred_kernel_applies,
    cpu_centred_expert_ffn,
    cpu_expert_ffn,
)
from moefy.kernels.cpu_ext import cpu_ops
from moefy.kernels.decode import torch_decode_expert_ffn
from moefy.kernels.grouped import torch_grouped_expert_ffn
from moefy.kernels.weights import ExpertWeights

# up to this many tokens the decode path beats the padded grouped path (measured on CPU without the
# C++ kernels: 1.4-2.4x at 4 tokens, about even at 8, behind from 16 on; not measured on a GPU)
DECODE_MAX_TOKENS = 8


def auto_expert_ffn(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None = None) -> Tensor:
    on_cpu = x.device.type == "cpu" and weights.w_in.device.type == "cpu"
    readable = weights.w_in.dtype in CPU_DTYPES and weights.w_out.dtype == weights.w_in.dtype
    if on_cpu and readable and cpu_ops() is not None:
        return cpu_expert_ffn(x, weights, idx, scale)
    if x.shape[0] <= DECODE_MAX_TOKENS:
        return torch_decode_expert_ffn(x, weights, idx, scale)
    return torch_grouped_expert_ffn(x, weights, idx, scale)


log = logging.getLogger(__name__)

CENTRED_MODES = ("auto", "sparse", "dense")
# (tokens bucket, E, S, D, K, dtype, threads) -> "sparse" | "dense", measured at first use
_choices: dict[tuple[object, ...], str] = {}
# what "auto" means for batches while `pinned_centred_mode` is active (None: measured)
_pinned: str | None = None


@contextmanager
def pinned_centred_mode(mode: str = "sparse") -> Iterator[None]:
    """Within the block, `centred_expert_ffn(mode="auto")` runs `mode` for every batch instead of
    the faster of sparse/dense measured at first use: a result that feeds a saved artefact (a
    sequential search's next-block inputs) must not depend on which path a timing happened to pick,
    since the two paths agree only to rounding."""
    global _pinned
    if mode not in ("sparse", "dense"):
        raise InvalidArgumentError(f"mode={mode!r}; valid: sparse, dense")
    before, _pinned = _pinned, mode
    try:
        yield
    finally:
        _pinned = before


def dense_centred_expert_ffn(
    x: Tensor, weights: ExpertWeights, idx: Tensor, centre: Tensor, out_init: Tensor | None = None
) -> Tensor:
    """out_init + Σ_{e∈S(t)} (a_e(x_t) − centre[e]) W_out[e] by two dense GEMMs over all E experts: the
    unselected (token, expert) blocks of the centred activations are zeroed before the down
    projection. Full FLOPs; the batched fallback where the selected experts cover most of the layer."""
    t, e, s, d = x.shape[0], weights.num_experts, weights.expert_size, weights.d_model
    valid = (idx >= 0).to(x.dtype)  # (T, K)
    mask = x.new_zeros(t, e).scatter_add_(1, idx.clamp_min(0), valid)  # (T, E) 1 where selected
    ops, code = cpu_ops(), activation_code(weights.act)
    if ops is not None and code and x.device.type == "cpu" and not torch.is_grad_enabled():
        # one GEMM, one fused pass (activation, centring, mask), one GEMM with the output init folded in
        b_in = None if weights.b_in is None else weights.b_in.reshape(-1)
        pre = F.linear(x, weights.w_in.reshape(-1, d), b_in).reshape(t * e, -1)  # (T*E, S_in)
        u = ops.centred_activation(pre, centre, mask, code, weights.gated).to(x.dtype)  # (T*E, S)
        w_out = weights.w_out.reshape(e * s, d)
        if out_init is None:
            return u.reshape(t, e * s) @ w_out
        return torch.addmm(out_init.to(x.dtype), u.reshape(t, e * s), w_out)  # (T, D)
    u = (weights.all_activations(x) - centre.to(x.dtype)) * mask.unsqueeze(2)  # (T, E, S)
    y = u.reshape(t, e * s) @ weights.w_out.reshape(e * s, d)  # (T, D)
    return y if out_init is None else y + out_init.to(y.dtype)


def _timed(fn: Callable[[], Tensor | None]) -> tuple[float, Tensor | None]:
    # one thread: its CPU time (robust on a shared machine); more: wall time
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    out = fn()
    return clock() - start, out


def centred_expert_ffn(
    x: Tensor, weights: ExpertWeights, idx: Tensor, centre: Tensor, mode: str = "auto",
    out_init: Tensor | None = None,
) -> Tensor | None:
    """out_init + Σ_j (a_{idx[t, j]}(x_t) − centre[e]) W_out[e] for inference on the CPU (no
    gradients), or None where the fused C++ kernel does not apply (the caller takes its general path).

    mode "sparse": the block-sparse C++ kernel; "dense": `dense_centred_expert_ffn`; "auto": the
    sparse kernel up to DECODE_MAX_TOKENS tokens, else whichever of the two was faster the first
    time this shape (tokens rounded up to a power of two, E, S, D, K, dtype, threads) was seen.
    """
    if mode not in CENTRED_MODES:
        raise InvalidArgumentError(f"mode={mode!r}; valid: {', '.join(CENTRED_MODES)}")
    t = x.shape[0]
    if mode == "auto" and _pinned is not None:
        mode = _pinned
    if mode == "sparse" or (mode == "auto" and t <= DECODE_MAX_TOKENS):
        return cpu_centred_expert_ffn(x, weights, idx, centre, out_init)
    if not centred_kernel_applies(x, weights, centre, out_init):
        return None
    if mode == "dense":
        return dense_centred_expert_ffn(x, weights, idx, centre, out_init)
    key = (1 << max(t - 1, 0).bit_length(), *weights.w_out.shape, idx.shape[1], x.dtype, torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        # first use: run both twice, alternating, keep the faster (their outputs agree to rounding)
        runs = {
            "sparse": lambda: cpu_centred_expert_ffn(x, weights, idx, centre, out_init),
            "dense": lambda: dense_centred_expert_ffn(x, weights, idx, centre, out_init),
        }
        best: dict[str, float] = {}
        out = None
        for name in ("sparse", "dense", "dense", "sparse"):
            seconds, out = _timed(runs[name])
            best[name] = min(best.get(name, float("inf")), seconds)
        choice = _choices[key] = min(best, key=lambda n: best[n])
        log.debug("centred expert FFN %s: sparse %.2f ms, dense %.2f ms -> %s", key, 1e3 * best["sparse"],
                  1e3 * best["dense"], choice)
        return out
    if choice == "dense":
        return dense_centred_expert_ffn(x, weights, idx, centre, out_init)
    return cpu_centred_expert_ffn(x, weights, idx, centre, out_init)


def clear_centred_choices() -> None:
    """Forget the measured sparse/dense choices (e.g. after changing the thread count by hand)."""
    _choices.clear()

