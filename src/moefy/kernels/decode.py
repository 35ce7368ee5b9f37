"""Pure-torch expert kernel for a few tokens (decoding). The input projection gathers the rows of
the experts any token selected (their union, U experts) into one (U * S_in, D) matrix and runs one
matmul against all T tokens, then keeps each slot's own (expert, token) entries (for T <= 8 the
extra products are cheap). The down projection is one `embedding_bag` over the output rows viewed
as a (E * S, D) table, which sums the selected rows weighted by the activations without copying
them. The gather copies U input blocks; the C++ kernel (`cpu.py`) avoids that copy.

Works on any device and is differentiable by torch autograd.
Legend: T tokens, K slots, N used slots, U experts used by any token, S neurons per expert, S_in
input rows, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moefy.kernels.slots import check_expert_ids, check_inputs, gated_activation
from moefy.kernels.weights import ExpertWeights


def torch_decode_expert_ffn(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None = None) -> Tensor:
    check_inputs(x, weights, idx, scale)
    check_expert_ids(idx, weights.num_experts)
    t, k = idx.shape
    e, s, d = weights.num_experts, weights.expert_size, weights.d_model
    flat = idx.reshape(-1)
    slots = (flat >= 0).nonzero().squeeze(1)  # (N,) in token order
    experts, token = flat[slots], slots // k  # (N,), (N,)
    union, position = torch.unique(experts, return_inverse=True)  # (U,), (N,)
    w_union = weights.w_in.index_select(0, union)  # (U, S_in, D)
    pre_all = (w_union.reshape(-1, d) @ x.t()).view(union.numel(), w_union.shape[1], t)  # (U, S_in, T)
    pre = pre_all[position, :, token]  # (N, S_in)
    if weights.b_in is not None:
        pre = pre + weights.b_in.index_select(0, experts)
    a = gated_activation(pre, weights)  # (N, S)
    if scale is not None:
        a = a * scale.reshape(-1)[slots].unsqueeze(1).to(a.dtype)
    rows = (experts.unsqueeze(1) * s + torch.arange(s, device=x.device)).reshape(-1)  # (N * S,)
    bag_sizes = torch.bincount(token, minlength=t) * s  # (T,)
    offsets = torch.cumsum(bag_sizes, 0) - bag_sizes
    return F.embedding_bag(
        rows, weights.w_out.reshape(e * s, d), offsets, mode="sum", per_sample_weights=a.reshape(-1).to(x.dtype)
    )  # (T, D)
