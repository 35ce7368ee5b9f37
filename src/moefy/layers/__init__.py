"""General MoE layers (docs/DESIGN.md, "General MoE layers"; seeds 001 and 002): routers, balance and
z-losses, expert capacity, and one MoE module composed from injected parts, running on the expert
kernels of `moefy.kernels`.

    router = mixtral_router(d_model=128, num_experts=8)            # or switch_router, GeometricRouter, ...
    experts = Experts(8, d_model=128, expert_size=256)
    moe = MoE(router=router, experts=experts, capacity_factor=1.25)
    out = moe(x)                                                   # out.y (..., D)
    aux = 1e-2 * switch_balance_loss(out.router.probs, out.router.idx) + 1e-3 * router_z_loss(out.router.logits)
"""

from moefy.layers.capacity import CapacityResult, apply_capacity, expert_capacity, position_in_expert
from moefy.layers.dispatch import grouped_expert_ffn, grouped_expert_outputs, resolve_kernel
from moefy.layers.experts import ACTIVATIONS, EXPERT_NORMS, Experts, normalize_expert_output
from moefy.layers.losses import (
    cv_squared,
    expert_counts,
    importance_loss,
    load_fractions,
    load_loss,
    router_z_loss,
    smooth_load,
    switch_balance_loss,
)
from moefy.layers.moe import MoE, MoEOutput
from moefy.layers.routers import (
    NORM_ACTIVATIONS,
    GeometricRouter,
    NoisyTopKRouter,
    Router,
    RouterOutput,
    TopKRouter,
    mixtral_router,
    switch_router,
)

__all__ = [
    "ACTIVATIONS",
    "EXPERT_NORMS",
    "NORM_ACTIVATIONS",
    "CapacityResult",
    "Experts",
    "GeometricRouter",
    "MoE",
    "MoEOutput",
    "NoisyTopKRouter",
    "Router",
    "RouterOutput",
    "TopKRouter",
    "apply_capacity",
    "cv_squared",
    "expert_capacity",
    "expert_counts",
    "grouped_expert_ffn",
    "grouped_expert_outputs",
    "importance_loss",
    "load_fractions",
    "load_loss",
    "mixtral_router",
    "normalize_expert_output",
    "position_in_expert",
    "resolve_kernel",
    "router_z_loss",
    "smooth_load",
    "switch_balance_loss",
    "switch_router",
]
