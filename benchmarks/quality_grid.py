"""The README's quality table: dense vs MoE variants at several FFN FLOPs budgets.

For each expert count: one conversion (balanced k-means experts, routers trained on dense-model
inputs for the k of every budget), then, on held-out English and code (or, for encoders,
embedding fidelity and retrieval): {mean, zero} representatives × {oracle, trained router};
static expert sets (Taylor/SNIP-style importance, and random); and CATS-style thresholding at
the same FFN FLOPs. Oracle rows are upper bounds: the oracle itself costs a full dense FFN.

    python benchmarks/quality_grid.py --model smollm2-135m --experts 64 256 --out results/quality_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from moefy.api import calibration_batches, evaluate_model
from moefy.conversion import (
    apply,
    configure,
    ffn_flops_fraction,
    ffn_shape,
    moe_layers,
    planned_top_k,
    search,
)
from moefy.errors import InvalidArgumentError
from moefy.ffn import extract_ffn
from moefy.importance import set_static_importance, taylor_importance
from moefy.models import load_model
from moefy.moe_model import MoEModel
from moefy.neuron_selection import install_neuron_selection, neuron_selection_flops_fraction
from moefy.settings import ConvertConfig, RuntimeConfig
from moefy.specs import find_blocks

log = logging.getLogger("quality_grid")


def _quality(target, reference, eval_sequences: int) -> dict:
    res = evaluate_model(target, max_sequences=eval_sequences, reference=reference)
    out = {}
    for s in res["splits"]:
        for key in ("perplexity", "embedding_fidelity", "retrieval_accuracy"):
            if key in s:
                out[f"{s['split']}_{key}"] = s[key]
    return out


class _Rows(list):
    """Rows that call `on_row` (e.g. write partial results) after every append."""

    def __init__(self, on_row) -> None:
        super().__init__()
        self.on_row = on_row

    def append(self, row: dict) -> None:
        super().append(row)
        if self.on_row is not None:
            self.on_row(list(self))


def run_grid(name: str, expert_counts: list[int], shared: list[float], budgets: list[float], eval_sequences: int,
             calibration_sequences: int, cats: bool = True, on_row=None) -> dict:
    """The grid's rows; `on_row(rows)` is called after each one (the caller saves partial results)."""
    rows: list[dict] = _Rows(on_row)
    dense = load_model(name)
    reference = dense if not dense.is_causal else None
    base = {"model": name}
    rows.append({**base, "method": "dense", "budget": 1.0, "ffn_flops_fraction": 1.0,
                 **_quality(dense, reference, eval_sequences)})
    log.info("dense: %s", rows[-1])

    def record(conv, label: str, budget: float, experts: int, k: int, **extra) -> None:
        t = time.perf_counter()
        q = _quality(conv, reference, eval_sequences)
        frac = ffn_flops_fraction(conv.model)
        rows.append({**base, "method": label, "experts": experts, "budget": budget, "top_k": k,
                     "ffn_flops_fraction": frac, **extra, **q})
        log.info("%s (%.0f s): %s", label, time.perf_counter() - t, rows[-1])

    samples = None  # dense-model FFN inputs per layer, for the CATS thresholds
    for n, sh in zip(expert_counts, shared, strict=True):
        loaded = load_model(name)
        batches = calibration_batches(loaded, None, calibration_sequences)
        shape = ffn_shape(extract_ffn(find_blocks(loaded.model, loaded.spec)[0][1], loaded.spec))
        base_config = ConvertConfig(num_experts=n, method="kmeans", shared_fraction=sh, sequential=False,
                                    calibration_sequences=calibration_sequences)
        ks = [planned_top_k(shape, base_config.replace(budget=b)) for b in budgets]  # routers trained for each k
        routed = n - base_config.num_shared
        label = f"{n} experts" + (f" + {int(sh * 100)}% shared" if sh else "")
        static_label = "static Taylor/SNIP importance" if loaded.is_causal else "static mean residual norm"
        for reps in ("mean", "zero"):
            config = base_config.replace(
                budget=None, top_k=ks[len(ks) // 2], representatives=reps,
                router_k_fractions=tuple((k - base_config.num_shared) / routed for k in ks),
            )
            t0 = time.perf_counter()
            plan = search(loaded, batches, config)  # sequential=False: the model stays dense
            apply(loaded, plan, RuntimeConfig())
            conv = MoEModel(loaded=loaded, plan=plan)
            log.info("converted %d experts (%s r) in %.0f s", n, reps, time.perf_counter() - t0)
            if loaded.is_causal and reps == "mean":
                set_static_importance(conv.model, taylor_importance(conv.model, batches[:4]))
            for budget in budgets:
                conv.configure(RuntimeConfig(budget=budget))
                record(conv, f"{label}, {reps} r, trained router", budget, n, moe_layers(conv.model)[0].top_k)
                conv.configure(RuntimeConfig(budget=budget, selection="oracle"))
                k_static = moe_layers(conv.model)[0].top_k  # the budget without router FLOPs
                record(conv, f"{label}, {reps} r, oracle (upper bound)", budget, n, k_static)
                if reps == "mean":
                    configure(conv.model, selection="static")
                    record(conv, f"{label}, mean r, {static_label}", budget, n, k_static)
            if reps == "mean":
                g = torch.Generator().manual_seed(0)
                set_static_importance(conv.model, [torch.rand(m.num_experts, generator=g) for m in moe_layers(conv.model)])
                for budget in budgets:
                    conv.configure(RuntimeConfig(budget=budget, selection="static"))
                    record(conv, f"{label}, mean r, static random", budget, n, moe_layers(conv.model)[0].top_k)
            loaded = load_model(name)  # a fresh dense base for the next search
        del conv, loaded
    # CATS-style thresholding at the same FFN FLOPs, on dense-model FFN inputs
    if cats and samples is None:
        from moefy.calibrate import calibrate_blockwise

        batches = calibration_batches(dense, None, calibration_sequences)
        samples = [c.sample_x for c in calibrate_blockwise(dense.model, dense.spec, batches, sequential=False)]
    for budget in budgets if cats else []:
        peer = load_model(name)
        try:
            layers = install_neuron_selection(peer.model, peer.spec, samples, method="cats", budget=budget)
        except InvalidArgumentError:  # the full gate (or first projection) alone exceeds the budget
            rows.append({**base, "method": "CATS-style threshold", "budget": budget, "note": "infeasible: the full gate costs more"})
            continue
        q = _quality(peer, reference, eval_sequences)
        frac = neuron_selection_flops_fraction(layers)
        rows.append({**base, "method": "CATS-style threshold", "budget": budget, "ffn_flops_fraction": frac, **q})
        log.info("CATS: %s", rows[-1])
    return {"model": name, "eval_sequences": eval_sequences, "rows": rows}


def markdown(result: dict) -> str:
    rows = result["rows"]
    dense = rows[0]
    metrics = [k for k in dense if k.endswith(("perplexity", "fidelity", "accuracy"))]
    head = "| method | budget | FFN FLOPs | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for r in rows:
        cells = []
        for m in metrics:
            v = r.get(m)
            if v is None:
                cells.append("n/a")
            elif m.endswith("perplexity") and r is not dense:
                cells.append(f"{v:.2f} ({100 * (v / dense[m] - 1):+.0f}%)")
            else:
                cells.append(f"{v:.3f}" if not m.endswith("perplexity") else f"{v:.2f}")
        frac = r.get("ffn_flops_fraction")
        lines.append(f"| {r['method']} | {int(r['budget'] * 100)}% | {'-' if frac is None else f'{frac:.2f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--experts", type=int, nargs="*", default=[64, 256], help="expert counts (none: baselines only)")
    p.add_argument("--shared", type=float, nargs="+", default=None, help="shared fraction per expert count")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--eval-sequences", type=int, default=40)
    p.add_argument("--calibration-sequences", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-cats", action="store_true", help="skip the CATS-style baseline rows")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = args.shared or [0.0] * len(args.experts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict], complete: bool = False) -> None:
        result = {"model": args.model, "eval_sequences": args.eval_sequences,
                  "calibration_sequences": args.calibration_sequences, "complete": complete, "rows": rows}
        for path, text in ((out, json.dumps(result, indent=2)), (out.with_suffix(".md"), markdown(result) + "\n")):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)

    result = run_grid(args.model, args.experts, shared, args.budgets, args.eval_sequences, args.calibration_sequences,
                      cats=not args.no_cats, on_row=save)
    save(result["rows"], complete=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
