"""Quality against minutes of distillation, in and out of the calibration domain (issue 12).

Loads a plan searched *without* distillation (`moefy convert MODEL --no-distill --out PLAN`), measures
held-out perplexity of the dense model and of the converted one before distillation, then distils
(`moefy.distill.distill`, the stage `moefy convert` runs by default) and re-measures every
`--eval-every` steps. Held-out splits: the bundled English and code evaluation text (same domains as
the calibration text, other documents) and, out of domain, the bundled multilingual dialog lines
(languages and a register the calibration never saw; `moefy/data/README.md`).

    python benchmarks/distill_curve.py --plan runs/smol-nodistill --steps 150 --eval-every 50 \
        --out benchmarks/results/distill_curve.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from moefy.api import calibration_batches
from moefy.bench import cpu_name
from moefy.conversion import ffn_flops_fraction, moe_layers
from moefy.distill import dense_mode, distill
from moefy.evaluate import perplexity
from moefy.moe_model import MoEModel
from moefy.settings import DEFAULT_DISTILL_STEPS
from moefy.text import bundled_text, tokenize_text

OOD_LANGUAGES = ("German", "French", "Spanish", "Italian", "Portuguese", "Russian", "Dutch")


def eval_batches(tokenizer, sequences: int) -> dict:
    out = {d: tokenize_text(bundled_text(d, "evaluation"), tokenizer, 256, sequences, name=d) for d in ("english", "code")}
    langs = json.loads((Path(__file__).parents[1] / "src/moefy/data/multilingual.json").read_text())["languages"]
    for lang in OOD_LANGUAGES:
        out[lang] = tokenize_text(langs[lang]["text"], tokenizer, 256, sequences, name=lang)
    return out


def measure(model, batches: dict) -> dict:
    return {name: round(perplexity(model, b), 3) for name, b in batches.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="a plan folder converted with --no-distill")
    p.add_argument("--steps", type=int, default=DEFAULT_DISTILL_STEPS)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-sequences", type=int, default=40)
    p.add_argument("--lr", type=float)
    p.add_argument("--layer-weight", type=float)
    p.add_argument("--rank", type=int, help="compensation rank")
    p.add_argument("--batch", type=int)
    p.add_argument("--no-compensation", action="store_true")
    p.add_argument("--budget", type=float, help="run at this FFN budget instead of the plan's k")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    moe = MoEModel.from_pretrained(args.plan)
    if args.budget is not None:
        moe.configure(budget=args.budget)
    loaded, plan = moe.loaded, moe.plan
    changes = {"distill": True, "distill_steps": args.steps}
    for key, value in (("distill_lr", args.lr), ("distill_layer_weight", args.layer_weight),
                       ("compensation_rank", args.rank), ("distill_batch", args.batch)):
        if value is not None:
            changes[key] = value
    if args.no_compensation:
        changes["compensation"] = False
    config = plan.config.replace(**changes)
    batches = eval_batches(loaded.tokenizer, args.eval_sequences)
    layers = moe_layers(loaded.model)
    with torch.no_grad(), dense_mode(layers):
        dense = measure(loaded.model, batches)
    rows = [{"step": 0, "minutes": 0.0, **measure(loaded.model, batches), "ffn_flops": round(ffn_flops_fraction(loaded.model), 4)}]
    print(json.dumps({"dense": dense}), json.dumps(rows[-1]), flush=True)
    t0 = time.perf_counter()
    spent = [0.0]  # seconds spent evaluating, not distilling

    def on_step(step: int, _report) -> None:
        if step % args.eval_every and step != args.steps:
            return
        e0 = time.perf_counter()
        with torch.no_grad():
            row = {"step": step, "minutes": round((e0 - t0 - spent[0]) / 60, 2), **measure(loaded.model, batches)}
        spent[0] += time.perf_counter() - e0
        rows.append(row)
        print(json.dumps(row), flush=True)

    cal = calibration_batches(loaded, None, config.calibration_sequences)
    report = distill(loaded, plan, cal, config, progress=True, callback=on_step)
    rows[-1]["ffn_flops"] = round(ffn_flops_fraction(loaded.model), 4)
    result = {
        "plan": args.plan, "settings": {k: v for k, v in config.to_json().items() if k.startswith(("distill", "compensation"))},
        "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "dense": dense, "curve": rows, "distillation": report.summary(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
