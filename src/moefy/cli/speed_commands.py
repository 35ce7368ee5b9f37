"""Speed and training commands: bench (dense vs MoE, interleaved, medians, as ratios) and finetune
(the routers of a converted model, end to end)."""

from __future__ import annotations

import argparse

from moefy.cli.flags import add_settings, runtime_changes
from moefy.cli.output import change, check_json_path, check_text_files, write_json
from moefy.errors import CheckpointError, InvalidArgumentError
from moefy.settings import RuntimeConfig


def _check(args: argparse.Namespace) -> None:
    check_json_path(args.json)
    for flag, value in (("--repeats", args.repeats), ("--new-tokens", args.new_tokens)):
        if value < 1:
            raise InvalidArgumentError(f"{flag} {value} must be at least 1")
    if args.threads < 0:
        raise InvalidArgumentError(f"--threads {args.threads} must be >= 0 (0: torch's default)")


LAYER_SHAPES = ((576, 1536), (2048, 5632), (4096, 11008))


def prefill_shape(text: str) -> tuple[int, int]:
    """--prefill ROWSxTOKENS, e.g. 4x256 (rows 1..64, tokens 8..2048)."""
    try:
        rows, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxTOKENS, e.g. 4x256") from None
    if not (1 <= rows <= 64 and 8 <= length <= 2048):
        raise argparse.ArgumentTypeError(f"{text!r}: rows must be 1..64 and tokens 8..2048")
    return rows, length


def cmd_bench(args: argparse.Namespace) -> int:
    """Speed, dense vs MoE, measured in one run (interleaved, medians over repeats, as ratios):
    FFN-layer latency for gated layers with random weights at batch 1 and 256 tokens, with the
    machine's read bandwidth and each side's roofline fraction, and, with --model CKPT, end-to-end
    greedy decoding tokens/s and prefill time of a converted model against its dense base (with
    --profile, a per-layer breakdown of a decode step)."""
    _check(args)
    changes = runtime_changes(args)
    if changes and not args.model:
        raise InvalidArgumentError("--top-k/--budget/--selection/--kernel need --model CKPT")
    if args.profile and not args.model:
        raise InvalidArgumentError("--profile needs --model CKPT")
    import torch

    from moefy.bench import bench_ffn_layer, cpu_name, read_bandwidth_gbps

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise InvalidArgumentError(f"--clock cpu needs --threads 1 (now {torch.get_num_threads()} threads)")
    results: dict = {"threads": torch.get_num_threads(), "cpu": cpu_name(), "layers": []}
    shapes = LAYER_SHAPES[:1] if args.quick else LAYER_SHAPES
    dtype = getattr(torch, args.dtype)
    print(f"CPU: {results['cpu']}, {torch.get_num_threads()} thread(s), {args.dtype}")
    if not args.no_layers:
        bandwidth = results["bandwidth_gbps"] = read_bandwidth_gbps(clock=args.clock)
        print(f"read bandwidth (256 MiB sum): {bandwidth:.1f} GB/s; roofline = weight bytes / time / the rate of a "
              "sum over the same weights")
        print(f"{'d':>5} {'h':>6} {'E':>4} {'k':>4} {'T':>4} {'dense ms':>9} {'moe ms':>8} {'speedup':>8} {'ideal':>6} "
              f"{'k=n/dense':>9} {'roofline dense/moe':>18}")
        for d, h in shapes:
            for experts in (64, 256):
                for frac in (8, 4, 2):
                    for tokens in (1, 256):
                        r = bench_ffn_layer(d, h, experts, experts // frac, tokens, dtype=dtype, repeats=args.repeats,
                                            clock=args.clock, bandwidth_gbps=bandwidth)
                        results["layers"].append(r)
                        roof = f"{r['dense_roofline']:.2f} / {r['moe_roofline']:.2f}" if tokens == 1 else "-"
                        print(f"{d:>5} {h:>6} {experts:>4} {experts // frac:>4} {tokens:>4} {r['dense_ms']:>9.3f} "
                              f"{r['moe_ms']:>8.3f} {r['speedup']:>7.2f}x {r['ideal']:>5.1f}x "
                              f"{r['all_vs_dense']:>8.2f}x {roof:>18}", flush=True)
    if args.model:
        from moefy.bench_model import bench_models
        from moefy.models import load_model
        from moefy.moe_model import MoEModel
        from moefy.text import bundled_text, tokenize_text

        converted = MoEModel.from_pretrained(args.model, base=args.base).configure(**changes)
        dense = load_model(converted.loaded.source)
        rows, length = args.prefill
        batch = tokenize_text(bundled_text("english", "evaluation"), dense.tokenizer, max(length, 32), rows)
        prefill = batch.input_ids[:, :length]
        prompt = batch.input_ids[:1, :32]
        if args.profile:
            from moefy.bench_model import PROFILE_STAGES, profile_decode

            prof = results["profile"] = profile_decode(dense.model, converted.model, prompt,
                                                       new_tokens=args.new_tokens, repeats=args.repeats,
                                                       clock=args.clock)
            print(f"decode step ({prof['layers']} layers, {args.clock} clock): dense {prof['dense_step_ms']:.2f} ms "
                  f"(FFN {prof['dense_ffn_ms']:.2f}, rest {prof['dense_rest_ms']:.2f}); MoE {prof['moe_step_ms']:.2f} ms "
                  f"(FFN {prof['moe_ffn_ms']:.2f}, rest {prof['moe_rest_ms']:.2f})")
            stages = ", ".join(f"{s} {prof[f'layer_{s}_us']:.0f}" for s in PROFILE_STAGES)
            print(f"per layer, us: dense FFN {prof['dense_layer_us']:.0f}; MoE {prof['layer_total_us']:.0f} = {stages}")
        e2e = bench_models(dense.model, converted.model, prompt, prefill,
                           new_tokens=args.new_tokens, repeats=args.repeats, clock=args.clock)
        results["end_to_end"] = e2e
        print(f"decode: dense {e2e['dense_decode_tok_s']:.1f} tok/s, MoE {e2e['moe_decode_tok_s']:.1f} tok/s "
              f"({e2e['decode_speedup']:.2f}x); prefill {rows}x{length}: dense {e2e['dense_prefill_ms']:.0f} ms, "
              f"MoE {e2e['moe_prefill_ms']:.0f} ms ({e2e['prefill_speedup']:.2f}x)")
    if args.json:
        write_json(args.json, results)
    return 0


def add_bench(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", metavar="CKPT", help="a converted folder: also benchmark decoding and prefill end to end")
    s.add_argument("--base", metavar="MODEL", help="with --model: the base model, if it moved")
    s.add_argument("--quick", action="store_true", help="only the d=576/h=1536 layer shapes")
    s.add_argument("--no-layers", action="store_true", help="skip the FFN-layer benchmark")
    s.add_argument("--repeats", type=int, default=10, metavar="N", help="timed repeats per configuration, median (default: 10)")
    s.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens to decode end to end (default: 32)")
    s.add_argument("--prefill", type=prefill_shape, default=(4, 256), metavar="ROWSxTOKENS",
                   help="the end-to-end prefill batch (default: 4x256)")
    s.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (default: 0, torch's own)")
    s.add_argument("--profile", action="store_true",
                   help="with --model: also break a decode step down per layer (fused call, or router, select, kernel, static; other)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="layer benchmark weights (default: float32)")
    s.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: the thread's CPU time, robust on a shared machine (needs --threads 1)")
    s.add_argument("--json", metavar="PATH", help="write all results as JSON")
    add_settings(s, RuntimeConfig, "runtime settings of --model")


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune the routers of a converted causal LM end to end (next-token loss through a
    straight-through gate, plus the Switch balance loss and optionally the router z-loss), all
    other weights frozen; optionally also the representatives. Saves the new plan to --out and
    prints the per-layer expert-load imbalance before and after (and, with --eval-sequences,
    held-out perplexity before and after)."""
    from pathlib import Path

    from moefy.outputs import check_writable
    from moefy.plan import is_plan_folder

    if not (Path(args.checkpoint).is_dir() and is_plan_folder(args.checkpoint)):
        raise CheckpointError(f"{args.checkpoint!r} is not a converted folder (convert a model first)")
    check_writable(args.out, overwrite=args.overwrite)
    check_json_path(args.json)
    if args.calibration_sequences < 1 or args.eval_sequences < 0:
        raise InvalidArgumentError("--calibration-sequences must be >= 1 and --eval-sequences >= 0")
    check_text_files(args.calibration_text, "--calibration-text")
    from moefy.api import calibration_batches, evaluate_model
    from moefy.cli.output import print_table
    from moefy.finetune import check_finetune_args, finetune_routers
    from moefy.moe_model import MoEModel

    check_finetune_args(args.steps, args.lr, args.balance_weight, args.z_weight, args.batch_size)
    converted = MoEModel.from_pretrained(args.checkpoint, base=args.base)
    before = evaluate_model(converted, max_sequences=args.eval_sequences) if args.eval_sequences else None
    batches = calibration_batches(
        converted.loaded, args.calibration_text, args.calibration_sequences, mix=converted.plan.config.calibration_mix
    )
    report = finetune_routers(
        converted, batches, steps=args.steps, lr=args.lr, balance_weight=args.balance_weight,
        z_weight=args.z_weight, train_representatives=args.representatives, batch_size=args.batch_size,
        progress=True,
    )
    summary = report.summary()
    if before is not None:
        after = evaluate_model(converted, max_sequences=args.eval_sequences)
        summary["perplexity_before"] = {r["split"]: r["perplexity"] for r in before["splits"]}
        summary["perplexity_after"] = {r["split"]: r["perplexity"] for r in after["splits"]}
    converted.plan.extra = {**converted.plan.extra, "router_finetune": summary}
    converted.save(args.out, overwrite=args.overwrite)
    print_table([
        {"layer": b.layer, "max/mean before": b.max_over_mean, "after": a.max_over_mean,
         "CV² before": b.cv_squared, "CV² after": a.cv_squared}
        for b, a in zip(report.load_before, report.load_after, strict=True)
    ])
    if "perplexity_after" in summary:
        before_ppl, after_ppl = summary["perplexity_before"], summary["perplexity_after"]
        print_table([{"split": k, "perplexity before": before_ppl[k], "after": after_ppl[k],
                      "change": change(before_ppl[k], after_ppl[k])} for k in before_ppl])
    print(f"saved {args.out}")
    if args.json:
        write_json(args.json, report.to_json() | {"summary": summary})
    return 0


def add_finetune(s: argparse.ArgumentParser) -> None:
    s.add_argument("checkpoint", metavar="DIR", help="converted folder")
    s.add_argument("--out", required=True, help="output folder for the fine-tuned plan")
    s.add_argument("--base", metavar="MODEL", help="the base model, if it moved")
    s.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps (default: 100)")
    s.add_argument("--lr", type=float, default=3e-5, metavar="X", help="peak AdamW learning rate (default: 3e-5)")
    s.add_argument("--balance-weight", type=float, default=1e-2, metavar="X", help="Switch balance-loss weight (default: 1e-2)")
    s.add_argument("--z-weight", type=float, default=0.0, metavar="X", help="router z-loss weight (default: 0; ST-MoE uses 1e-3)")
    s.add_argument("--representatives", action="store_true", help="also train the representatives r")
    s.add_argument("--batch-size", type=int, default=8, metavar="N", help="256-token sequences per step (default: 8)")
    s.add_argument("--calibration-text", action="append", metavar="FILE", help="fine-tune on this text (repeatable)")
    s.add_argument("--calibration-sequences", type=int, default=64, metavar="N", help="256-token sequences of text (default: 64)")
    s.add_argument("--eval-sequences", type=int, default=0, metavar="N", help="held-out windows per split before/after (default: 0, skip)")
    s.add_argument("--json", metavar="PATH", help="also write the full report (loss curves, per-layer load) as JSON")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
