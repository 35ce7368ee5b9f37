"""Routing diagnostics of a converted model: what the routers select, against the oracle.

Legend: T tokens, E experts, S neurons per expert, D model width, K selected experts, L layers.

On held-out text, each MoE layer sees its real inputs x (those of the converted model). With
s_e = ‖(a_e − r_e) W_out[e]‖ the exact residual norm of expert e (what the oracle ranks by):

* load:            how often each expert is selected (dead: never; overloaded: > `overload_factor`
                   × the mean load);
* recall:          fraction of the oracle's top-k routed experts the layer's selection also picks;
* mass captured:   Σ_{e∈S} s_e² / Σ_e s_e², per token, averaged (1 = nothing of the residual lost);
* relative error:  ‖ŷ − y‖ / ‖y‖ of the FFN output, exact (ŷ = MoE, y = all experts), for the
                   layer's selection and for the oracle's top-k;
* loss share:      the quality loss with *only* layer i converted (every other layer running all
                   experts, i.e. exactly dense) minus the dense loss; its share of the sum over
                   layers says which layers hurt most. Loss = mean NLL in nats/token for causal
                   LMs; 1 − cosine(mean-pooled last hidden state, dense one) for encoders.

The layer-loss sweep costs L + 2 forward passes over the evaluation tokens; keep them few.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moefy.conversion import configure, moe_layers
from moefy.evaluate import perplexity
from moefy.moe_ffn import MoEFFN
from moefy.text import TokenBatch

from .store import AnalysisError

log = logging.getLogger(__name__)


@dataclass
class RoutingDiagnostics:
    model: str
    layer_names: list[str]
    num_experts: int
    top_k: int
    num_shared: int
    selection: str
    tokens: int  # tokens per layer the statistics are over
    overload_factor: float
    quality_metric: str  # "nll" (nats/token) or "1-cosine"
    dense_loss: float  # every layer running all experts (= the dense model)
    full_loss: float  # every layer converted, as configured
    load: Tensor  # (L, E) selections per expert
    recall: Tensor  # (L,) oracle top-k recall of the selection
    mass_captured: Tensor  # (L,) mean Σ_S s² / Σ s²
    oracle_mass_captured: Tensor  # (L,) same for the oracle's top-k
    relative_error: Tensor  # (L,) ‖ŷ − y‖ / ‖y‖ of the FFN output
    oracle_relative_error: Tensor  # (L,)
    mean_selected: Tensor  # (L,) experts computed per token (dynamic k aware)
    layer_loss: Tensor  # (L,) loss with only layer i converted

    @property
    def relative_load(self) -> Tensor:  # (L, E) load / mean load (1 = perfectly balanced)
        return self.load / self.load.mean(1, keepdim=True).clamp_min(1e-12)

    @property
    def dead(self) -> Tensor:  # (L,) experts never selected
        return (self.load == 0).sum(1)

    @property
    def overloaded(self) -> Tensor:  # (L,) experts above overload_factor × mean load
        return (self.relative_load > self.overload_factor).sum(1)

    @property
    def layer_delta(self) -> Tensor:  # (L,) loss increase with only layer i converted
        return self.layer_loss - self.dense_loss

    @property
    def loss_share(self) -> Tensor:  # (L,) each layer's share of the summed increases
        delta = self.layer_delta.clamp_min(0)
        return delta / delta.sum().clamp_min(1e-12)

    def summary(self) -> dict:
        return {
            "mean_recall": float(self.recall.mean()), "mean_mass_captured": float(self.mass_captured.mean()),
            "mean_relative_error": float(self.relative_error.mean()), "dead_experts": int(self.dead.sum()),
            "overloaded_experts": int(self.overloaded.sum()), "dense_loss": self.dense_loss,
            "full_loss": self.full_loss, "sum_layer_deltas": float(self.layer_delta.sum()),
            "worst_layer": self.layer_names[int(self.layer_delta.argmax())],
        }


def expert_activations(m: MoEFFN, x: Tensor) -> Tensor:
    """Every expert's neuron activations a: (T, E, S) (the MoE layer's own weights, full cost)."""
    pre = torch.einsum("td,esd->tes", x, m.w_in)  # (T, E, S_in)
    if m.b_in is not None:
        pre = pre + m.b_in
    s = m.expert_size
    return m.act(pre[..., :s]) * pre[..., s:] if m.gated else m.act(pre)


def _oracle_mask(scores: Tensor, k: int, num_shared: int) -> Tensor:
    """(T, E) bool: shared experts plus the top (k - shared) routed ones by score."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[:, :num_shared] = True
    if k > num_shared:
        top = torch.topk(scores[:, num_shared:], k - num_shared, dim=1).indices + num_shared
        mask.scatter_(1, top, True)
    return mask


def _selection_mask(idx: Tensor, num_experts: int) -> Tensor:
    """(T, K) indices with -1 for empty slots -> (T, E) bool."""
    mask = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(idx < 0, num_experts, idx), True)
    return mask[:, :num_experts]


@dataclass
class LayerRouting:
    load: Tensor  # (E,)
    recall: float
    mass: float
    oracle_mass: float
    error: float
    oracle_error: float


@torch.no_grad()
def layer_routing(m: MoEFFN, x: Tensor, chunk: int = 256) -> LayerRouting:
    """Routing statistics of one MoE layer on its inputs x (T, D)."""
    e, ns, k = m.num_experts, m.num_shared, m.top_k
    x = x.to(m.w_in.dtype)
    selected = _selection_mask(m.select(x), e)  # (T, E)
    load = selected.sum(0).float()
    sums = dict(hit=0.0, mass=0.0, omass=0.0, err=0.0, oerr=0.0, y=0.0)
    for i in range(0, x.shape[0], chunk):
        xc, sel = x[i : i + chunk], selected[i : i + chunk]
        a = expert_activations(m, xc)  # (t, E, S)
        v = torch.einsum("tes,esd->ted", a - m.representatives, m.w_out)  # (t, E, D) v_e − m_e
        s2 = v.pow(2).sum(-1)  # (t, E) squared residual norms
        oracle = _oracle_mask(s2, k, ns)
        total = s2.sum(1).clamp_min(1e-30)
        sums["mass"] += float(((s2 * sel).sum(1) / total).sum())
        sums["omass"] += float(((s2 * oracle).sum(1) / total).sum())
        sums["err"] += float((v * (~sel).unsqueeze(-1)).sum(1).pow(2).sum())
        sums["oerr"] += float((v * (~oracle).unsqueeze(-1)).sum(1).pow(2).sum())
        y = torch.einsum("tes,esd->td", a, m.w_out)  # dense FFN output (before b_out)
        if m.b_out is not None:
            y = y + m.b_out
        sums["y"] += float(y.pow(2).sum())
        if k > ns:
            sums["hit"] += float((sel & oracle)[:, ns:].sum()) / (k - ns)
        else:
            sums["hit"] += xc.shape[0]
    t = x.shape[0]
    y_norm = math.sqrt(max(sums["y"], 1e-30))
    return LayerRouting(
        load=load, recall=sums["hit"] / t, mass=sums["mass"] / t, oracle_mass=sums["omass"] / t,
        error=math.sqrt(sums["err"]) / y_norm, oracle_error=math.sqrt(sums["oerr"]) / y_norm,
    )


@torch.no_grad()
def capture_moe_inputs(model: nn.Module, batches: list[TokenBatch], max_tokens: int = 4096) -> list[Tensor]:
    """Inputs x (T, D) of every MoE layer of the (converted) model on `batches`, up to max_tokens."""
    layers = moe_layers(model)
    seen: list[list[Tensor]] = [[] for _ in layers]

    def hook(i: int):
        def pre(_m: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).detach().float()
            if sum(c.shape[0] for c in seen[i]) < max_tokens:
                seen[i].append(x)

        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s)[:max_tokens] for s in seen]


@torch.no_grad()
def _pooled(model: nn.Module, batches: list[TokenBatch]) -> Tensor:
    out = []
    for b in batches:
        hidden = model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state  # (B, L, D)
        mask = b.attention_mask.unsqueeze(-1).to(hidden.dtype)
        out.append(nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1)).float(), dim=-1))
    return torch.cat(out)


def quality_loss(model: nn.Module, batches: list[TokenBatch], causal: bool, reference: Tensor | None) -> float:
    """Mean NLL (causal) or 1 − mean cosine to the `reference` pooled embeddings (encoders)."""
    if causal:
        nll, tokens = 0.0, 0
        for b in batches:
            scored = int((b.attention_mask if b.scored is None else b.scored)[:, 1:].sum())
            nll += math.log(perplexity(model, b)) * scored
            tokens += scored
        return nll / max(tokens, 1)
    emb = _pooled(model, batches)
    if reference is None:
        return 0.0
    return float(1 - (emb * reference).sum(-1).mean())


def layer_loss_sweep(model: nn.Module, batches: list[TokenBatch], causal: bool) -> tuple[float, float, list[float]]:
    """(dense loss, fully converted loss, [loss with only layer i converted]). Restores the
    configuration of every layer afterwards."""
    layers = moe_layers(model)
    saved = [(m.selection, m.top_k, m.tau) for m in layers]

    def restore(i: int) -> None:
        sel, k, tau = saved[i]
        layers[i].configure(top_k=k, selection=sel, tau=tau)

    try:
        configure(model, selection="all")
        reference = None if causal else _pooled(model, batches)
        dense = quality_loss(model, batches, causal, reference)
        per_layer = []
        for i in range(len(layers)):
            restore(i)
            per_layer.append(quality_loss(model, batches, causal, reference))
            layers[i].configure(selection="all")
            log.info("layer %d/%d alone: loss %.4f (dense %.4f)", i + 1, len(layers), per_layer[-1], dense)
        for i in range(len(layers)):
            restore(i)
        full = quality_loss(model, batches, causal, reference)
    finally:
        for i in range(len(layers)):
            restore(i)
    return dense, full, per_layer


def routing_diagnostics(
    model: nn.Module,
    batches: list[TokenBatch],
    *,
    name: str,
    causal: bool,
    layer_names: list[str] | None = None,
    max_tokens: int = 2048,
    overload_factor: float = 2.0,
    loss_sweep: bool = True,
    loss_batches: list[TokenBatch] | None = None,
) -> RoutingDiagnostics:
    """All routing diagnostics of a converted model on held-out `batches` (the per-layer loss
    sweep on `loss_batches`, default the same batches; skipped without `loss_sweep`)."""
    layers = moe_layers(model)
    if not layers:
        raise AnalysisError("the model has no MoE layers: routing diagnostics need a converted model")
    for m in layers:
        m.reset_counters()
    inputs = capture_moe_inputs(model, batches, max_tokens)
    mean_selected = torch.tensor([m.mean_selected for m in layers])
    stats = []
    for i, (m, x) in enumerate(zip(layers, inputs, strict=True)):
        stats.append(layer_routing(m, x))
        log.info("routing layer %d/%d: recall %.3f, mass %.3f", i + 1, len(layers), stats[-1].recall, stats[-1].mass)
    if loss_sweep:
        dense, full, per_layer = layer_loss_sweep(model, loss_batches or batches, causal)
    else:
        dense, full, per_layer = float("nan"), float("nan"), [float("nan")] * len(layers)
    first = layers[0]
    return RoutingDiagnostics(
        model=name, layer_names=layer_names or [f"layer {i}" for i in range(len(layers))],
        num_experts=first.num_experts, top_k=first.top_k, num_shared=first.num_shared,
        selection=first.selection, tokens=int(inputs[0].shape[0]), overload_factor=overload_factor,
        quality_metric="nll" if causal else "1-cosine", dense_loss=dense, full_loss=full,
        load=torch.stack([s.load for s in stats]), recall=torch.tensor([s.recall for s in stats]),
        mass_captured=torch.tensor([s.mass for s in stats]), oracle_mass_captured=torch.tensor([s.oracle_mass for s in stats]),
        relative_error=torch.tensor([s.error for s in stats]),
        oracle_relative_error=torch.tensor([s.oracle_error for s in stats]), mean_selected=mean_selected,
        layer_loss=torch.tensor(per_layer),
    )
