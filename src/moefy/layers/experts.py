"""Trainable experts: the expert-major weights of `moefy.kernels.ExpertWeights` as nn.Parameters.

Dimension legend: E experts, S neurons per expert, S_in = S (plain) or 2S (gated: gate rows, then up
rows), D model width.

Expert e computes v_e(x) = a_e(x) W_out[e] with a_e(x) = act(x W_in[e]ᵀ + b_in[e]) (plain) or
act(x W_gate[e]ᵀ) ⊙ (x W_up[e]ᵀ) (gated). With `normalize` set, the expert's output is its direction
e = v / ‖v‖ ("l2") or v / rms(v) ("rms", RMSNorm without gain, so ‖e‖ = √D) — the normalised experts of
the geometric MoE (seed 002), whose norms the router predicts.

`weights()` hands the parameters themselves (no copies) to the expert kernels, so gradients flow.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError
from moefy.kernels import ExpertWeights

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}

EXPERT_NORMS = ("l2", "rms")


def check_expert_norm(normalize: str | None) -> None:
    if normalize is not None and normalize not in EXPERT_NORMS:
        raise InvalidArgumentError(
            f"unknown expert normalisation {normalize!r}; valid: {', '.join(EXPERT_NORMS)} or None"
        )


def normalize_expert_output(v: Tensor, normalize: str, eps: float = 1e-8) -> Tensor:
    """(..., D) -> (..., D): v / ‖v‖ ("l2") or v / sqrt(mean(v²)) ("rms"). Zero rows (empty slots) stay 0."""
    check_expert_norm(normalize)
    sq = v.pow(2).sum(-1, keepdim=True) if normalize == "l2" else v.pow(2).mean(-1, keepdim=True)
    return v * torch.rsqrt(sq + eps)


class Experts(nn.Module):
    """E equal experts of S neurons in one stacked parametrisation (gpt-fast / megablocks style)."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        expert_size: int,
        *,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        gated: bool = False,
        bias: bool = False,
        normalize: str | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if num_experts < 1 or expert_size < 1 or d_model < 1:
            raise InvalidArgumentError(
                f"num_experts={num_experts}, d_model={d_model}, expert_size={expert_size}: all must be >= 1"
            )
        check_expert_norm(normalize)
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise InvalidArgumentError(
                    f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)} (or pass a callable)"
                )
            activation = ACTIVATIONS[activation]
        self.act = activation
        self.gated, self.normalize = gated, normalize
        s_in = 2 * expert_size if gated else expert_size
        self.w_in = nn.Parameter(torch.randn(num_experts, s_in, d_model) * init_std)  # (E, S_in, D)
        self.w_out = nn.Parameter(torch.randn(num_experts, expert_size, d_model) * init_std)  # (E, S, D)
        self.b_in = nn.Parameter(torch.zeros(num_experts, s_in)) if bias else None  # (E, S_in)

    @classmethod
    def from_expert_weights(cls, weights: ExpertWeights, *, normalize: str | None = None) -> Experts:
        """Trainable experts initialised from (a copy of) existing expert-major weights, e.g. a converted FFN."""
        e, s, d = weights.w_out.shape
        experts = cls(e, d, s, activation=weights.act, gated=weights.gated, bias=weights.b_in is not None,
                      normalize=normalize)
        with torch.no_grad():
            experts.w_in.copy_(weights.w_in)
            experts.w_out.copy_(weights.w_out)
            if weights.b_in is not None:
                assert experts.b_in is not None
                experts.b_in.copy_(weights.b_in)
        return experts

    @property
    def num_experts(self) -> int:
        return self.w_out.shape[0]

    @property
    def expert_size(self) -> int:
        return self.w_out.shape[1]

    @property
    def d_model(self) -> int:
        return self.w_out.shape[2]

    def weights(self) -> ExpertWeights:
        """The kernels' view of these parameters (the Parameters themselves: differentiable)."""
        return ExpertWeights(w_in=self.w_in, w_out=self.w_out, act=self.act, gated=self.gated, b_in=self.b_in)

    def flops_per_assignment(self) -> int:
        """Multiply-adds × 2 of one expert on one token: x W_inᵀ (2·D·S_in) and a W_out (2·S·D)."""
        return 2 * self.d_model * (self.w_in.shape[1] + self.expert_size)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, expert_size={self.expert_size}, d_model={self.d_model}, "
            f"gated={self.gated}, normalize={self.normalize!r}"
        )
