"""FLOPs per token of dense and MoE FFNs, counting what the executing code really does.

A multiply-add counts 2 FLOPs (nanoGPT / Kaplan et al. convention). Per token:

* dense FFN: 2·d·h per projection (2 for plain, 3 for gated) + h for the gate product
  (gated) + h per bias;
* MoE FFN with k of n experts (S = h/n): the router, then k/n of every projection and of the
  gate products, plus the static-embedding term: k vector adds to subtract the selected m_e and
  one to add M (d each), and b_down;
* without static embeddings (the representative of every unselected expert multiplied by its
  down-projection block at run time, as in the G-MoEfication code): (n−k) extra S×d products;
* neuron-level selection from the exact gate (CATS, Lee et al. 2024; `moefy.neuron_selection`)
  keeping a fraction f of the h neurons: the gate (plain FFN: first projection) in full, the
  neuron scores, then f of the up rows, gate products and down columns — for a gated FFN without
  biases (1 + 2f)/3 of dense up to the h-sized terms.
"""

from __future__ import annotations

from dataclasses import dataclass

from moefy.errors import InvalidArgumentError


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


def compensation_flops(d_model: int, vector: bool, rank: int) -> int:
    """FLOPs per token of an MoE layer's learned compensation: one d-vector add for the vector c;
    2·r·d for A x, 2·d·r for B (A x) and d for its add for a rank-r path."""
    return (d_model if vector else 0) + (4 * rank * d_model + d_model if rank else 0)


def k_for_budget(shape: FFNShape, num_experts: int, budget: float, router_flops: int = 0, min_k: int = 1) -> int:
    """The largest k whose MoE FLOPs stay within `budget` × dense FLOPs (at least min_k)."""
    dense = dense_ffn_flops(shape)
    best = min_k
    for k in range(min_k, num_experts + 1):
        if moe_ffn_flops(shape, num_experts, k, router_flops) <= budget * dense:
            best = k
    return best


def neuron_selection_flops(
    shape: FFNShape, kept_fraction: float, *, score_flops: int = 0, mean_representatives: bool = False
) -> float:
    """FLOPs per token of neuron-level selection as a gate-first kernel executes it, with a fraction
    `kept_fraction` (possibly a mean over tokens) of the h neurons kept:

    * in full: the gate projection (plain FFN: the first projection, whose activation is a) and its
      bias, plus `score_flops` to score the neurons (0 for CATS' |act(gate)|);
    * per kept neuron: its down column (2d); gated also its up row (2d), up bias and gate product;
    * b_down; mean representatives r (instead of zeros): a − r per kept neuron and one d-vector add
      of M = r W_downᵀ (precomputed), as the static embeddings of `moe_ffn_flops`.

    With every neuron kept, no score and zero representatives this equals `dense_ffn_flops`."""
    d, h = shape.d_model, shape.d_ff
    full = 2 * d * h + (h if shape.bias_in else 0) + score_flops
    per_neuron = 2 * d  # down column
    if shape.gated:
        per_neuron += 2 * d + 1 + (1 if shape.bias_in else 0)  # up row, gate product, up bias
    fixed = full + (d if shape.bias_out else 0)
    if mean_representatives:
        per_neuron += 1  # a_j − r_j
        fixed += d  # + M
    return fixed + kept_fraction * h * per_neuron


def kept_fraction_for_budget(
    shape: FFNShape, budget: float, *, score_flops: int = 0, mean_representatives: bool = False
) -> float:
    """The largest kept fraction f ≤ 1 whose `neuron_selection_flops` stay within `budget` × dense
    FLOPs. Raises InvalidArgumentError when the full gate (and score) alone exceed the budget."""
    dense = dense_ffn_flops(shape)
    fixed = neuron_selection_flops(shape, 0.0, score_flops=score_flops, mean_representatives=mean_representatives)
    per_fraction = neuron_selection_flops(shape, 1.0, score_flops=score_flops, mean_representatives=mean_representatives) - fixed
    f = (budget * dense - fixed) / per_fraction
    if f <= 0:
        projection = "gate" if shape.gated else "first"
        raise InvalidArgumentError(
            f"budget {budget} is infeasible for neuron-level selection: the full {projection} projection "
            f"and the neuron scores alone cost {fixed / dense:.3f} of the dense FFN FLOPs; "
            f"use a budget above {fixed / dense:.3f}"
        )
    return min(f, 1.0)
