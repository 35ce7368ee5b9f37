"""Subcommands built on the whole pipeline: `run` (the main job), `bench`, `analyze`, `report`."""

from __future__ import annotations

import argparse
import json


def cmd_run(args: argparse.Namespace) -> int:
    """The main job on a model (default: the bundled SmolLM2-135M): evaluate it dense, convert it
    with the recommended settings, evaluate the MoE model, save it and write its report."""
    from moefy.pipeline import run_main_job

    summary = run_main_job(
        args.model, out=args.out, num_experts=args.experts, budget=args.budget, shared_fraction=args.shared,
        eval_sequences=args.eval_sequences, overwrite=args.overwrite, report=not args.no_report,
    )
    print(json.dumps(summary, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("run", help="the main job: evaluate, convert, evaluate, save, report", description=cmd_run.__doc__)
    s.add_argument("model", nargs="?", default="smollm2-135m")
    s.add_argument("--out", default="runs/smollm2-135m-moe", help="output folder (default runs/smollm2-135m-moe)")
    s.add_argument("--experts", type=int, default=None, help="experts per FFN (default: recommended for the model)")
    s.add_argument("--budget", type=float, default=0.75, help="FFN FLOPs budget, fraction of dense (default 0.75)")
    s.add_argument("--shared", type=float, default=None, help="fraction of always-on experts (default recommended)")
    s.add_argument("--eval-sequences", type=int, default=40, help="256-token windows per held-out split")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--no-report", action="store_true", help="skip the HTML report")
    s.set_defaults(func=cmd_run)
    register_bench(sub)


LAYER_SHAPES = ((576, 1536), (2048, 5632), (4096, 11008))


def cmd_bench(args: argparse.Namespace) -> int:
    """Speed, dense vs MoE, measured in one run (interleaved, medians over repeats, as ratios):
    FFN-layer latency for gated layers with random weights at batch 1 and 256 tokens, and, with
    --model CKPT, end-to-end greedy decoding tokens/s and prefill time of a converted model
    against its dense base."""
    import torch

    from moefy.bench import bench_ffn_layer

    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"threads": torch.get_num_threads(), "layers": []}
    shapes = LAYER_SHAPES[:1] if args.quick else LAYER_SHAPES
    if not args.no_layers:
        print(f"{'d':>5} {'h':>6} {'E':>4} {'k':>4} {'T':>4} {'dense ms':>9} {'moe ms':>8} {'speedup':>8} {'ideal':>6}")
        for d, h in shapes:
            for experts in (64, 256):
                for frac in (8, 4, 2):
                    for tokens in (1, 256):
                        r = bench_ffn_layer(d, h, experts, experts // frac, tokens, repeats=args.repeats)
                        results["layers"].append(r)
                        print(f"{d:>5} {h:>6} {experts:>4} {experts // frac:>4} {tokens:>4} {r['dense_ms']:>9.3f} "
                              f"{r['moe_ms']:>8.3f} {r['speedup']:>7.2f}x {r['ideal']:>5.1f}x", flush=True)
    if args.model:
        from moefy.bench_model import bench_models
        from moefy.checkpoint import load_converted
        from moefy.models import load_model
        from moefy.text import bundled_text, tokenize_text

        converted = load_converted(args.model)
        if args.budget is not None:
            from moefy.convert import configure, top_k_for_budget

            configure(converted.model, top_k=top_k_for_budget(converted.model, args.budget))
        dense = load_model(converted.base_identity["name"])
        batch = tokenize_text(bundled_text("english", "evaluation"), dense.tokenizer, 256, 4)
        e2e = bench_models(dense.model, converted.model, batch.input_ids[:1, :32], batch.input_ids,
                           new_tokens=args.new_tokens, repeats=args.repeats)
        results["end_to_end"] = e2e
        print(f"decode: dense {e2e['dense_decode_tok_s']:.1f} tok/s, MoE {e2e['moe_decode_tok_s']:.1f} tok/s "
              f"({e2e['decode_speedup']:.2f}x); prefill 4x256: dense {e2e['dense_prefill_ms']:.0f} ms, "
              f"MoE {e2e['moe_prefill_ms']:.0f} ms ({e2e['prefill_speedup']:.2f}x)")
    if args.json:
        from moefy.cli import _write_json

        _write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench", help="speed: dense vs MoE, FFN layers and end to end", description=cmd_bench.__doc__)
    s.add_argument("--model", metavar="CKPT", help="a converted folder: also benchmark decoding and prefill end to end")
    s.add_argument("--quick", action="store_true", help="only the d=576/h=1536 layer shapes")
    s.add_argument("--no-layers", action="store_true", help="skip the FFN-layer benchmark")
    s.add_argument("--repeats", type=int, default=10, help="timed repeats per configuration (median)")
    s.add_argument("--new-tokens", type=int, default=32, help="tokens to decode end to end")
    s.add_argument("--budget", type=float, help="with --model: set k for this FFN FLOPs budget (e.g. 0.5)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    s.add_argument("--json", metavar="PATH", help="write all results as JSON")
    s.set_defaults(func=cmd_bench)
