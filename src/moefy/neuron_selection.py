"""Neuron-level selection from the exact gate projection: a quality study of the CATS-style peer.

CATS (Lee et al., 2024, "CATS: Contextually-Aware Thresholding for Sparsity in LLMs") computes
the gate projection of a gated FFN in full, keeps the neurons whose |act(x W_gateᵀ)| exceeds a
per-layer threshold calibrated to a target sparsity, and computes the up rows and down columns
of those only. For a plain FFN the analogue computes the first projection in full (which gives
a = act(x W_upᵀ + b_up) exactly) and keeps neurons for the down projection only.

Here the choice of neurons is exact, but **the FFN is evaluated as a dense product with the
dropped neurons masked: this measures quality, it is not a speed path.** FLOPs are counted, in
`moefy.flops.neuron_selection_flops`, as a gate-first kernel would execute them.

Two scores (`method`), each with its representatives r (the value a dropped neuron takes):

* `cats`: s_j = |act(g_j)|, r = 0 (Lee et al.);
* `gate-estimate`: s_j = ‖W_down[:, j]‖² · E[(a_j − r_j)² | g_j], r = E[a] (moefy): the expected
  output error of dropping neuron j given its exact gate g_j, with u_j ≈ α_j + β_j·g_j and the
  residual variance of that fit estimated per neuron on calibration inputs (`GateEstimate`).
  For a plain FFN a_j is known from g_j exactly (α = 1, β = 0, no residual).

Two selections (`selection`): `threshold` (CATS: one score threshold per layer, calibrated on
the layer's inputs so that the kept fraction matches; k varies per token) and `top-k` (the k
highest scores of every token).

Dimension legend: T tokens (any leading shape), D model width, H FFN width (neurons).

    samples = [c.sample_x for c in calibrate_blockwise(model, spec, batches, sequential=False)]
    layers = install_neuron_selection(model, spec, samples, method="cats", budget=0.75)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from moefy.conversion import ffn_shape, guard_save_pretrained
from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights, extract_ffn, swap_ffn
from moefy.flops import dense_ffn_flops, kept_fraction_for_budget, neuron_selection_flops
from moefy.specs import ArchSpec, find_blocks

log = logging.getLogger(__name__)

METHODS = ("cats", "gate-estimate")
SELECTIONS = ("threshold", "top-k")
MAX_THRESHOLD_SCORES = 4_000_000  # scores used to calibrate a threshold (evenly strided rows)


def gate_preactivation(ffn: FFNWeights, x: Tensor) -> Tensor:
    """g = x W_gateᵀ + b_gate (plain FFN: x W_upᵀ + b_up): (..., D) -> (..., H)."""
    if ffn.w_gate is not None:
        return nn.functional.linear(x, ffn.w_gate, ffn.b_gate)
    return nn.functional.linear(x, ffn.w_up, ffn.b_up)


class AbsGateScore(nn.Module):
    """CATS' score s_j = |act(g_j)| (Lee et al.); no arithmetic beyond the gate."""

    flops_per_neuron = 0

    def forward(self, g: Tensor, act_g: Tensor) -> Tensor:
        return act_g.abs()


class GateEstimate(nn.Module):
    """moefy's score s_j = ‖W_down[:, j]‖² · E[(a_j − r_j)² | g_j], fitted per neuron on one layer's
    calibration inputs (`fit_gate_estimate`); its `mean` are the representatives r. All (H,)."""

    flops_per_neuron = 9  # β·g, + α, · act(g), − r, ², act(g)², · σ², +, · ‖w‖²
    mean: Tensor
    alpha: Tensor
    beta: Tensor
    resid_var: Tensor
    w2: Tensor

    def __init__(self, *, mean: Tensor, alpha: Tensor, beta: Tensor, resid_var: Tensor, w2: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # r_j = E[a_j]
        self.register_buffer("alpha", alpha)  # u_j ≈ α_j + β_j·g_j (plain FFN: 1)
        self.register_buffer("beta", beta)  # (plain FFN: 0)
        self.register_buffer("resid_var", resid_var)  # E[(u_j − α_j − β_j·g_j)²] (plain FFN: 0)
        self.register_buffer("w2", w2)  # ‖W_down[:, j]‖²

    def forward(self, g: Tensor, act_g: Tensor) -> Tensor:
        """Scores (..., H) for gate pre-activations g and act(g), both (..., H)."""
        err = act_g * (self.alpha + self.beta * g) - self.mean
        return self.w2 * (err**2 + act_g**2 * self.resid_var)


def _float32(ffn: FFNWeights) -> FFNWeights:
    """The FFN's weights in fp32 (statistics of bf16 models are fitted in fp32)."""
    def f32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float()

    return replace(ffn, w_up=ffn.w_up.float(), w_down=ffn.w_down.float(), w_gate=f32(ffn.w_gate),
                   b_up=f32(ffn.b_up), b_gate=f32(ffn.b_gate), b_down=f32(ffn.b_down))


@torch.no_grad()
def fit_gate_estimate(ffn: FFNWeights, x: Tensor) -> GateEstimate:
    """The `GateEstimate` of one FFN from its inputs x (N, D), fitted in fp32."""
    ffn = _float32(ffn)
    x = x.to(ffn.w_up.device, torch.float32)
    g = gate_preactivation(ffn, x)  # (N, H)
    w2 = (ffn.w_down**2).sum(0)
    if ffn.w_gate is None:
        one, zero = torch.ones_like(w2), torch.zeros_like(w2)
        return GateEstimate(mean=ffn.act(g).mean(0), alpha=one, beta=zero, resid_var=zero, w2=w2)
    u = nn.functional.linear(x, ffn.w_up, ffn.b_up)  # (N, H)
    gm, um = g.mean(0), u.mean(0)
    beta = ((g - gm) * (u - um)).mean(0) / ((g - gm) ** 2).mean(0).clamp_min(1e-12)  # cov / var, both 1/N
    alpha = um - beta * gm
    resid_var = ((u - alpha - beta * g) ** 2).mean(0)
    return GateEstimate(mean=(ffn.act(g) * u).mean(0), alpha=alpha, beta=beta, resid_var=resid_var, w2=w2)


def fit_gate_estimates(model: nn.Module, spec: ArchSpec, samples: Sequence[Tensor]) -> list[GateEstimate]:
    """`fit_gate_estimate` for every block's FFN; `samples[i]` (N, D) are block i's FFN inputs."""
    blocks = find_blocks(model, spec)
    _check_count(samples, blocks)
    return [fit_gate_estimate(extract_ffn(block, spec), x) for (_, block), x in zip(blocks, samples, strict=True)]


class NeuronSelectionFFN(nn.Module):
    """x (..., D) -> y (..., D): the FFN with, per token, the selected neurons exact and the others
    at their representatives. Masked dense evaluation (quality only); counts the neurons it kept."""

    kept: Tensor
    seen: Tensor
    representatives: Tensor

    def __init__(
        self,
        ffn: FFNWeights,
        *,
        score: AbsGateScore | GateEstimate,
        representatives: Tensor | None = None,  # (H,); None: zeros (CATS)
        top_k: int | None = None,  # per-token top-k, or
        threshold: float | None = None,  # keep s > threshold
    ) -> None:
        super().__init__()
        assert (top_k is None) != (threshold is None), "exactly one of top_k and threshold"
        self.ffn = ffn  # views of the dense model's weights (not registered: the dense model owns them)
        self.score = score
        self.top_k, self.threshold = top_k, threshold
        self.mean_representatives = representatives is not None
        reps = torch.zeros(ffn.d_ff, device=ffn.w_down.device) if representatives is None else representatives
        self.register_buffer("representatives", reps.clone())
        self.register_buffer("kept", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        f = self.ffn
        g = gate_preactivation(f, x)  # (..., H), computed in full
        act_g = f.act(g)
        s = self.score(g, act_g)  # (..., H)
        keep = _top_k_mask(s, self.top_k) if self.top_k is not None else s > self.threshold
        a = act_g * nn.functional.linear(x, f.w_up, f.b_up) if f.gated else act_g
        a = torch.where(keep, a, self.representatives.to(a.dtype))  # masked: quality only
        self.kept += keep.sum()
        self.seen += keep.numel()
        return f.output(a)

    def reset_counters(self) -> None:
        self.kept.zero_()
        self.seen.zero_()

    @property
    def kept_fraction(self) -> float:
        """Mean fraction of neurons kept per token since the last reset (top-k: k/H before any input)."""
        if int(self.seen) == 0:
            return (self.top_k or 0) / self.ffn.d_ff
        return int(self.kept) / int(self.seen)

    def flops_per_token(self) -> float:
        """`neuron_selection_flops` at the kept fraction measured since the last reset."""
        return neuron_selection_flops(
            ffn_shape(self.ffn), self.kept_fraction, score_flops=self.score.flops_per_neuron * self.ffn.d_ff,
            mean_representatives=self.mean_representatives,
        )


def _top_k_mask(scores: Tensor, k: int) -> Tensor:
    """(..., H) bool, True at the k largest scores of each row."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, torch.topk(scores, k, dim=-1).indices, True)


def neuron_selection_flops_fraction(layers: Sequence[NeuronSelectionFFN]) -> float:
    """FFN FLOPs of `layers` (at their measured kept fractions) as a fraction of the dense FFNs'."""
    total = sum(m.flops_per_token() for m in layers)
    return total / sum(dense_ffn_flops(ffn_shape(m.ffn)) for m in layers)


@torch.no_grad()
def neuron_selection_ffn(
    ffn: FFNWeights,
    calibration: Tensor | GateEstimate | None,
    *,
    method: str,
    selection: str = "threshold",
    budget: float | None = None,
    kept_fraction: float | None = None,
) -> NeuronSelectionFFN:
    """A `NeuronSelectionFFN` for one FFN, keeping `kept_fraction` of its neurons or as many as fit
    in `budget` × its dense FLOPs (`kept_fraction_for_budget`). `calibration`: the layer's FFN
    inputs x (N, D); `gate-estimate` with top-k also takes a fitted `GateEstimate`, `cats` with
    top-k needs nothing."""
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown neuron selection method {method!r}; valid: {', '.join(METHODS)}")
    if selection not in SELECTIONS:
        raise InvalidArgumentError(f"unknown neuron selection {selection!r}; valid: {', '.join(SELECTIONS)}")
    if (budget is None) == (kept_fraction is None):
        raise InvalidArgumentError(f"give exactly one of budget ({budget}) and kept_fraction ({kept_fraction})")
    samples = calibration if isinstance(calibration, Tensor) else None
    if selection == "threshold" and samples is None:
        raise InvalidArgumentError(
            f"threshold selection calibrates on the layer's FFN inputs (N, D), got {type(calibration).__name__}"
        )
    score: AbsGateScore | GateEstimate = AbsGateScore()
    if method == "gate-estimate":
        if isinstance(calibration, GateEstimate):
            score = calibration
        elif samples is not None:
            score = fit_gate_estimate(ffn, samples)
        else:
            raise InvalidArgumentError(
                f"gate-estimate needs the layer's FFN inputs (N, D) or a fitted GateEstimate, got {type(calibration).__name__}"
            )
    reps = score.mean if isinstance(score, GateEstimate) else None
    h = ffn.d_ff
    if kept_fraction is None:
        assert budget is not None
        kept_fraction = kept_fraction_for_budget(
            ffn_shape(ffn), budget, score_flops=score.flops_per_neuron * h, mean_representatives=reps is not None
        )
    elif not 0.0 <= kept_fraction <= 1.0:
        raise InvalidArgumentError(f"kept_fraction {kept_fraction} is outside [0, 1]")
    if selection == "top-k":
        k = math.floor(kept_fraction * h + 1e-9)
        return NeuronSelectionFFN(ffn, score=score, representatives=reps, top_k=k)
    assert samples is not None  # checked above
    threshold = _calibrated_threshold(ffn, score, samples, kept_fraction)
    return NeuronSelectionFFN(ffn, score=score, representatives=reps, threshold=threshold)


@torch.no_grad()
def _calibrated_threshold(ffn: FFNWeights, score: nn.Module, x: Tensor, kept_fraction: float) -> float:
    """The score threshold above which `kept_fraction` of the scores on x (N, D) lie."""
    rows = max(1, MAX_THRESHOLD_SCORES // ffn.d_ff)
    x = x[:: math.ceil(x.shape[0] / rows)].to(ffn.w_up.device, ffn.w_up.dtype)  # evenly strided, ≤ rows
    g = gate_preactivation(ffn, x)
    s = score(g, ffn.act(g)).float().reshape(-1)
    drop = round((1.0 - kept_fraction) * s.numel())
    if drop <= 0:
        return -math.inf
    if drop >= s.numel():
        return math.inf
    return float(s.kthvalue(drop).values)


def install_neuron_selection(
    model: nn.Module,
    spec: ArchSpec,
    samples_or_estimates: Sequence[Tensor | GateEstimate | None],
    *,
    method: str,
    selection: str = "threshold",
    budget: float | None = None,
    kept_fraction: float | None = None,
) -> list[NeuronSelectionFFN]:
    """Swap every FFN of `model` (blocks by `spec`) for a `NeuronSelectionFFN`; item i of
    `samples_or_estimates` calibrates block i (see `neuron_selection_ffn`). All modules are built
    before any is swapped in. Returns them in block order."""
    blocks = find_blocks(model, spec)
    _check_count(samples_or_estimates, blocks)
    modules = [
        neuron_selection_ffn(extract_ffn(block, spec), calib, method=method, selection=selection,
                             budget=budget, kept_fraction=kept_fraction)
        for (_, block), calib in zip(blocks, samples_or_estimates, strict=True)
    ]
    for (name, block), module in zip(blocks, modules, strict=True):
        swap_ffn(block, spec, module)
        log.debug("%s: %s", name, f"top-{module.top_k}" if module.top_k is not None else f"threshold {module.threshold:.4g}")
    guard_save_pretrained(model)  # transformers would reload the swapped FFNs as random MLPs
    log.info("installed %s (%s) neuron selection in %d FFNs", method, selection, len(modules))
    return modules


def _check_count(per_layer: Sequence, blocks: list) -> None:
    if len(per_layer) != len(blocks):
        raise InvalidArgumentError(f"got calibration for {len(per_layer)} layers; the model has {len(blocks)} FFN blocks")
