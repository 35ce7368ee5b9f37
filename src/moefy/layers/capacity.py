"""Expert capacity (GShard, Lepikhin et al. 2020; Switch Transformer, Fedus et al. 2021).

Dimension legend: T tokens, E experts, K selected experts per token.

Each expert processes at most capacity = ⌈capacity_factor · T · K / E⌉ (token, slot) assignments per
batch. Assignments claim places in priority order: all first choices (slot 0) before any second
choice, and within a slot in token order — so a token loses its second expert before anyone loses
their first. Over-capacity assignments ("overflow") are then

* `"drop"`: removed (their idx becomes -1). The slot contributes nothing; inside a residual block the
  token reaches the next layer unchanged through the residual connection (Switch's "dropped token").
* `"pass"`: kept and computed anyway — capacity is measured, not enforced (dropless; e.g. at
  evaluation, or to see how much a capacity factor *would* drop).

Either way the exact overflow is counted and returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.layers.routers import check_top_k

OVERFLOW_POLICIES = ("drop", "pass")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """⌈capacity_factor · num_tokens · top_k / num_experts⌉ (at least 1 when there are tokens)."""
    if not capacity_factor > 0:  # also rejects NaN
        raise InvalidArgumentError(f"capacity_factor={capacity_factor} is invalid; it must be > 0")
    check_top_k(top_k, num_experts)
    exact = capacity_factor * num_tokens * top_k / num_experts
    return math.ceil(round(exact, 9))  # round: 1.1 · 10 / 1 is 11.000000000000002, capacity 11, not 12


@dataclass
class CapacityResult:
    idx: Tensor  # (T, K): the routing to execute; -1 where a slot was empty or dropped
    overflow: Tensor  # (T, K) bool: assignments beyond their expert's capacity
    dropped: Tensor  # (T, K) bool: assignments removed (= overflow under "drop", none under "pass")
    capacity: int
    routed_per_expert: Tensor  # (E,) int64: assignments routed to each expert, before capacity
    overflow_per_expert: Tensor  # (E,) int64

    @property
    def num_overflow(self) -> int:
        return int(self.overflow.sum())

    @property
    def num_dropped(self) -> int:
        """Assignments (token, slot) removed."""
        return int(self.dropped.sum())

    @property
    def num_tokens_dropped(self) -> int:
        """Tokens that lost every one of their routed slots (only the residual/shared path carries them)."""
        routed = (self.idx >= 0) | self.dropped
        lost_all = (self.dropped | ~routed).all(dim=1) & routed.any(dim=1)
        return int(lost_all.sum())


def position_in_expert(idx: Tensor, num_experts: int) -> Tensor:
    """(T, K) -> (T, K) int64: how many assignments to the same expert precede each one in priority
    order (slot-major, then token order); -1 for empty slots."""
    t, k = idx.shape
    flat = idx.t().reshape(-1)  # (K·T,) slot-major: priority order
    bins = torch.where(flat >= 0, flat, num_experts)  # empty slots go to an extra bin
    order = torch.argsort(bins, stable=True)  # (K·T,) grouped by expert, priority kept within a group
    counts = torch.bincount(bins, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts  # (E+1,) first sorted position of each expert
    sorted_pos = torch.arange(flat.numel(), device=idx.device) - starts[bins[order]]
    pos = torch.empty_like(flat)
    pos[order] = sorted_pos
    pos = torch.where(flat >= 0, pos, -1)
    return pos.reshape(k, t).t()


def apply_capacity(idx: Tensor, num_experts: int, capacity: int, overflow: str = "drop") -> CapacityResult:
    """Enforce (`"drop"`) or just measure (`"pass"`) a per-expert capacity on a routing idx (T, K)."""
    if overflow not in OVERFLOW_POLICIES:
        raise InvalidArgumentError(f"unknown overflow policy {overflow!r}; valid: {', '.join(OVERFLOW_POLICIES)}")
    if capacity < 0:
        raise InvalidArgumentError(f"capacity={capacity} is invalid; it must be >= 0")
    pos = position_in_expert(idx, num_experts)  # (T, K)
    over = pos >= capacity  # empty slots have pos -1: never overflow
    dropped = over if overflow == "drop" else torch.zeros_like(over)
    valid = idx >= 0
    routed = torch.bincount(idx[valid], minlength=num_experts)
    overflowed = torch.bincount(idx[over], minlength=num_experts)
    return CapacityResult(
        idx=torch.where(dropped, -1, idx),
        overflow=over,
        dropped=dropped,
        capacity=capacity,
        routed_per_expert=routed,
        overflow_per_expert=overflowed,
    )
