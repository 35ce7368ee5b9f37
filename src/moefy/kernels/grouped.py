"""Pure-torch grouped expert kernel for batches: sort the slots by expert, pad every active expert's
token list to the longest one, and run the experts as two batched matmuls (scattermoe/megablocks
"padded" layout, with the capacity set to the busiest expert so nothing is dropped).

Works on any device and is differentiable end to end by torch autograd, so it is the GPU path and
the fallback where the C++ CPU kernels are unavailable. Only active experts are computed, but
their weights are gathered into a contiguous copy for `bmm` (traffic x2 on the weights).

Legend: T tokens, K slots, D width, U active experts, C capacity (busiest expert's slot count),
S neurons per expert, S_in input rows per expert, N used slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefy.kernels.slots import SlotGroups, check_inputs, gated_activation
from moefy.kernels.weights import ExpertWeights


def torch_grouped_expert_ffn(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None = None) -> Tensor:
    check_inputs(x, weights, idx, scale)
    t, k = idx.shape
    groups = SlotGroups.from_idx(idx, weights.num_experts)
    out = torch.zeros_like(x)  # (T, D)
    if groups.slots.numel() == 0:
        return out
    u, c, d = groups.experts.numel(), int(groups.counts.max()), x.shape[1]
    token = groups.slots // k  # (N,)
    x_pad = x.new_zeros(u, c, d).index_put((groups.group, groups.rank), x[token])  # (U, C, D)
    w_in = weights.w_in.index_select(0, groups.experts)  # (U, S_in, D)
    pre = torch.bmm(x_pad, w_in.transpose(1, 2))  # (U, C, S_in)
    if weights.b_in is not None:
        pre = pre + weights.b_in.index_select(0, groups.experts).unsqueeze(1)
    a = gated_activation(pre, weights)  # (U, C, S)
    y = torch.bmm(a, weights.w_out.index_select(0, groups.experts))  # (U, C, D)
    y = y[groups.group, groups.rank]  # (N, D)
    if scale is not None:
        y = y * scale.reshape(-1)[groups.slots].unsqueeze(1).to(y.dtype)
    return out.index_add(0, token, y)
