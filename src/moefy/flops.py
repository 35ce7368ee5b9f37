"""FLOPs per token of dense and MoE FFNs, counting what the executing code really does.

A multiply-add counts 2 FLOPs (nanoGPT / Kaplan et al. convention). Per token:

* dense FFN: 2·d·h per projection (2 for plain, 3 for gated) + h for the gate product
  (gated) + h per bias;
* MoE FFN with k of n experts (S = h/n): the router, then k/n of every projection and of the
  gate products, plus the static-embedding term: k vector adds to subtract the selected m_e and
  one to add M (d each), and b_down;
* without static embeddings (the representative of every unselected expert multiplied by its
  down-projection block at run time, as in the G-MoEfication code): (n−k) extra S×d products.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FFNShape:
    d_model: int
    d_ff: int
    gated: bool
    bias_in: bool = False
    bias_out: bool = False

    @property
    def projections(self) -> int:
        return 3 if self.gated else 2


def dense_ffn_flops(shape: FFNShape) -> int:
    d, h = shape.d_model, shape.d_ff
    flops = shape.projections * 2 * d * h
    if shape.gated:
        flops += h  # act(gate) ⊙ up
    if shape.bias_in:
        flops += h * (shape.projections - 1)
    if shape.bias_out:
        flops += d
    return flops


def moe_ffn_flops(
    shape: FFNShape, num_experts: int, k: float, router_flops: int = 0, static_embeddings: bool = True
) -> float:
    """FLOPs per token with k (possibly fractional: mean of dynamic k) of n experts computed."""
    d, h = shape.d_model, shape.d_ff
    s = h // num_experts
    core = dense_ffn_flops(FFNShape(d, h, shape.gated, shape.bias_in, False)) * k / num_experts
    if static_embeddings:
        rest = d * (k + 1)  # subtract k selected m_e, add M
    else:
        rest = 2 * s * d * (num_experts - k) + d * (num_experts - k)  # r_e W_e for every unselected expert, summed
    return router_flops + core + rest + (d if shape.bias_out else 0)


def k_for_budget(shape: FFNShape, num_experts: int, budget: float, router_flops: int = 0, min_k: int = 1) -> int:
    """The largest k whose MoE FLOPs stay within `budget` × dense FLOPs (at least min_k)."""
    dense = dense_ffn_flops(shape)
    best = min_k
    for k in range(min_k, num_experts + 1):
        if moe_ffn_flops(shape, num_experts, k, router_flops) <= budget * dense:
            best = k
    return best
