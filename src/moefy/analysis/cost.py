"""FFN FLOPs per token of a converted model, dense vs MoE, with and without static embeddings
(G-MoEfication Figure 3 / the 58% vs 101% of mBERT).

Counts come from `moefy.flops` (multiply-add = 2 FLOPs): per layer the dense FFN, the MoE FFN
as it runs (router + k of n experts + k+1 static-vector adds), and the MoE FFN without static
embeddings (every unselected expert's r_e W_out[e] computed at run time). Oracle selection
counts as dense cost (it evaluates every expert). `k` is the layer's top_k, or the mean number
of experts it really computed when `measured` and it has run (dynamic k).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moefy.conversion import layer_flops, layer_shape, moe_layers, router_flops
from moefy.flops import dense_ffn_flops, moe_ffn_flops

from .store import AnalysisError


@dataclass
class CostBreakdown:
    model: str
    layer_names: list[str]
    num_experts: list[int]
    k: list[float]  # experts computed per token in each layer
    selection: list[str]
    dense: list[float]  # FLOPs per token, each layer
    router: list[float]
    moe_static: list[float]  # as it runs (router included)
    moe_no_static: list[float]  # the same selection without static embeddings (router included)
    curve_k_fraction: list[float]  # k / n for the sweep of the first layer's shape
    curve_static: list[float]  # MoE / dense FLOPs at each k / n, with static embeddings
    curve_no_static: list[float]  # ... without

    @property
    def totals(self) -> dict[str, float]:
        dense = sum(self.dense)
        return {
            "dense": dense, "moe_static": sum(self.moe_static), "moe_no_static": sum(self.moe_no_static),
            "router": sum(self.router), "moe_static_fraction": sum(self.moe_static) / dense,
            "moe_no_static_fraction": sum(self.moe_no_static) / dense,
        }


def cost_breakdown(model: nn.Module, *, name: str, layer_names: list[str] | None = None, measured: bool = True) -> CostBreakdown:
    layers = moe_layers(model)
    if not layers:
        raise AnalysisError("the model has no MoE layers: a cost breakdown needs a converted model")
    rows: dict[str, list] = {k: [] for k in ("n", "k", "sel", "dense", "router", "static", "no_static")}
    for m in layers:
        dense, static, no_static = layer_flops(m, measured)
        k = float(m.num_experts) if m.runs_dense else (m.mean_selected if (measured and m.tokens_seen) else float(m.top_k))
        for key, v in zip(rows, (m.num_experts, k, m.selection, dense, router_flops(m), static, no_static), strict=True):
            rows[key].append(v)
    first = layers[0]
    shape, n, r = layer_shape(first), first.num_experts, router_flops(first)
    ks = sorted({max(1, round(n * f / 16)) for f in range(1, 17)})
    dense0 = dense_ffn_flops(shape)
    return CostBreakdown(
        model=name, layer_names=layer_names or [f"layer {i}" for i in range(len(layers))],
        num_experts=rows["n"], k=rows["k"], selection=rows["sel"], dense=[float(v) for v in rows["dense"]],
        router=[float(v) for v in rows["router"]], moe_static=rows["static"], moe_no_static=rows["no_static"],
        curve_k_fraction=[k / n for k in ks], curve_static=[moe_ffn_flops(shape, n, k, r) / dense0 for k in ks],
        curve_no_static=[moe_ffn_flops(shape, n, k, r, static_embeddings=False) / dense0 for k in ks],
    )
