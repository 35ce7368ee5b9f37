"""Expert construction: partition an FFN's h neurons into n balanced experts (h/n each).

Gate, up and down projections always share one partition (a permutation `perm` of range(h):
expert e owns neurons perm[e*S:(e+1)*S]). Methods:

* `kmeans`: balanced k-means on the L2-normalised weight rows (W1, or [W_gate | W_up] for
  gated FFNs) — MoEfication's parameter clustering. `balanced_kmeans` is vectorised: one matmul
  and a batched auction (exactly h/n per expert) per iteration, then a Hartigan-style refinement
  (issue 16; `benchmarks/bench_kmeans.py`).
* `coactivation`: balanced k-means on the neurons' centred activation magnitudes |a - r| over
  a calibration sample, so neurons that fire (away from their representative) together share
  an expert. No external METIS.
* `random`, `contiguous`: baselines.

Shared (always-on) experts: optionally, the `num_shared` experts made first hold the neurons
with the largest mean |a - r| (as CMoE does); they are selected for every token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights
from moefy.settings import METHODS

log = logging.getLogger(__name__)

_WARMUP_STEPS = 3  # unconstrained Lloyd steps before the balanced ones
_EPS_FIRST = (1e-2, 1e-3)  # auction eps schedule (x the mean row spread of the benefits), cold start
_EPS_WARM = (1e-3,)  # ... warm-started from the previous iteration's prices
_SEQUENTIAL_TAIL = 512  # the auction's last bidders go one at a time
_MIN_GAIN = {"lloyd": 1e-4, "hartigan": 1e-3}  # a stage ends at an iteration that gains less (relative)


@dataclass
class ExpertPlan:
    perm: Tensor  # (h,) int64; expert e = neurons perm[e*S:(e+1)*S]
    num_experts: int
    num_shared: int = 0  # experts 0..num_shared-1 are always selected

    @property
    def expert_size(self) -> int:
        return self.perm.shape[0] // self.num_experts


def validate_partition(d_ff: int, num_experts: int) -> None:
    if num_experts < 1 or num_experts > d_ff:
        raise InvalidArgumentError(f"--experts {num_experts} must be between 1 and the FFN width {d_ff}")
    if d_ff % num_experts:
        divisors = [n for n in (8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768) if d_ff % n == 0]
        raise InvalidArgumentError(
            f"--experts {num_experts} does not divide the FFN width {d_ff}; experts are balanced "
            f"(h/n neurons each). Valid choices include: {divisors}"
        )


def _auction(benefit: Tensor, size: int, prices: Tensor, eps_schedule: list[float]) -> tuple[Tensor, Tensor]:
    """Assign the h rows of `benefit` (h, n) to n columns, exactly `size` rows each, maximising the
    total benefit: a vectorised (Jacobi) forward auction for the transportation problem with
    eps-scaling. Returns (labels (h,), prices (n,)); the total is within h * eps of the optimum."""
    h, n = benefit.shape
    labels = torch.empty(h, dtype=torch.long)
    if n == 1:
        return labels.fill_(0), prices
    for eps in eps_schedule:
        # each column has `size` slots; a slot's price is the bid that holds it (the column's
        # reserve price while empty); a column's price is its lowest slot
        slot_bid = prices[:, None].expand(n, size).clone()
        slot_own = torch.full((n, size), -1, dtype=torch.long)
        free = torch.arange(h)
        while free.numel() > _SEQUENTIAL_TAIL:
            top = (benefit[free] - prices).topk(2, dim=1)
            best = top.indices[:, 0]
            bid = prices[best] + (top.values[:, 0] - top.values[:, 1]) + eps
            # the columns bid on keep the `size` highest of their holders' and new bids
            order = torch.argsort(best, stable=True)
            best, bid, who = best[order], bid[order], free[order]
            first = torch.ones_like(best, dtype=torch.bool)
            first[1:] = best[1:] != best[:-1]
            row = torch.cumsum(first, 0) - 1  # group of each bid
            starts = first.nonzero().squeeze(1)
            hit = best[starts]
            rank = torch.arange(best.numel()) - starts[row]
            width = int(rank.max()) + 1
            new_bid = torch.full((hit.numel(), width), -math.inf, dtype=benefit.dtype)
            new_own = torch.full((hit.numel(), width), -1, dtype=torch.long)
            new_bid[row, rank] = bid
            new_own[row, rank] = who
            all_bid = torch.cat([slot_bid[hit], new_bid], 1)
            all_own = torch.cat([slot_own[hit], new_own], 1)
            keep = all_bid.topk(size, dim=1)  # sorted: the lowest kept bid is the new price
            kept_own = all_own.gather(1, keep.indices)
            slot_bid[hit], slot_own[hit] = keep.values, kept_own
            prices = prices.clone()
            prices[hit] = keep.values[:, -1]
            # bidders that lost and holders that were outbid bid again
            out = torch.ones(h, dtype=torch.bool)
            held = slot_own[slot_own >= 0]
            out[held] = False
            free = out.nonzero().squeeze(1)
        if free.numel():
            prices = prices.clone()
            _auction_tail(benefit.numpy(), prices.numpy(), slot_bid.numpy(), slot_own.numpy(), free.tolist(), eps)
    labels[slot_own.reshape(-1)] = torch.arange(n)[:, None].expand(n, size).reshape(-1)
    return labels, prices


def _auction_tail(
    benefit: np.ndarray, prices: np.ndarray, slot_bid: np.ndarray, slot_own: np.ndarray, free: list[int], eps: float
) -> None:
    """The auction's last bidders one at a time (Gauss-Seidel), in place: the few that remain
    bounce for many rounds, which costs far less per bid here than a vectorised round."""
    while free:
        i = free.pop()
        value = benefit[i] - prices
        best = int(value.argmax())
        top = value[best]
        value[best] = -np.inf
        col = slot_bid[best]
        slot = int(col.argmin())  # the bid beats the column's price, its lowest slot
        evicted = int(slot_own[best, slot])
        col[slot] = prices[best] + (top - value.max()) + eps
        slot_own[best, slot] = i
        prices[best] = col.min()
        if evicted >= 0:
            free.append(evicted)


def balanced_objective(features: Tensor, labels: Tensor, num_clusters: int) -> float:
    """Total squared distance of the rows of `features` to the mean of their cluster (float64)."""
    x = features.double()
    counts = torch.bincount(labels, minlength=num_clusters).clamp(min=1)
    centres = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts[:, None]
    return float(((x - centres[labels]) ** 2).sum())


def _balanced_means(x: Tensor, labels: Tensor, num_clusters: int) -> Tensor:
    """Cluster means when every cluster holds exactly h/n rows."""
    order = torch.argsort(labels, stable=True)
    return x[order].view(num_clusters, -1, x.shape[1]).mean(1)


def balanced_kmeans(features: Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> Tensor:
    """Cluster the rows of `features` (h, f) into equal-size clusters; returns labels (h,).

    Minimises the total squared distance of the rows to their cluster's mean under the constraint
    that every cluster holds exactly h/n rows. Vectorised throughout (one (h, f) x (f, n) matmul per
    iteration, and a batched auction for the assignment):

    1. a few unconstrained Lloyd steps from n random rows (`seed`) place the centres;
    2. balanced Lloyd: the best balanced assignment for the centres (`_auction`, eps-optimal), then
       the centres become the cluster means; until the objective stops improving;
    3. Hartigan-style refinement: the same, with the cost of staying in one's cluster scaled by
       s/(s-1) and of moving by s/(s+1) (s = h/n; the exact change of the objective for a single
       move, the centres moving with it), which leaves balanced Lloyd's local minima.

    `iters` bounds the balanced iterations of steps 2 and 3 together (one matmul each). The best
    labelling seen is returned; the same features and seed give the same labels.
    """
    h = features.shape[0]
    if num_clusters < 1 or num_clusters > h or h % num_clusters:
        raise InvalidArgumentError(
            f"balanced k-means needs the cluster count to divide the rows: {num_clusters} clusters "
            f"for {h} rows"
        )
    size = h // num_clusters
    x = features.detach().float().cpu().contiguous()
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgumentError("balanced k-means: the neuron features hold NaN or infinite values")
    if num_clusters == 1:
        return torch.zeros(h, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(h, generator=g)[:num_clusters]].clone()
    for _ in range(_WARMUP_STEPS):  # unconstrained Lloyd; an empty cluster keeps its centre
        near = torch.addmm((centres * centres).sum(1), x, centres.t(), alpha=-2.0).argmin(1)
        counts = torch.bincount(near, minlength=num_clusters)
        sums = torch.zeros_like(centres).index_add_(0, near, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    sq_norms = (x * x).sum(1)
    total_sq = float(sq_norms.double().sum())
    prices = torch.zeros(num_clusters)
    best_labels, best_obj = torch.arange(h) // size, math.inf
    labels: Tensor | None = None
    stages = ("lloyd", "hartigan") if size > 1 else ("lloyd",)
    budget = iters
    for stage in stages:
        stage_start = budget
        while budget > 0:
            budget -= 1
            benefit = torch.addmm((centres * centres).sum(1), x, centres.t(), alpha=2.0, beta=-1.0)  # (h, n)
            if stage == "hartigan" and labels is not None:
                cost = (sq_norms[:, None] - benefit).clamp(min=0)
                own = cost.gather(1, labels[:, None]) * (size / (size - 1))
                benefit = -(cost * (size / (size + 1))).scatter_(1, labels[:, None], own)
            spread = float((benefit.max(1).values - benefit.min(1).values).mean()) or 1.0
            cold = labels is None or (stage == "hartigan" and budget == stage_start - 1)
            schedule = [spread * e for e in (_EPS_FIRST if cold else _EPS_WARM)]
            new_labels, prices = _auction(benefit, size, prices, schedule)
            centres = _balanced_means(x, new_labels, num_clusters)
            obj = total_sq - size * float((centres.double() ** 2).sum())
            log.debug("balanced k-means, %s: objective %.6g", stage, obj)
            gained = obj < best_obj * (1 - _MIN_GAIN[stage])
            if obj < best_obj:
                best_labels, best_obj = new_labels, obj
            same = labels is not None and torch.equal(labels, new_labels)
            labels = new_labels
            if same or not gained:
                break
        labels = best_labels
        centres = _balanced_means(x, labels, num_clusters)
    return best_labels


def _neuron_features(method: str, ffn: FFNWeights, sample_a: Tensor | None, mean: Tensor | None) -> Tensor:
    if method == "kmeans":
        rows = ffn.w_up if ffn.w_gate is None else torch.cat([ffn.w_gate, ffn.w_up], dim=1)
        return torch.nn.functional.normalize(rows.float(), dim=1)
    if sample_a is None or mean is None:
        raise InvalidArgumentError("co-activation clustering needs calibration activations")
    centred = (sample_a - mean).abs().t()  # (h, N)
    return torch.nn.functional.normalize(centred.float(), dim=1)


def plan_experts(
    ffn: FFNWeights,
    num_experts: int,
    method: str = "kmeans",
    *,
    sample_a: Tensor | None = None,
    mean: Tensor | None = None,
    shared_fraction: float = 0.0,
    seed: int = 0,
) -> ExpertPlan:
    """Partition the FFN's neurons into `num_experts` balanced experts."""
    h = ffn.d_ff
    validate_partition(h, num_experts)
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown expert method {method!r}; valid: {', '.join(METHODS)}")
    if not 0.0 <= shared_fraction < 1.0:
        raise InvalidArgumentError(f"shared_fraction={shared_fraction} must be in [0, 1)")
    size = h // num_experts
    num_shared = round(shared_fraction * num_experts)
    shared = torch.empty(0, dtype=torch.long)
    rest = torch.arange(h)
    if num_shared:
        if sample_a is None or mean is None:
            raise InvalidArgumentError("shared experts need calibration activations")
        score = (sample_a - mean).abs().mean(0)  # (h,) mean |a - r|
        shared = torch.argsort(score, descending=True)[: num_shared * size]
        keep = torch.ones(h, dtype=torch.bool)
        keep[shared] = False
        rest = torch.arange(h)[keep]
    routed = num_experts - num_shared
    if method == "contiguous":
        order = rest
    elif method == "random":
        order = rest[torch.randperm(rest.shape[0], generator=torch.Generator().manual_seed(seed))]
    else:
        feats = _neuron_features(method, ffn, sample_a, mean)[rest]
        labels = balanced_kmeans(feats, routed, seed=seed)
        order = rest[torch.argsort(labels, stable=True)]
    perm = torch.cat([shared, order])
    assert perm.shape == (h,) and torch.equal(perm.sort().values, torch.arange(h))
    return ExpertPlan(perm=perm, num_experts=num_experts, num_shared=num_shared)
