"""Balanced k-means for expert construction (issue 16, item 4): time per layer and objective,
the old greedy implementation (copied below, as it was before issue 16) against
`moefy.experts.balanced_kmeans`.

    python benchmarks/bench_kmeans.py                       # all configurations (the old one is slow)
    python benchmarks/bench_kmeans.py --configs smollm2      # one of them
    python benchmarks/bench_kmeans.py --skip-old             # the new implementation only

Neuron features are L2-normalised rows, as `moefy.experts` clusters them: `random` (i.i.d.
Gaussian) and `lowrank` (rank-64 Gaussian signal plus isotropic noise of the same total
energy, a stand-in for real FFN weights, whose rows are far from isotropic). The objective is
the total squared distance of the neurons to their expert's mean (lower is better); every
expert holds exactly h/E neurons in both implementations. A Markdown table goes to stdout and
`--out` writes the records as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from moefy.bench import cpu_name
from moefy.errors import InvalidArgumentError
from moefy.experts import balanced_kmeans, balanced_objective

# name: (h, d, experts)
CONFIGS = {
    "llama7b-256": (11008, 4096, 256),
    "llama7b-344": (11008, 4096, 344),  # 512 does not divide 11008 = 2^8 * 43; 344 is h/32
    "llama7b-512": (11008, 4096, 512),  # refused: shows the error
    "smollm2-256": (1536, 576, 256),
}
KINDS = ("random", "lowrank")


def old_balanced_kmeans(features: Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> Tensor:
    """`moefy.experts.balanced_kmeans` before issue 16, verbatim: a greedy assignment of the
    (point, centre) pairs in order of increasing distance, in a Python loop."""
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


def make_features(kind: str, h: int, d: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(h, d, generator=g)
    elif kind == "lowrank":
        rank = 64
        signal = torch.randn(h, rank, generator=g) @ torch.randn(rank, d, generator=g) / rank**0.5
        x = signal + torch.randn(h, d, generator=g)
    else:
        raise ValueError(kind)
    return torch.nn.functional.normalize(x, dim=1)


def _run(fn, x: Tensor, n: int, seed: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    labels = fn(x, n, seed=seed)
    seconds = time.perf_counter() - t0
    assert torch.equal(torch.bincount(labels, minlength=n), torch.full((n,), x.shape[0] // n))
    return seconds, balanced_objective(x, labels, n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-old", action="store_true", help="time the new implementation only")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}", flush=True)
    print("| config | h | d | E | features | old time (s) | old objective | new time (s) | new objective | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.configs:
        h, d, n = CONFIGS[name]
        for kind in args.kinds:
            x = make_features(kind, h, d, args.seed)
            rec: dict[str, object] = {"config": name, "h": h, "d": d, "experts": n, "features": kind}
            try:
                new_s, new_obj = _run(balanced_kmeans, x, n, args.seed)
            except InvalidArgumentError as e:
                rec["error"] = str(e)
                records.append(rec)
                print(f"| {name} | {h} | {d} | {n} | {kind} | — | — | refused: {e} | — | — |", flush=True)
                break
            rec.update(new_seconds=new_s, new_objective=new_obj)
            old = "| — | — "
            speed = "—"
            if not args.skip_old:
                old_s, old_obj = _run(old_balanced_kmeans, x, n, args.seed)
                rec.update(old_seconds=old_s, old_objective=old_obj)
                old = f"| {old_s:.1f} | {old_obj:.1f} "
                speed = f"{old_s / new_s:.0f}x"
            records.append(rec)
            print(f"| {name} | {h} | {d} | {n} | {kind} {old}| {new_s:.1f} | {new_obj:.1f} | {speed} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "seed": args.seed}
        args.out.write_text(json.dumps({"machine": meta, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
