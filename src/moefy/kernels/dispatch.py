"""`auto`: the fastest correct expert kernel for the inputs at hand.

CPU: the C++ kernels for every batch size (fused inference call; autograd when gradients are
needed), else the pure-torch paths. Other devices: the torch decode path for a few tokens
(embedding_bag down projection) and the padded grouped path for batches.
"""

from __future__ import annotations

from torch import Tensor

from moefy.kernels.cpu import cpu_expert_ffn
from moefy.kernels.cpu_ext import cpu_ops
from moefy.kernels.decode import torch_decode_expert_ffn
from moefy.kernels.grouped import torch_grouped_expert_ffn
from moefy.kernels.weights import ExpertWeights

DECODE_MAX_TOKENS = 8  # up to this many tokens the decode path beats the padded grouped path


def auto_expert_ffn(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None = None) -> Tensor:
    if x.device.type == "cpu" and weights.w_in.device.type == "cpu" and cpu_ops() is not None:
        return cpu_expert_ffn(x, weights, idx, scale)
    if x.shape[0] <= DECODE_MAX_TOKENS:
        return torch_decode_expert_ffn(x, weights, idx, scale)
    return torch_grouped_expert_ffn(x, weights, idx, scale)
