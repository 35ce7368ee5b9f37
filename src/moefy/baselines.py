"""Peer baselines measured beside moefy's MoE: CATS-style per-layer calibrated thresholding.

CATS (Lee et al., 2024) computes the gate projection in full, keeps the neurons whose
activated gate |act(x W_gateᵀ)| exceeds a per-layer threshold calibrated to a target sparsity,
and computes the up and down projections only for those. For plain FFNs the analogue keeps
neurons with |act(x W1ᵀ + b1)| above the threshold for W2 only.

This module reproduces CATS' *quality* (the kept/dropped decision is exact); it evaluates
with a dense masked product, so it is not a speed baseline. Its FLOPs are counted as the CATS
kernel would execute them: full gate, plus the kept fraction of up and down.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights, extract_ffn, swap_ffn
from moefy.specs import ArchSpec, find_blocks


def cats_keep_fraction(budget: float, gated: bool) -> float:
    """Fraction of neurons kept so the FFN FLOPs are `budget` × dense (projection FLOPs only):
    gated: (1 + 2f)/3 = budget; plain: (1 + f)/2 = budget."""
    f = (3 * budget - 1) / 2 if gated else 2 * budget - 1
    if f <= 0:
        raise InvalidArgumentError(
            f"budget {budget} is below what CATS needs for the full {'gate' if gated else 'first'} projection "
            f"({1 / 3 if gated else 1 / 2:.2f} of dense)"
        )
    return min(f, 1.0)


class ThresholdFFN(nn.Module):
    def __init__(self, ffn: FFNWeights, threshold: float) -> None:
        super().__init__()
        self.ffn = ffn
        self.threshold = threshold
        self.kept = 0
        self.seen = 0

    def forward(self, x: Tensor) -> Tensor:
        f = self.ffn
        if f.w_gate is not None:
            gate = f.act(nn.functional.linear(x, f.w_gate, f.b_gate))  # computed in full
            keep = gate.abs() > self.threshold
            a = torch.where(keep, gate * nn.functional.linear(x, f.w_up, f.b_up), torch.zeros_like(gate))
        else:
            a = f.act(nn.functional.linear(x, f.w_up, f.b_up))
            keep = a.abs() > self.threshold
            a = torch.where(keep, a, torch.zeros_like(a))
        self.kept += int(keep.sum())
        self.seen += keep.numel()
        return f.output(a)


def _gate_magnitudes(ffn: FFNWeights, x: Tensor) -> Tensor:
    if ffn.w_gate is not None:
        return ffn.act(nn.functional.linear(x, ffn.w_gate, ffn.b_gate)).abs()
    return ffn.activation(x).abs()


@torch.no_grad()
def apply_cats(model: nn.Module, spec: ArchSpec, samples: list[Tensor], budget: float) -> list[ThresholdFFN]:
    """Swap every FFN for a CATS thresholded FFN; `samples[i]` (N, D) are layer i's FFN inputs."""
    layers = []
    for (_, block), x in zip(find_blocks(model, spec), samples, strict=True):
        ffn = extract_ffn(block, spec)
        keep = cats_keep_fraction(budget, ffn.gated)
        threshold = float(torch.quantile(_gate_magnitudes(ffn, x).reshape(-1)[:2_000_000], 1 - keep))
        module = ThresholdFFN(ffn, threshold)
        swap_ffn(block, spec, module)
        layers.append(module)
    return layers
