"""The MoE layer: a router, experts and an optional shared expert, injected, run on the expert kernels.

Dimension legend: T tokens, D model width, E experts, K selected experts per token.

    route  = router(x)                                    # idx (T, K), weights (T, K), probs, logits
    idx    = capacity(route.idx)                          # optional: overflow dropped (-1) or passed
    y      = Σ_j weights[t, j] · v_{idx[t, j]}(x_t)       # summing expert kernel (softmax / Switch MoE)
      or   = Σ_j ρ[t, j] · normalize(v_{idx[t, j]}(x_t))  # geometric MoE (seed 002): Experts(normalize=...)
    y     += shared_expert(x)                             # optional, always on

`forward` returns an `MoEOutput`: y, plus the `RouterOutput` and `CapacityResult` that the balance
losses and drop statistics need. Nothing is accumulated on the module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moefy.errors import InvalidArgumentError
from moefy.layers.capacity import OVERFLOW_POLICIES, CapacityResult, apply_capacity, expert_capacity
from moefy.layers.dispatch import per_slot_expert_outputs, resolve_kernel
from moefy.layers.experts import Experts, normalize_expert_output
from moefy.layers.routers import Router, RouterOutput


@dataclass
class MoEOutput:
    y: Tensor  # (..., D), the shape of the input
    router: RouterOutput  # over the flattened tokens (T = product of the leading dimensions)
    capacity: CapacityResult | None = None  # None when no capacity factor applied


def _check_capacity_factor(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise InvalidArgumentError(f"{name}={value} is invalid; it must be > 0 (or None for no capacity limit)")


class MoE(nn.Module):
    """Mixture-of-Experts FFN composed from its parts.

    router: any `Router` (TopKRouter, NoisyTopKRouter, GeometricRouter, ...) over experts.num_experts.
    experts: `Experts`; with `experts.normalize` set, the layer is the geometric MoE of seed 002.
    shared_expert: an always-on module (..., D) -> (..., D) added to the output, or None.
    capacity_factor / eval_capacity_factor: capacity in training / evaluation mode (None: unlimited;
      Switch Transformer trains at 1.0-1.25 and evaluates at 2.0). overflow: "drop" or "pass".
    kernel: a name in `moefy.kernels.KERNELS` (or "grouped"); None picks the fastest at call time.
    """

    def __init__(
        self,
        *,
        router: Router,
        experts: Experts,
        shared_expert: nn.Module | None = None,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        overflow: str = "drop",
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise InvalidArgumentError(
                f"the router scores {router.num_experts} experts but experts holds {experts.num_experts}"
            )
        _check_capacity_factor("capacity_factor", capacity_factor)
        _check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        if overflow not in OVERFLOW_POLICIES:
            raise InvalidArgumentError(f"unknown overflow policy {overflow!r}; valid: {', '.join(OVERFLOW_POLICIES)}")
        resolve_kernel(kernel)  # fail now on an unknown name
        self.router, self.experts, self.shared_expert = router, experts, shared_expert
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.overflow, self.kernel = overflow, kernel

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: Tensor) -> MoEOutput:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        route = self.router(x)
        idx, capacity = route.idx, None  # (T, K)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is not None:
            cap = expert_capacity(x.shape[0], self.num_experts, route.top_k, factor)
            capacity = apply_capacity(route.idx, self.num_experts, cap, self.overflow)
            idx = capacity.idx
        kernel = resolve_kernel(self.kernel)
        weights = self.experts.weights()
        scale = route.weights.to(x.dtype)  # (T, K)
        if self.experts.normalize is None:
            y = kernel(x, weights, idx, scale)  # (T, D)
        else:
            v = per_slot_expert_outputs(x, weights, idx, kernel)  # (T, K, D), 0 in empty slots
            y = (normalize_expert_output(v, self.experts.normalize) * scale.unsqueeze(-1)).sum(dim=1)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return MoEOutput(y=y.reshape(shape), router=route, capacity=capacity)

    def flops_per_token(self) -> int:
        """Active FLOPs per token (multiply-add = 2), no drops: router 2·D·E, K experts, shared expert
        not counted (its cost depends on its type), scaling and summing the K outputs 2·K·D."""
        d = self.experts.d_model
        return 2 * d * self.num_experts + self.top_k * self.experts.flops_per_assignment() + 2 * self.top_k * d

    def extra_repr(self) -> str:
        return (
            f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
            f"overflow={self.overflow!r}, kernel={self.kernel!r}"
        )
