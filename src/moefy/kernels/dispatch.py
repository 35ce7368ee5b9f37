"""`auto`: the fastest correct expert kernel for the inputs at hand.

CPU with fp32/bf16 weights: the C++ kernels for every batch size (one fused call for inference;
autograd Functions when gradients are needed); without them (no compiler, other dtypes) the
pure-torch paths below. Other devices: the torch decode path for a few tokens
(embedding_bag down projection) and the padded grouped path for batches.
"""

from __future__ import annotations

from torch import Tensor

from moefy.kernels.cpu import CPU_DTYPES, cpu_expert_ffn
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
