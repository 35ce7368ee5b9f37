"""`moefy compare`: the paper's Tables 1–3 in kind for one model (see `moefy.compare`).

Every flag is checked before the model loads."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from moefy.cli.flags import add_settings, settings_from
from moefy.cli.output import fmt, print_table
from moefy.settings import ConvertConfig, config_for

SKIPPED_SETTINGS = ("budget", "top_k", "representatives", "static_ranking", "adaptive_k")  # the grid sets these itself (one k per budget)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the G-MoEfication paper's comparisons on one model and write them as Markdown, JSON and a
    plot (OUT/compare.md, compare.json, compare.png): Tables 1/2 — dense vs standard MoEfication
    (zero representatives) vs G-MoEfication (mean representatives, search only) vs moefy's default
    (with distillation) and the CATS-style peer, at each FFN budget; Table 3 — trained router vs
    random vs SNIP-style static selection (and the oracle). One search serves every search-only
    row; rows are saved as they finish, and the same command run again resumes an interrupted grid."""
    spec = _spec(args)  # every setting checked before anything loads
    from moefy.compare import run_compare

    def show(row: dict) -> None:
        frac = row.get("ffn_flops_fraction")
        print(f"{row['key']}: FFN FLOPs {'-' if frac is None else fmt(frac)}"
              + "".join(f", {m['task']} {m['metric']} {fmt(m['value'])}" for m in row["metrics"] if m["metric"] != "acc_norm"),
              flush=True)

    result = run_compare(spec, args.out, progress=True, on_row=show)
    from moefy.compare import relative_performance

    dense = next((r for r in result["rows"] if r["method"] == "dense"), None)
    print_table([{"method": r["label"], "budget": r["budget"], "k": r.get("top_k"), "FFN FLOPs": r.get("ffn_flops_fraction"),
                  "rel. perf.": relative_performance(r, dense) if dense else None} for r in result["rows"]])
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.json, compare.png")
    return 0


def _floats(flag: str, value: str) -> tuple[float, ...]:
    from moefy.errors import InvalidArgumentError

    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise InvalidArgumentError(f"{flag} {value!r}: give numbers separated by commas, e.g. 0.75,0.5") from None


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _is_encoder(model: str) -> bool | None:
    """Whether `model` is an encoder, known without loading it (bundled table or config.json)."""
    from moefy.errors import MoefyError
    from moefy.models import BUNDLED
    from moefy.specs import spec_for

    if model in BUNDLED:
        return "encoder" in BUNDLED[model].description
    config = Path(model) / "config.json"
    try:
        model_type = json.loads(config.read_text())["model_type"]
        return not spec_for(model_type).causal
    except (OSError, ValueError, KeyError, TypeError, MoefyError):
        return None


def _spec(args: argparse.Namespace):  # -> moefy.compare.CompareSpec
    from moefy.compare import CompareSpec
    from moefy.errors import InvalidArgumentError
    from moefy.models import ffn_width
    from moefy.outputs import existing_parent

    config: ConvertConfig = config_for(args.model, **settings_from(args, ConvertConfig))
    config.validate_for(ffn_width(args.model))
    tasks = None
    if args.tasks is not None:
        from moefy.tasks import parse_task_list

        tasks = tuple(parse_task_list(args.tasks))
        if _is_encoder(args.model):
            from moefy.embedding_tasks import check_embedding_tasks

            check_embedding_tasks(tasks)
    spec = CompareSpec(model=args.model, config=config, budgets=_floats("--budgets", args.budgets),
                       methods=_names(args.methods), tasks=tasks, limit=args.limit, eval_sequences=args.eval_sequences)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {args.out!r} is a file; give a folder (a new one, or one to resume)")
    if not os.access(existing_parent(out), os.W_OK):
        raise InvalidArgumentError(f"--out {args.out!r}: {str(existing_parent(out))!r} is not writable")
    if not (Path(args.model).is_dir() or args.model in _bundled()):
        raise InvalidArgumentError(f"{args.model!r}: give a bundled model ({', '.join(_bundled())}) or a model folder")
    return spec


def _bundled() -> list[str]:
    from moefy.models import BUNDLED

    return list(BUNDLED)


def add_compare(s: argparse.ArgumentParser) -> None:
    from moefy.compare import DEFAULT_BUDGETS, METHODS

    s.add_argument("model", help="bundled name (smollm2-135m, minilm-l6) or model folder")
    s.add_argument("--out", required=True, help="output folder (an existing one resumes its grid)")
    s.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS), metavar="B,B",
                   help=f"FFN FLOPs budgets, fractions of dense (default: {','.join(f'{b:g}' for b in DEFAULT_BUDGETS)})")
    s.add_argument("--methods", default=",".join(METHODS), metavar="M,M",
                   help=f"rows to run (default: all): {', '.join(METHODS)}")
    s.add_argument("--tasks", metavar="A,B", help="tasks (default: every shipped multiple-choice task; encoders: "
                   "bb_phrase_relatedness, bb_movie_recommendation, bb_general_knowledge by embedding similarity)")
    s.add_argument("--limit", type=int, metavar="N", help="first N examples per task (default: all)")
    s.add_argument("--eval-sequences", type=int, default=16, metavar="N",
                   help="256-token windows per held-out split (encoders: 5 × N retrieval pairs) (default: 16)")
    add_settings(s, ConvertConfig, "search and distillation settings (defaults: the recommended ones)", skip=SKIPPED_SETTINGS)


__all__ = ["add_compare", "cmd_compare"]
