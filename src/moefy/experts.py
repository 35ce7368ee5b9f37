"""Expert construction: partition an FFN's h neurons into n balanced experts (h/n each).

Gate, up and down projections always share one partition (a permutation `perm` of range(h):
expert e owns neurons perm[e*S:(e+1)*S]). Methods:

* `kmeans`: balanced k-means on the L2-normalised weight rows (W1, or [W_gate | W_up] for
  gated FFNs) — MoEfication's parameter clustering.
* `coactivation`: balanced k-means on the neurons' centred activation magnitudes |a - r| over
  a calibration sample, so neurons that fire (away from their representative) together share
  an expert. No external METIS.
* `random`, `contiguous`: baselines.

Shared (always-on) experts: optionally, the `num_shared` experts made first hold the neurons
with the largest mean |a - r| (as CMoE does); they are selected for every token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights
from moefy.settings import METHODS

log = logging.getLogger(__name__)



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


def balanced_kmeans(features: Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> Tensor:
    """Cluster the rows of `features` (h, f) into equal-size clusters; returns labels (h,).

    Each iteration assigns (point, centre) pairs greedily in order of increasing distance,
    never filling a cluster beyond h/n, then recomputes centres as cluster means.
    """
    h = features.shape[0]
    size = h // num_clusters
    g = torch.Generator().manual_seed(seed)
    centres = features[torch.randperm(h, generator=g)[:num_clusters]].clone()
    labels = torch.arange(h) // size
    for _ in range(iters):
        dist = torch.cdist(features, centres)  # (h, n)
        order = torch.argsort(dist.reshape(-1))
        labels = torch.full((h,), -1, dtype=torch.long)
        fill = torch.zeros(num_clusters, dtype=torch.long)
        points, clusters = order // num_clusters, order % num_clusters
        # greedy assignment in Python over the sorted pairs is O(h n); vectorise by rounds
        assigned = 0
        for p, c in zip(points.tolist(), clusters.tolist(), strict=True):
            if labels[p] >= 0 or fill[c] >= size:
                continue
            labels[p] = c
            fill[c] += 1
            assigned += 1
            if assigned == h:
                break
        new_centres = torch.zeros_like(centres).index_add_(0, labels, features) / size
        if torch.allclose(new_centres, centres):
            break
        centres = new_centres
    return labels


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
