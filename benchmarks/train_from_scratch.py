"""Train a tiny byte-level causal LM from scratch: dense FFN vs Switch top-1 vs top-2 vs geometric MoE
(seed 002) at equal active FFN FLOPs; writes results.json and val_loss.png to --out.

    python benchmarks/train_from_scratch.py                       # bundled English text, all schemes
    python benchmarks/train_from_scratch.py --text FILE --steps 200 --schemes dense top2

Training text: the bundled `english_calibration` split (held-out: `english_evaluation`), or --text FILE
(last 10% held out). See `moefy.layers.demo` for the model and the schemes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from moefy.layers.demo import DEFAULT_SCHEMES, SCHEMES, DemoConfig, plot_results, run_demo
from moefy.text import bundled_text, read_text_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a UTF-8 text file to train on (default: the bundled English corpus)")
    parser.add_argument("--domain", default="english", help="bundled corpus domain: english or code")
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--layers", type=int, default=DemoConfig.n_layers)
    parser.add_argument("--batch-size", type=int, default=DemoConfig.batch_size)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--out", default="runs/train_from_scratch", help="output folder")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    if args.text:
        text = read_text_file(args.text)
        cut = int(len(text) * 0.9)
        train_text, val_text = text[:cut], text[cut:]
    else:
        train_text, val_text = bundled_text(args.domain, "calibration"), bundled_text(args.domain, "evaluation")
    cfg = DemoConfig(steps=args.steps, n_layers=args.layers, batch_size=args.batch_size, seed=args.seed)
    summary, results = run_demo(train_text, val_text, cfg, args.schemes)
    summary["text"] = args.text or f"bundled {args.domain}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot_results(results, out / "val_loss.png")

    print(f"{'scheme':<24}{'val loss':>9}{'bits/B':>8}{'FFN MFLOP/tok':>14}{'params':>9}{'max/mean load':>22}"
          f"{'drop %':>8}{'wall s':>8}{'CPU s':>8}")
    for r in results:
        load = " ".join(f"{m:.2f}" for m in r.max_over_mean_load) or "-"
        print(f"{r.scheme:<24}{r.final_val_loss:>9.4f}{r.final_val_bits_per_byte:>8.3f}"
              f"{r.ffn_flops_per_token / 1e6:>14.3f}{r.params_total:>9}{load:>22}"
              f"{100 * r.train_drop_fraction:>8.2f}{r.train_seconds:>8.1f}{r.train_cpu_seconds:>8.1f}")
    print(f"wrote {out / 'results.json'} and {out / 'val_loss.png'}")


if __name__ == "__main__":
    main()
