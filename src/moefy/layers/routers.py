"""Routers: score every expert for every token and pick the k to run (seed 001, seed 002).

Dimension legend: T tokens, D model width, E experts, K selected experts per token.

* `TopKRouter` — softmax gate s = x W_gᵀ, p = softmax(s), keep the top k. Weights are the kept
  probabilities, renormalised to sum to 1 (Mixtral; `mixtral_router`) or not (Switch Transformer,
  top-1: `switch_router`, where renormalising would make every weight 1 and starve the gate of
  gradient).
* `NoisyTopKRouter` — Shazeer et al. 2017, "Outrageously Large Neural Networks": while training,
  H = x W_gᵀ + ε · softplus(x W_noiseᵀ), ε ~ N(0, 1); keep the top k of H, softmax over them.
* `GeometricRouter` — seed 002 (Su, "MoE环游记: 从几何意义出发"): an FFN is a sum of n expert vectors,
  and the k of largest norm approximate it best. Experts are normalised (e_i = v_i / ‖v_i‖, or RMS-
  normalised without gain; see `Experts(normalize=...)`), and the router *predicts each expert's norm*
  ρ_i = act(x W_gᵀ) with a non-normalised activation (sigmoid, ReLU, softplus). Output Σ_{top-k} ρ_i e_i.

Routers hold no state besides their parameters: each call returns a `RouterOutput` carrying everything
the balance and z-losses need (see `moefy.layers.losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError

NORM_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
}


@dataclass
class RouterOutput:
    """What one routing step decided, and what its losses need."""

    idx: Tensor  # (T, K) int64: selected experts, distinct within a row, best first
    weights: Tensor  # (T, K): the factor each selected expert's output is multiplied by
    logits: Tensor  # (T, E): raw gate scores x W_gᵀ the selection was made on (z-loss input)
    probs: Tensor  # (T, E): routing distribution, rows sum to 1 (balance-loss input P_i; geometric: ρ / Σ ρ)
    clean_logits: Tensor | None = None  # (T, E): noisy router only, scores before noise
    noise_std: Tensor | None = None  # (T, E): noisy router only, softplus(x W_noiseᵀ)

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def top_k(self) -> int:
        return self.idx.shape[-1]

    def dense_weights(self) -> Tensor:
        """The gate vector G(x) of Shazeer et al.: weights scattered into (T, E), zero elsewhere."""
        return torch.zeros_like(self.probs).scatter(1, self.idx, self.weights.to(self.probs.dtype))


@runtime_checkable
class Router(Protocol):
    """Anything that maps tokens (T, D) to a `RouterOutput` for `num_experts` experts, `top_k` per token."""

    num_experts: int
    top_k: int

    def __call__(self, x: Tensor) -> RouterOutput: ...


def check_top_k(top_k: int, num_experts: int) -> None:
    if num_experts < 1:
        raise InvalidArgumentError(f"num_experts={num_experts} is invalid; it must be at least 1")
    if not 1 <= top_k <= num_experts:
        raise InvalidArgumentError(
            f"top_k={top_k} is invalid for num_experts={num_experts}; top_k must be in 1..{num_experts}"
        )


def _gate(d_model: int, num_experts: int, init_std: float) -> nn.Linear:
    gate = nn.Linear(d_model, num_experts, bias=False)
    nn.init.normal_(gate.weight, std=init_std)
    return gate


def _softmax_top_k(logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """probs (T, E), idx (T, K), weights (T, K) of a softmax gate; computed in fp32 for stability."""
    probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
    top, idx = torch.topk(probs, top_k, dim=-1)  # (T, K), (T, K)
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return probs, idx, top


class TopKRouter(nn.Module):
    """Softmax top-k gate: p = softmax(x W_gᵀ); keep the k largest; weights p (renormalised if asked)."""

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, *, renormalize: bool = True, init_std: float = 0.02
    ) -> None:
        super().__init__()
        check_top_k(top_k, num_experts)
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = _gate(d_model, num_experts, init_std)  # W_g: (E, D)

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.gate(x)  # (T, E)
        probs, idx, weights = _softmax_top_k(logits, self.top_k, self.renormalize)
        return RouterOutput(idx=idx, weights=weights, logits=logits, probs=probs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"


def switch_router(d_model: int, num_experts: int, *, init_std: float = 0.02) -> TopKRouter:
    """Switch Transformer (Fedus et al. 2021): top-1, the expert's output scaled by its probability."""
    return TopKRouter(d_model, num_experts, 1, renormalize=False, init_std=init_std)


def mixtral_router(d_model: int, num_experts: int, top_k: int = 2, *, init_std: float = 0.02) -> TopKRouter:
    """Mixtral (Jiang et al. 2024): top-2, softmax over the two kept logits (= renormalised probs)."""
    return TopKRouter(d_model, num_experts, top_k, renormalize=True, init_std=init_std)


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017). Noise only in training; both gates start at zero,
    as in the paper, so routing starts uniform and the noise breaks the ties."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, renormalize: bool = True) -> None:
        super().__init__()
        check_top_k(top_k, num_experts)
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = _gate(d_model, num_experts, 0.0)  # W_g: (E, D)
        self.noise = _gate(d_model, num_experts, 0.0)  # W_noise: (E, D)

    def forward(self, x: Tensor) -> RouterOutput:
        clean = self.gate(x)  # (T, E)
        noise_std = F.softplus(self.noise(x))  # (T, E)
        logits = clean + torch.randn_like(clean) * noise_std if self.training else clean
        probs, idx, weights = _softmax_top_k(logits, self.top_k, self.renormalize)
        return RouterOutput(
            idx=idx, weights=weights, logits=logits, probs=probs, clean_logits=clean, noise_std=noise_std
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"


class GeometricRouter(nn.Module):
    """Norm-predicting router of seed 002: ρ = act(x W_gᵀ + b), keep the k experts of largest ρ,
    weights ρ (not normalised: ρ_i is the predicted norm of expert i's output, not a probability).

    Pair it with experts whose outputs are normalised (`Experts(normalize="rms" | "l2")`), so that the
    MoE output is Σ_{top-k} ρ_i e_i. `probs` (for balance losses) is ρ / Σ ρ.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "softplus",
        init_std: float = 0.02,
        eps: float = 1e-9,
    ) -> None:
        super().__init__()
        check_top_k(top_k, num_experts)
        if activation not in NORM_ACTIVATIONS:
            raise InvalidArgumentError(
                f"unknown norm activation {activation!r}; valid: {', '.join(NORM_ACTIVATIONS)}"
            )
        self.num_experts, self.top_k, self.activation, self.eps = num_experts, top_k, activation, eps
        self.gate = nn.Linear(d_model, num_experts)  # W_g: (E, D), b: (E,)
        nn.init.normal_(self.gate.weight, std=init_std)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.gate(x)  # (T, E)
        rho = NORM_ACTIVATIONS[self.activation](logits.float())  # (T, E), predicted norms ≥ 0
        weights, idx = torch.topk(rho, self.top_k, dim=-1)  # (T, K)
        probs = rho / rho.sum(dim=-1, keepdim=True).clamp_min(self.eps)
        return RouterOutput(idx=idx, weights=weights, logits=logits, probs=probs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}"
