"""The `finetune` subcommand: fine-tune a converted checkpoint's routers on calibration text with a
load-balance loss (`moefy.finetune`) and save the result as a new checkpoint. `register(sub)` adds
it to moefy's CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moefy.errors import CheckpointError, InvalidArgumentError


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune the routers of a converted causal LM end to end (next-token loss through a
    straight-through gate, plus the Switch balance loss and optionally the router z-loss), all
    other weights frozen; optionally also the representatives. Saves a new checkpoint to --out
    and prints the per-layer expert-load imbalance before and after (and, with --eval-sequences,
    held-out perplexity before and after)."""
    from moefy.api import calibration_batches, evaluate_model
    from moefy.checkpoint import is_converted_checkpoint, load_converted, save_converted
    from moefy.finetune import finetune_routers

    if not (Path(args.checkpoint).is_dir() and is_converted_checkpoint(args.checkpoint)):
        raise CheckpointError(f"{args.checkpoint!r} is not a converted checkpoint folder (convert a model first)")
    if Path(args.out).exists() and not args.overwrite:
        raise CheckpointError(f"output folder {args.out!r} already exists; pass --overwrite to replace it")
    for name in ("calibration_sequences", "eval_sequences"):
        value = getattr(args, name)
        if value < (0 if name == "eval_sequences" else 1):
            raise InvalidArgumentError(f"--{name.replace('_', '-')} {value} is too small")
    converted = load_converted(args.checkpoint)
    before = evaluate_model(converted, max_sequences=args.eval_sequences) if args.eval_sequences else None
    batches = calibration_batches(converted.loaded, args.calibration_text, args.calibration_sequences)
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
    save_converted(converted, args.out, overwrite=args.overwrite, extra={"router_finetune": summary})
    print(f"{'layer':>5}  {'max/mean before':>15}  {'after':>6}  {'CV² before':>10}  {'after':>6}")
    for b, a in zip(report.load_before, report.load_after, strict=True):
        print(f"{b.layer:>5}  {b.max_over_mean:>15.3f}  {a.max_over_mean:>6.3f}  {b.cv_squared:>10.4f}  {a.cv_squared:>6.4f}")
    print(json.dumps(summary, indent=2))
    if args.json:
        from moefy.cli import _write_json

        _write_json(args.json, report.to_json() | {"summary": summary})
        print(f"wrote {args.json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("finetune", help="fine-tune a converted model's routers with a balance loss", description=cmd_finetune.__doc__)
    s.add_argument("checkpoint", metavar="CKPT_DIR", help="converted checkpoint folder")
    s.add_argument("--out", required=True, help="output folder for the fine-tuned checkpoint")
    s.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    s.add_argument("--lr", type=float, default=3e-5, help="peak AdamW learning rate (default 3e-5)")
    s.add_argument("--balance-weight", type=float, default=1e-2, help="Switch balance-loss weight (default 1e-2)")
    s.add_argument("--z-weight", type=float, default=0.0, help="router z-loss weight (default 0; ST-MoE uses 1e-3)")
    s.add_argument("--representatives", action="store_true", help="also train the representatives r")
    s.add_argument("--batch-size", type=int, default=8, help="256-token sequences per step (default 8)")
    s.add_argument("--calibration-text", action="append", metavar="FILE", help="fine-tune on this text (repeatable)")
    s.add_argument("--calibration-sequences", type=int, default=64, help="256-token sequences of text (default 64)")
    s.add_argument("--eval-sequences", type=int, default=0, help="held-out windows per split to evaluate before/after (0: skip)")
    s.add_argument("--json", metavar="PATH", help="also write the full report (loss curves, per-layer load) as JSON")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_finetune)
