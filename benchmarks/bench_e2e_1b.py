"""End-to-end speed of a ~1B-parameter Llama-shaped model, dense vs MoE (issue 13, item 5).

    python benchmarks/bench_e2e_1b.py --threads 1 2             # build, convert, time (minutes)
    python benchmarks/bench_e2e_1b.py --budgets 0.5 --threads 1  # one row

SmolLM2-135M is half attention, embeddings and head, so its FFN speed-up is diluted; at the shape
users convert (d = 2048, h = 8192, 16 blocks: 1.17B parameters with SmolLM2's tokenizer and
49152-token vocabulary, tied embeddings, fp32) the FFNs are most of every decode step. The model has
random weights (saved once as sharded safetensors by `bench_streaming.save_model`), so quality is
meaningless here; what is timed is the structure a default conversion gives it: 256 k-means experts
with 10% shared, a linear router, the k that the FFN FLOPs budget allows (router counted). The
conversion is search only, one uniform k, and reduced calibration (`--no-distill --no-adaptive-k`,
8 sequences, 4096 samples): distillation and per-layer k change the routers' weights and the k
of each layer, not the kernels. The budget is set at run time (`moefy bench --budget`), so one
conversion serves every row.

Each row is `moefy bench --model CKPT --no-layers --profile --budget B --threads T` in a fresh
process: greedy decoding and a prefill, dense and MoE interleaved, medians. Records go to --out as
JSON and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_streaming import save_model  # noqa: E402

from moefy.bench import cpu_name  # noqa: E402

CONVERT_FLAGS = ["--no-distill", "--no-adaptive-k", "--budget", "0.5", "--calibration-sequences", "8",
                 "--sample-size", "4096"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--models", type=Path, help="where the random model and its conversion go (default: a temporary folder)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill", default="1x256", help="ROWSxTOKENS of the prefill (default: 1x256)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "e2e" / "llama1b.json")
    args = p.parse_args()
    models = args.models or Path(tempfile.mkdtemp(prefix="moefy-e2e-1b-"))
    base, moe = models / f"llama-{args.layers}", models / f"llama-{args.layers}-moe"
    save_model(base, args.layers)
    if not (moe / "moefy.json").is_file():
        subprocess.run([sys.executable, "-m", "moefy.cli", "convert", str(base), "--out", str(moe), *CONVERT_FLAGS],
                       check=True)
    rows = []
    for threads in args.threads:
        for budget in args.budgets:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, "-m", "moefy.cli", "bench", "--model", str(moe), "--no-layers", "--profile",
                       "--budget", str(budget), "--threads", str(threads), "--new-tokens", str(args.new_tokens),
                       "--repeats", str(args.repeats), "--prefill", args.prefill, "--json", f.name]
                subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                got = json.loads(Path(f.name).read_text())
            rows.append({"budget": budget, "threads": threads, **got["end_to_end"], "profile": got.get("profile")})
            e2e = rows[-1]
            print(f"budget {budget:.2f}, {threads} thread(s): decode {e2e['decode_speedup']:.2f}x, "
                  f"prefill {e2e['prefill_speedup']:.2f}x", flush=True)
    print(f"\nCPU: {cpu_name()}; {args.layers} blocks, d=2048, h=8192, fp32\n")
    print("| budget | threads | decode tok/s dense / MoE | decode | prefill ms dense / MoE | prefill |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['budget']:.0%} | {r['threads']} | {r['dense_decode_tok_s']:.2f} / {r['moe_decode_tok_s']:.2f} "
              f"| {r['decode_speedup']:.2f}x | {r['dense_prefill_ms']:.0f} / {r['moe_prefill_ms']:.0f} "
              f"| {r['prefill_speedup']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "layers": args.layers, "convert_flags": CONVERT_FLAGS,
            "prefill": args.prefill, "new_tokens": args.new_tokens, "repeats": args.repeats, "argv": sys.argv[1:]}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
