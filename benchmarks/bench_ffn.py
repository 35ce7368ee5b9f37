"""FFN-layer latency, dense vs MoE, for the gated layer sizes of issue 5.

    python benchmarks/bench_ffn.py --threads 1 --out results/bench_ffn.json

Dense (three F.linear) and MoE (the `--kernel` expert kernel, default `auto`) are timed
interleaved in one process; the JSON holds one record per configuration (medians, speedup,
ideal n/k) plus the machine and settings; a Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from moefy.bench import bench_ffn_layer, cpu_name, read_bandwidth_gbps

SIZES = {"576x1536": (576, 1536), "2048x5632": (2048, 5632), "4096x11008": (4096, 11008)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="d x h of the layers")
    parser.add_argument("--experts", nargs="+", type=int, default=[64, 256], help="experts per layer")
    parser.add_argument("--fractions", nargs="+", type=int, default=[8, 4, 2],
                        help="f in k/n = 1/f (k = experts / f active per token)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 256], help="tokens per call")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed repeats per configuration (0: 21 for <= 8 tokens, 5 for batches)")
    parser.add_argument("--threads", type=int, default=0, help=f"torch threads (0: all cores, {os.cpu_count()} here)")
    parser.add_argument("--kernel", default="auto", help="expert kernel name (moefy.kernels.KERNELS)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: the thread's CPU time (needs --threads 1; robust on a shared machine)")
    parser.add_argument("--warm", action="store_true",
                        help="time one copy of the weights over and over (small layers then run from cache)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    bandwidth = read_bandwidth_gbps(clock=args.clock)
    print(f"{cpu_name()}, {torch.get_num_threads()} thread(s), {args.dtype}; read bandwidth {bandwidth:.1f} GB/s\n")
    records = []
    for size in args.sizes:
        d, h = SIZES[size]
        for tokens in args.tokens:
            for num_experts in args.experts:
                for f in args.fractions:
                    repeats = args.repeats or (21 if tokens <= 8 else 5)
                    records.append(bench_ffn_layer(
                        d, h, num_experts, num_experts // f, tokens, dtype=dtype, repeats=repeats,
                        kernel=args.kernel, cold_weights=not args.warm, clock=args.clock, bandwidth_gbps=bandwidth,
                    ))

    print("| d x h | tokens | experts | k/n | dense ms | MoE ms | speedup | ideal | k=n vs dense | GB/s dense / MoE "
          "| roofline dense / MoE |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        roof = f"{r['dense_roofline']:.2f} / {r['moe_roofline']:.2f}" if r["tokens"] == 1 else "-"
        print(f"| {r['d']}x{r['h']} | {r['tokens']} | {r['num_experts']} | {r['top_k']}/{r['num_experts']} "
              f"| {r['dense_ms']:.3f} | {r['moe_ms']:.3f} | {r['speedup']:.2f}x | {r['ideal']:.0f}x "
              f"| {r['all_vs_dense']:.2f}x | {r['dense_gbps']:.1f} / {r['moe_gbps']:.1f} | {roof} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "bandwidth_gbps": bandwidth,
                "threads": torch.get_num_threads(), "torch": torch.__version__, "argv": sys.argv[1:]}
        args.out.write_text(json.dumps({"meta": meta, "results": records}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
