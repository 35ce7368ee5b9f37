"""End-to-end quality of neuron-level selection from the exact gate (a masked study, not a speed path).

`moefy.neuron_selection` evaluates by masking a dense product. Every FFN computes its gate
(plain FFNs: its first projection) in full, keeps per token the neurons with the highest score
and replaces the others by their representatives; the kept fraction fills the FFN FLOPs budget as a gate-first
kernel would execute it (`moefy.flops.neuron_selection_flops`).

Methods: `cats` is |act(gate)| with zero representatives (Lee et al., 2024); `gate-estimate` is
moefy's ‖W_down[:, j]‖² · E[(a_j − r_j)² | gate_j] with mean representatives, fitted per neuron on
calibration text. `--selection top-k` (default) keeps the same number per token; `threshold` is
CATS' per-layer calibrated threshold.

    python benchmarks/gate_selection.py --budgets 0.75 0.5 --out results/gate_selection.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch

from moefy.api import calibration_batches, evaluate_model
from moefy.calibrate import calibrate_blockwise
from moefy.errors import InvalidArgumentError
from moefy.models import LoadedModel, load_model
from moefy.neuron_selection import (
    METHODS,
    SELECTIONS,
    fit_gate_estimates,
    install_neuron_selection,
    neuron_selection_flops_fraction,
)

log = logging.getLogger("gate_selection")


def row(dense: LoadedModel, calibration: list, method: str, selection: str, budget: float, eval_sequences: int) -> dict:
    """Install `method` on a copy of the dense model at `budget` and measure it."""
    loaded = dataclasses.replace(dense, model=copy.deepcopy(dense.model))
    base = {"method": method, "selection": selection, "budget": budget}
    try:
        layers = install_neuron_selection(loaded.model, loaded.spec, calibration, method=method, selection=selection,
                                          budget=budget)
    except InvalidArgumentError as e:
        return {**base, "note": str(e)}
    res = evaluate_model(loaded, max_sequences=eval_sequences)
    return {**base, "kept_fraction": sum(m.kept_fraction for m in layers) / len(layers),
            "ffn_flops_fraction": neuron_selection_flops_fraction(layers),
            **{f"{s['split']}_perplexity": s["perplexity"] for s in res["splits"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a causal LM of any supported family (not T5)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5], help="FFN FLOPs fractions of dense")
    p.add_argument("--methods", nargs="+", default=["gate-estimate", "cats"], choices=METHODS)
    p.add_argument("--selection", default="top-k", choices=SELECTIONS)
    p.add_argument("--calibration-sequences", type=int, default=32, help="256-token sequences, all kept")
    p.add_argument("--eval-sequences", type=int, default=40)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dense = load_model(args.model)
    batches = calibration_batches(dense, None, args.calibration_sequences)
    calibs = calibrate_blockwise(dense.model, dense.spec, batches, sample_size=1 << 30, sequential=False)
    samples = [c.sample_x for c in calibs]
    estimates = fit_gate_estimates(dense.model, dense.spec, samples)  # fitted once, reused at every budget
    rows = []
    for method in args.methods:
        calibration = estimates if method == "gate-estimate" and args.selection == "top-k" else samples
        for budget in args.budgets:
            rows.append(row(dense, calibration, method, args.selection, budget, args.eval_sequences))
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
