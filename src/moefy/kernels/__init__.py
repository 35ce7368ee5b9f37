"""Expert kernels: compute the selected experts of an MoE FFN, and only those.

Dimension legend: T tokens, D model width, E experts, S neurons per expert, K selected slots.

Every kernel has the signature of `reference_expert_ffn` and is registered by name in
`KERNELS`; `reference` is the deliberately naive oracle every fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.kernels.cpu import cpu_expert_ffn
from moefy.kernels.decode import torch_decode_expert_ffn
from moefy.kernels.dispatch import auto_expert_ffn
from moefy.kernels.grouped import torch_grouped_expert_ffn
from moefy.kernels.reference import reference_expert_ffn
from moefy.kernels.weights import ExpertWeights

ExpertKernel = Callable[[Tensor, ExpertWeights, Tensor, Tensor | None], Tensor]

KERNELS: dict[str, ExpertKernel] = {
    "reference": reference_expert_ffn,  # the oracle: one expert, one token at a time
    "auto": auto_expert_ffn,  # the fastest kernel for the device and token count
    "cpu": cpu_expert_ffn,  # C++ block-sparse kernels (CPU; built at first use)
    "torch_decode": torch_decode_expert_ffn,  # pure torch, few tokens, embedding_bag down projection
    "torch_grouped": torch_grouped_expert_ffn,  # pure torch, batches, sort + padded bmm (GPU path)
}


def register_kernel(name: str, kernel: ExpertKernel) -> None:
    KERNELS[name] = kernel


def get_kernel(name: str) -> ExpertKernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown kernel {name!r}; available kernels: {', '.join(sorted(KERNELS))}") from None


__all__ = [
    "KERNELS",
    "ExpertKernel",
    "ExpertWeights",
    "auto_expert_ffn",
    "cpu_expert_ffn",
    "get_kernel",
    "reference_expert_ffn",
    "register_kernel",
    "torch_decode_expert_ffn",
    "torch_grouped_expert_ffn",
]
