"""Auxiliary router losses, as pure functions of a `RouterOutput`'s tensors (seed 001).

Dimension legend: T tokens, E experts, K selected experts per token.

* `switch_balance_loss` — Switch Transformer (Fedus et al. 2021, eq. 4): N · Σ_i f_i P_i, with f_i
  the fraction of routed (token, slot) assignments that went to expert i and P_i the mean router
  probability of expert i. Uniform routing gives its minimum, 1; routing everything to one expert
  with certainty gives N. (For k > 1, f counts all k slots and is normalised to sum to 1, so the
  minimum stays 1 for every k; Hugging Face's Mixtral loss sums f over slots instead and gives k.)
* `importance_loss`, `load_loss` — Shazeer et al. 2017 and seed 001: CV² (squared coefficient of
  variation, variance / mean²) of each expert's importance Σ_x G(x)_i, and of its load (tokens
  received; seed 001's L_aux = α · CV(expert_tokens)²). Uniform routing gives the minimum, 0. The
  token count is not differentiable; `smooth_load` is the paper's differentiable estimate for the
  noisy router.
* `router_z_loss` — ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of (logsumexp_i s_i)²; keeps
  the gate logits small so the softmax stays in a numerically safe range.

The coefficients (α = 1e-2 for balance, 1e-3 for z in the papers) are the caller's to apply.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(idx: Tensor, num_experts: int) -> Tensor:
    """(T, K) int64 with -1 for empty slots -> (E,) float: (token, slot) assignments per expert."""
    flat = idx.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=num_experts).float()


def load_fractions(idx: Tensor, num_experts: int) -> Tensor:
    """f: (E,) fraction of assignments per expert, summing to 1 (all zeros if nothing is routed)."""
    counts = expert_counts(idx, num_experts)
    return counts / counts.sum().clamp_min(1.0)


def switch_balance_loss(probs: Tensor, idx: Tensor) -> Tensor:
    """N · Σ_i f_i P_i. probs: (T, E) router distribution; idx: (T, K) selected experts.

    Gradient flows through P only (f is a count), as in the paper."""
    num_experts = probs.shape[-1]
    f = load_fractions(idx, num_experts).to(probs.dtype)  # (E,)
    p = probs.mean(dim=0)  # (E,)
    return num_experts * torch.dot(f, p)


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation of a 1-D tensor: population variance / mean²."""
    values = values.float()
    return values.var(correction=0) / (values.mean() ** 2 + eps)


def importance_loss(idx: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """CV² of expert importance Σ_x G(x)_i, G(x) the (T, E) gate vector (weights at idx, 0 elsewhere).

    idx: (T, K) with -1 for empty slots (contribute nothing); weights: (T, K)."""
    keep = idx >= 0
    flat_idx = torch.where(keep, idx, 0).reshape(-1)
    flat_w = torch.where(keep, weights, torch.zeros_like(weights)).reshape(-1).float()
    importance = torch.zeros(num_experts, dtype=flat_w.dtype, device=flat_w.device).index_add(0, flat_idx, flat_w)
    return cv_squared(importance)


def load_loss(load: Tensor) -> Tensor:
    """CV² of expert load (E,): token counts (`expert_counts`) or the differentiable `smooth_load`."""
    return cv_squared(load)


def smooth_load(clean_logits: Tensor, logits: Tensor, noise_std: Tensor, top_k: int) -> Tensor:
    """Shazeer et al. 2017, appendix A: Load_i = Σ_x P(x, i), the probability that expert i would still
    be selected if only its own noise were redrawn: Φ((clean_i − kth_excluding_i) / noise_std_i).

    clean_logits, logits (noisy, the ones selection used), noise_std: (T, E). Returns (E,)."""
    num_experts = logits.shape[-1]
    if top_k >= num_experts:  # every expert is always selected
        return torch.full((num_experts,), float(logits.shape[0]), device=logits.device)
    top = torch.topk(logits, top_k + 1, dim=-1).values  # (T, K+1)
    threshold_if_in = top[:, top_k : top_k + 1]  # (T, 1): k-th best of the others when i is in the top k
    threshold_if_out = top[:, top_k - 1 : top_k]  # (T, 1): k-th best overall when i is out
    is_in = logits > threshold_if_in  # (T, E)
    normal = torch.distributions.Normal(0.0, 1.0)
    std = noise_std.clamp_min(1e-9)
    p_in = normal.cdf((clean_logits - threshold_if_in) / std)
    p_out = normal.cdf((clean_logits - threshold_if_out) / std)
    return torch.where(is_in, p_in, p_out).sum(dim=0)


def router_z_loss(logits: Tensor) -> Tensor:
    """mean_t (log Σ_i exp s_{t,i})². logits: (T, E) raw gate scores."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
