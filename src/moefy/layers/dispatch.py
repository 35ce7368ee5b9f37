"""Running the selected experts: which kernel, and per-slot expert outputs for the geometric MoE.

Dimension legend: T tokens, D model width, E experts, K selected slots per token, N routed slots.

The MoE layers run on the expert kernels of `moefy.kernels` (the same ones converted models use),
looked up by `resolve_kernel`: a kernel named by the caller, else the registry's fast `auto` kernel
when it is registered, else `grouped_expert_ffn` below — an eager, autograd-friendly path that groups
tokens by expert and does one matmul per expert (docs/DESIGN.md, "many tokens"), so that training works
without the fast kernels. The registry's `reference` kernel (one token at a time) is the oracle it is
tested against; it is far too slow to train with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.kernels import KERNELS, ExpertKernel, ExpertWeights, get_kernel

FAST_KERNEL = "auto"  # the registry's fast, differentiable kernel, once it is registered
GROUPED = "grouped"  # this module's eager grouped fallback


def grouped_expert_outputs(x: Tensor, weights: ExpertWeights, idx: Tensor) -> Tensor:
    """Every selected expert's own output v_{idx[t, j]}(x_t): (T, D), (T, K) -> (T, K, D); 0 in empty slots.

    Routed slots are sorted by expert, each expert runs once on its contiguous group of tokens."""
    t, k = idx.shape
    flat = idx.reshape(-1)  # (T·K,)
    slots = (flat >= 0).nonzero().squeeze(1)  # (N,) routed slots
    experts, order = flat[slots].sort(stable=True)
    slots = slots[order]  # (N,) grouped by expert
    xs = x[slots // k]  # (N, D) each slot's token
    counts = experts.bincount(minlength=weights.num_experts).tolist()  # one host sync per call
    # unbind, not w[e]: its backward stacks the E gradients once instead of adding E full-size zeros
    w_in, w_out = weights.w_in.unbind(0), weights.w_out.unbind(0)  # E × (S_in, D), E × (S, D)
    b_in = weights.b_in.unbind(0) if weights.b_in is not None else None
    outs = [
        _activation(chunk, w_in[e], None if b_in is None else b_in[e], weights) @ w_out[e]  # (n_e, D)
        for e, chunk in enumerate(xs.split(counts))
        if chunk.shape[0] > 0
    ]
    out = x.new_zeros(t * k, x.shape[1])  # (T·K, D)
    if outs:
        out = out.index_copy(0, slots, torch.cat(outs, dim=0))
    return out.view(t, k, x.shape[1])


def _activation(x: Tensor, w_in: Tensor, b_in: Tensor | None, weights: ExpertWeights) -> Tensor:
    """a_e(x) of one expert, as `ExpertWeights.expert_activation`: (n, D) -> (n, S)."""
    pre = x @ w_in.t()  # (n, S_in)
    if b_in is not None:
        pre = pre + b_in
    if not weights.gated:
        return weights.act(pre)
    gate, up = pre.chunk(2, dim=-1)
    return weights.act(gate) * up


def grouped_expert_ffn(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None = None) -> Tensor:
    """Σ_j scale[t, j] · v_{idx[t, j]}(x_t): the expert-kernel signature, computed by `grouped_expert_outputs`."""
    v = grouped_expert_outputs(x, weights, idx)  # (T, K, D)
    if scale is not None:
        v = v * scale.to(v.dtype).unsqueeze(-1)
    return v.sum(dim=1)


def resolve_kernel(name: str | None = None) -> ExpertKernel:
    """The kernel called `name`; with None, the registry's fast kernel if present, else `grouped_expert_ffn`.

    Looked up at call time, so a fast kernel registered after a module was built is still picked up."""
    if name is None:
        return KERNELS.get(FAST_KERNEL, grouped_expert_ffn)
    if name == GROUPED and name not in KERNELS:
        return grouped_expert_ffn
    if name not in KERNELS:
        raise InvalidArgumentError(
            f"unknown kernel {name!r}; available: {', '.join(sorted({*KERNELS, GROUPED}))} (or None: the fastest)"
        )
    return get_kernel(name)


def per_slot_expert_outputs(x: Tensor, weights: ExpertWeights, idx: Tensor, kernel: ExpertKernel) -> Tensor:
    """(T, D), (T, K) -> (T, K, D): each selected expert's output, unsummed, through any summing kernel:
    every (token, slot) pair becomes its own row with one slot, so the kernel's sum has one term."""
    if kernel is grouped_expert_ffn:
        return grouped_expert_outputs(x, weights, idx)
    t, k = idx.shape
    rows = x.repeat_interleave(k, dim=0)  # (T·K, D), row t·K + j is token t
    return kernel(rows, weights, idx.reshape(t * k, 1), None).view(t, k, x.shape[1])
