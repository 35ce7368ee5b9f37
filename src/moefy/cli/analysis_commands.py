"""The `analyze` and `report` commands: sparsity, routing, specialisation and cost analyses with
figures, and the self-contained HTML report of a converted folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from moefy.errors import InvalidArgumentError

DEFAULT_ANALYSIS_DIR = "runs/analysis"


def _options(args: argparse.Namespace):
    from moefy.analysis.runner import AnalyzeOptions

    opts = AnalyzeOptions(relu_reference=not args.no_relu_reference, loss_sweep=not args.no_loss_sweep)
    for name in ("sequences", "eval_sequences", "chunks_per_category"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} {value} must be at least 1")
            setattr(opts, name, value)
    if getattr(args, "eps", None):
        if any(e <= 0 for e in args.eps):
            raise InvalidArgumentError(f"--eps values must be > 0, got {args.eps}")
        opts.eps = tuple(sorted(args.eps))
    return opts


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse dense models and/or converted checkpoint folders and draw the figures.

    A dense model (bundled name, folder, HF id) gets its per-layer exact sparsity, soft sparsity
    |a| <= eps and centred soft sparsity |a - r| <= eps, and its activation distribution before
    and after subtracting r (G-MoEfication Figures 1 and 4). A converted folder also gets routing
    diagnostics, expert specialisation by language and domain (Figure 5) and its FLOPs breakdown
    (Figure 3). Unless --no-relu-reference, a synthetic ReLU reference (all-MiniLM-L6-v2 with GeLU
    replaced by ReLU; no ReLU transformer is installable by package name) joins Figure 1.
    Results are saved as JSON + safetensors in --out; figures as PNG in --out/figures."""
    from moefy.analysis.results import sparsity_stem
    from moefy.analysis.runner import (
        RELU_REFERENCE_BASE,
        analyze_conversion,
        analyze_dense,
        analyze_relu_reference,
    )
    from moefy.plan import is_plan_folder
    from moefy.plots import figures_from_folder, save_png

    options = _options(args)
    outs: list[Path] = []
    for model in args.models:
        if Path(model).is_dir() and is_plan_folder(model):
            out = Path(args.out) if args.out else Path(model) / "analysis"
            analyze_conversion(model, out, options, recompute=args.recompute)
        else:
            out = Path(args.out or DEFAULT_ANALYSIS_DIR)
            analyze_dense(model, out, options, activation=args.activation)
            reference = out / f"{sparsity_stem(RELU_REFERENCE_BASE, 'relu')}.json"
            if options.relu_reference and args.activation is None and (args.recompute or not reference.is_file()):
                analyze_relu_reference(out, options)
        if out not in outs:
            outs.append(out)
    for out in outs:
        for fig in figures_from_folder(out):
            print(f"wrote {save_png(fig.figure, out / 'figures' / f'{fig.stem}.png')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a self-contained HTML report (DIR/report.html) of a converted checkpoint folder: its
    configuration, the quality/cost table, routing and sparsity summaries and every figure,
    embedded as images. Analyses missing from DIR/analysis are computed first (this loads the
    model) unless --no-compute; saved ones are reused unless --recompute."""
    from moefy.report import write_report

    if args.no_compute and args.recompute:
        raise InvalidArgumentError("--no-compute and --recompute contradict each other; give one")
    path = write_report(
        args.folder, compute=not args.no_compute, recompute=args.recompute, options=_options(args), out=args.out,
        compare=args.compare,
    )
    print(f"wrote {path}")
    return 0


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--sequences", type=int, help="calibration sequences of 256 tokens for sparsity (default 16)")
    s.add_argument("--eval-sequences", type=int, help="held-out sequences of 128 tokens for routing statistics (default 8)")
    s.add_argument("--chunks-per-category", type=int, help="64-token chunks per language/domain for specialisation (default 5)")
    s.add_argument("--eps", type=float, nargs="+", help="soft-sparsity thresholds (> 0; default 0.01 0.03 0.1 0.3)")
    s.add_argument("--no-relu-reference", action="store_true", help="leave the synthetic ReLU reference out of Figure 1")
    s.add_argument("--no-loss-sweep", action="store_true", help="skip the per-layer loss sweep (L + 2 forward passes)")
    s.add_argument("--recompute", action="store_true", help="recompute analyses already saved")


def add_analyze(s: argparse.ArgumentParser) -> None:
    s.add_argument("models", nargs="+", metavar="MODEL", help="dense model (bundled name, folder, HF id) or converted folder")
    s.add_argument("--out", help=f"results folder (default: {DEFAULT_ANALYSIS_DIR}, or FOLDER/analysis for a converted folder)")
    s.add_argument("--activation", choices=["relu", "gelu", "silu"],
                   help="analyse dense models with their FFN activation swapped for this one (a synthetic model)")
    _common(s)


def add_report(s: argparse.ArgumentParser) -> None:
    s.add_argument("folder", metavar="DIR", help="converted folder (from `moefy convert` or `moefy run`)")
    s.add_argument("--out", help="HTML file to write (default: DIR/report.html)")
    s.add_argument("--no-compute", action="store_true", help="draw only from saved analyses; never load a model")
    s.add_argument("--compare", metavar="DIR", help="a `moefy compare` output folder to show against the baselines "
                   "(default: DIR/compare.json, if any)")
    _common(s)
