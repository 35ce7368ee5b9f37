"""Input checks and slot bookkeeping shared by the expert kernels.

A slot is one (token, choice) pair of `idx` (T, K), numbered t * K + j; slot -1 entries are empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.kernels.weights import ExpertWeights


def check_inputs(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None) -> None:
    """Shape and dtype checks every kernel makes (cheap: no data is read)."""
    if x.dim() != 2 or x.shape[1] != weights.d_model:
        raise InvalidArgumentError(f"x must be (tokens, {weights.d_model}), got {tuple(x.shape)}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0] or idx.dtype != torch.int64:
        raise InvalidArgumentError(
            f"idx must be an int64 tensor of shape ({x.shape[0]}, K), got {idx.dtype} {tuple(idx.shape)}"
        )
    if scale is not None and scale.shape != idx.shape:
        raise InvalidArgumentError(f"scale must have the shape of idx {tuple(idx.shape)}, got {tuple(scale.shape)}")


def check_expert_ids(idx: Tensor, num_experts: int) -> None:
    """Every entry of idx is -1 (empty slot) or an expert id (reads idx: a device sync on GPUs)."""
    if idx.numel() and (int(idx.max()) >= num_experts or int(idx.min()) < -1):
        raise InvalidArgumentError(
            f"idx holds expert ids in [{int(idx.min())}, {int(idx.max())}]; valid are -1 (empty slot) "
            f"and 0..{num_experts - 1}"
        )


def gated_activation(pre: Tensor, weights: ExpertWeights) -> Tensor:
    """a = act(gate) ⊙ up (gated) or act(up): (..., S_in) -> (..., S)."""
    if not weights.gated:
        return weights.act(pre)
    s = weights.expert_size
    return weights.act(pre[..., :s]) * pre[..., s:]


@dataclass
class SlotGroups:
    """The used slots sorted by expert: expert `experts[i]` owns slots[starts[i] : starts[i] + counts[i]]."""

    slots: Tensor  # (N,) int64 slot ids t * K + j, grouped by expert, ascending within an expert
    experts: Tensor  # (U,) int64 active experts, ascending
    counts: Tensor  # (U,) int64 slots per active expert
    group: Tensor  # (N,) int64 position of each slot's expert in `experts`
    rank: Tensor  # (N,) int64 rank of each slot within its expert's list

    @classmethod
    def from_idx(cls, idx: Tensor, num_experts: int) -> SlotGroups:
        check_expert_ids(idx, num_experts)
        flat = idx.reshape(-1)
        slots = (flat >= 0).nonzero().squeeze(1)  # (N,)
        expert_of_slot = flat[slots]
        order = torch.argsort(expert_of_slot, stable=True)
        slots, expert_of_slot = slots[order], expert_of_slot[order]
        experts, group, counts = torch.unique_consecutive(expert_of_slot, return_inverse=True, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(slots.numel(), device=idx.device) - starts[group]
        return cls(slots=slots, experts=experts, counts=counts, group=group, rank=rank)
