"""SNIP-style static expert importance: a first-order (Taylor) estimate of how much the LM loss
changes when an expert is replaced by its representative, averaged over calibration text (the
static-selection baseline of `moefy compare` and benchmarks/quality_grid.py; Lee et al., "SNIP",
ICLR 2019, score |weight × gradient|, here per expert).

For token t and expert e, dropping e changes the FFN output by −(v_e − m_e); to first order
the loss changes by −⟨g_t, v_e(x_t) − m_e⟩ with g_t = ∂L/∂y_t. Since
v_e − m_e = (a_e − r_e) W_out[e], the inner product is Σ_{j∈e} (a_tj − r_j) (g_t W_out[e]ᵀ)_j.
importance_e = mean_t |that|.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moefy.conversion import moe_layers
from moefy.moe_ffn import MoEFFN
from moefy.text import TokenBatch


def taylor_importance(model: nn.Module, batches: list[TokenBatch]) -> list[Tensor]:
    """Per MoE layer, importance (E,) from LM-loss gradients on `batches` (causal LMs).
    Runs with every expert selected, so the gradients are the dense model's."""
    layers = moe_layers(model)
    saved = [(m.top_k, m.selection, m.tau) for m in layers]
    for m in layers:
        m.configure(selection="all")
    scores = [torch.zeros(m.num_experts) for m in layers]
    inputs: dict[int, Tensor] = {}
    handles = []

    def make_hooks(i: int, m: MoEFFN):
        def fwd(_mod, args, out):
            inputs[i] = args[0].detach().reshape(-1, m.d_model)
            out.register_hook(lambda g: _accumulate(i, m, g))

        return fwd

    def _accumulate(i: int, m: MoEFFN, grad: Tensor) -> None:
        g = grad.detach().reshape(-1, m.d_model)  # (T, D)
        with torch.no_grad():
            a = m.expert_weights.all_activations(inputs[i])  # (T, E, S)
            u = torch.einsum("td,esd->tes", g, m.w_out)  # (T, E, S)
            scores[i] += ((a - m.representatives) * u).sum(-1).abs().sum(0).float()

    for i, m in enumerate(layers):
        handles.append(m.register_forward_hook(make_hooks(i, m)))
    embeddings = model.get_input_embeddings()
    was = embeddings.weight.requires_grad
    embeddings.weight.requires_grad_(True)  # so gradients flow through the (frozen) blocks
    tokens = 0
    try:
        for batch in batches:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids)
            out.loss.backward()
            tokens += batch.num_tokens
    finally:
        embeddings.weight.requires_grad_(was)
        embeddings.weight.grad = None
        for h in handles:
            h.remove()
        for m, (k, sel, tau) in zip(layers, saved, strict=True):
            m.configure(top_k=k, selection=sel, tau=tau)
    return [s / max(tokens, 1) for s in scores]


def set_static_importance(model: nn.Module, importances: list[Tensor]) -> None:
    for m, imp in zip(moe_layers(model), importances, strict=True):
        imp = imp.clone()
        imp[: m.num_shared] = float("inf")
        m.importance.copy_(imp)
