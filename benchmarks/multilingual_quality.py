"""Quality inside and outside the calibration domain, per calibration mix (issue 12, item 5).

For each `--mix` (moefy.settings.CALIBRATION_MIXES) the model is converted with the default pipeline
(search + distillation) on that mix's bundled calibration text, then held-out perplexity is measured,
dense vs converted, on three kinds of text:

* `prose`: the evaluation splits of every bundled domain: English prose (Jargon File), Python code and
  technical prose in German, French, Spanish, Italian and Portuguese (Debian Reference chapters 7-12;
  the calibration text is chapters 1-6: other documents, same genre);
* `quotes`: quotations and anecdotes in German, Spanish, Italian, Portuguese, Russian and Polish
  (Debian fortune packages): a genre no mix contains, and two languages no mix contains;
* `dialog`: chat lines in German, French, Spanish, Italian, Portuguese, Russian and Dutch
  (chatterbot corpus): another genre no mix contains.

Rows are written to `--out` as they finish (rerun to resume). `--table` prints the Markdown table.

    python benchmarks/multilingual_quality.py --mix english-code,multilingual --budget 0.75 \\
        --out benchmarks/results/multilingual_quality_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import moefy
from moefy.bench import cpu_name
from moefy.conversion import ffn_flops_fraction
from moefy.evaluate import perplexity
from moefy.models import load_model
from moefy.settings import CALIBRATION_MIXES
from moefy.text import ALL_DOMAINS, TokenBatch, bundled_text, held_out_genre, tokenize_text

DIALOG_LANGUAGES = ("German", "French", "Spanish", "Italian", "Portuguese", "Russian", "Dutch")


def eval_batches(tokenizer, sequences: int) -> dict[str, TokenBatch]:
    out = {f"prose/{d}": tokenize_text(bundled_text(d, "evaluation"), tokenizer, 256, sequences, name=d) for d in ALL_DOMAINS}
    for lang, text in held_out_genre("quotes").items():
        out[f"quotes/{lang}"] = tokenize_text(text, tokenizer, 256, sequences, name=lang)
    dialog = held_out_genre("dialog")
    for lang in DIALOG_LANGUAGES:
        out[f"dialog/{lang}"] = tokenize_text(dialog[lang], tokenizer, 256, sequences, name=lang)
    return out


def measure(model, batches: dict[str, TokenBatch]) -> dict[str, float]:
    return {name: round(perplexity(model, b), 3) for name, b in batches.items()}


def table(result: dict) -> str:
    dense = result["dense"]
    mixes = [r for r in result["rows"]]
    head = "| text | dense ppl | " + " | ".join(f"{r['mix']} @ {r['ffn_flops_fraction']:.3f}" for r in mixes) + " |"
    lines = [head, "|" + "---|" * (2 + len(mixes))]
    for name, ppl in dense.items():
        cells = [f"{r['perplexity'][name] / ppl - 1:+.1%}" for r in mixes]
        lines.append(f"| {name} | {ppl:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mix", default="english-code,multilingual", help="comma-separated calibration mixes")
    p.add_argument("--budget", type=float, default=0.75)
    p.add_argument("--distill-steps", type=int, help="default: the recommended setting")
    p.add_argument("--eval-sequences", type=int, default=16, help="256-token windows per split (at most)")
    p.add_argument("--plan", action="append", default=[], metavar="MIX=FOLDER",
                   help="measure an already converted folder as the row of MIX instead of converting (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    args = p.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())))
        return
    mixes = args.mix.split(",")
    for m in mixes:
        if m not in CALIBRATION_MIXES:
            p.error(f"--mix {m!r}: choose from {', '.join(CALIBRATION_MIXES)}")
    logging.basicConfig(level=logging.INFO)
    result = json.loads(out.read_text()) if out.exists() else {}
    loaded = load_model(args.model)
    batches = eval_batches(loaded.tokenizer, args.eval_sequences)
    if "dense" not in result:
        result = {
            "model": args.model, "cpu": cpu_name(), "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
            "eval_tokens": {k: b.num_tokens for k, b in batches.items()}, "dense": measure(loaded.model, batches), "rows": [],
        }
    plans = dict(item.split("=", 1) for item in args.plan)
    for mix in mixes:
        if any(r["mix"] == mix and r["budget"] == args.budget for r in result["rows"]):
            continue
        t0 = time.perf_counter()
        if mix in plans:
            moe = moefy.MoEModel.from_pretrained(plans[mix])
            config, source = moe.plan.config, plans[mix]
            if config.calibration_mix != mix:
                p.error(f"--plan {mix}={plans[mix]}: that plan was calibrated on {config.calibration_mix!r}")
        else:
            changes: dict = {"budget": args.budget, "calibration_mix": mix}
            if args.distill_steps is not None:
                changes["distill_steps"] = args.distill_steps
            config, source = moefy.ConvertConfig().replace(**changes), "converted here"
            moe = moefy.convert(load_model(args.model), config)
        seconds = time.perf_counter() - t0
        result["rows"].append({
            "mix": mix, "budget": args.budget, "source": source, "distill_steps": config.distill_steps,
            "adaptive_k": config.adaptive_k, "convert_seconds": round(seconds, 1),
            "ffn_flops_fraction": round(ffn_flops_fraction(moe.model), 4), "perplexity": measure(moe.model, batches),
        })
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)
    print(table(result))


if __name__ == "__main__":
    main()
