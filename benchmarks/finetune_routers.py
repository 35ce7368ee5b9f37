"""Fine-tune the routers of a converted SmolLM2-135M on calibration text with the Switch balance loss
(`moefy.finetune`), and compare held-out perplexity and expert-load balance before and after.

    python benchmarks/finetune_routers.py                          # convert (cached in --checkpoint), tune, evaluate
    python benchmarks/finetune_routers.py --steps 100 --balance-weight 0.1 --representatives

Conversion: 64 experts, FFN FLOPs budget 0.5, 16 calibration sequences, 5 router epochs, non-sequential
calibration; saved to --checkpoint and reused on later runs. Fine-tuning text: the bundled calibration
splits (English + code, 16 x 256 tokens); held-out text: the bundled evaluation splits (--eval-sequences
x 256 tokens per domain), on which both perplexity and expert load are measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from moefy.api import calibration_batches, convert, evaluate_model
from moefy.conversion import configure
from moefy.finetune import finetune_routers
from moefy.moe_model import MoEModel
from moefy.plan import is_plan_folder
from moefy.settings import ConvertConfig
from moefy.text import split_batches

log = logging.getLogger("finetune_routers")


def perplexities(result: dict) -> dict[str, float]:
    return {row["split"]: row["perplexity"] for row in result["splits"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", default="runs/finetune_routers/converted", help="converted model cache folder")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--balance-weight", type=float, default=1e-2)
    p.add_argument("--z-weight", type=float, default=0.0)
    p.add_argument("--representatives", action="store_true", help="also train the representatives")
    p.add_argument("--batch-size", type=int, default=2, help="256-token sequences per step")
    p.add_argument("--calibration-sequences", type=int, default=16)
    p.add_argument("--eval-sequences", type=int, default=8, help="held-out 256-token windows per domain")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/finetune_routers.json")
    args = p.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if is_plan_folder(args.checkpoint):
        converted = MoEModel.from_pretrained(args.checkpoint)
        log.info("loaded the converted model from %s", args.checkpoint)
    else:
        config = ConvertConfig(num_experts=64, budget=0.5, shared_fraction=0.0, calibration_sequences=16,
                               router_epochs=5, router_hidden=256, sequential=False)
        converted = convert(args.model, config)
        converted.save(args.checkpoint)
        log.info("converted in %.0fs, saved to %s", converted.plan.seconds, args.checkpoint)
    convert_seconds = time.perf_counter() - t0
    loaded = converted.loaded

    configure(converted.model, selection="all")  # every expert: exactly the dense model
    dense = perplexities(evaluate_model(converted, max_sequences=args.eval_sequences))
    configure(converted.model, selection="router")
    log.info("dense perplexity: %s", dense)
    before = perplexities(evaluate_model(converted, max_sequences=args.eval_sequences))
    log.info("perplexity before: %s", before)
    held_out = [
        c for b in split_batches(loaded.tokenizer, "evaluation", 256, args.eval_sequences).values() for c in b.chunks(8)
    ]
    batches = calibration_batches(loaded, None, args.calibration_sequences)
    report = finetune_routers(
        converted, batches, steps=args.steps, lr=args.lr, balance_weight=args.balance_weight, z_weight=args.z_weight,
        train_representatives=args.representatives, batch_size=args.batch_size, load_batches=held_out, progress=True,
    )
    after = perplexities(evaluate_model(converted, max_sequences=args.eval_sequences))
    log.info("perplexity after: %s", after)

    result = {
        "command": " ".join(["python", "benchmarks/finetune_routers.py", *sys.argv[1:]]),
        "model": args.model,
        "conversion": converted.plan.config.to_json(),
        "top_k": converted.plan.layers[0].top_k,
        "threads": args.threads,
        "load_or_convert_seconds": round(convert_seconds, 1),
        "fine_tune_text": f"bundled calibration splits, {args.calibration_sequences} x 256 tokens",
        "held_out_text": f"bundled evaluation splits, {args.eval_sequences} x 256 tokens per domain",
        "perplexity_dense": dense,
        "perplexity_before": before,
        "perplexity_after": after,
        "summary": report.summary(),
        "report": report.to_json(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
