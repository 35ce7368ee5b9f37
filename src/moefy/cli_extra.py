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
