"""Layer-level study of the levers of expert selection: how close a cheap selection gets to
the oracle, per FFN, at a fixed FFN FLOPs budget (router included).

For a few layers of a dense model, FFN inputs are captured on calibration text (routers are fit
there) and on held-out evaluation text (everything is measured there). Each row gives the
relative output error of the layer, ‖ŷ − y‖² / ‖y − ȳ‖² over held-out tokens, for the oracle
(exact residual norms, at the router's k) and for the real selection, and the recall of the
oracle's experts. Levers: expert count, shared-expert fraction, router kind (linear vs MLP),
router training-set size, dynamic k (one calibrated score threshold instead of a fixed k per
token), and, for gated FFNs, neuron-level selection from the exact gate projection: CATS
(|act(gate)|, zero representatives) and moefy's gate estimate (mean representatives, each
neuron's E[(a − r)² | gate] fitted on calibration data).

    python benchmarks/router_levers.py --model smollm2-135m --out results/router_levers.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from moefy.api import calibration_batches
from moefy.calibrate import calibrate_blockwise
from moefy.conversion import ffn_shape, top_k_for_budget
from moefy.errors import InvalidArgumentError
from moefy.experts import plan_experts
from moefy.ffn import FFNWeights, extract_ffn
from moefy.kernels import ExpertWeights
from moefy.models import load_model
from moefy.neuron_selection import fit_gate_estimate, neuron_selection_ffn
from moefy.routers import expert_targets, fit_router, router_flops_per_token, topk_recall
from moefy.specs import find_blocks
from moefy.text import bundled_text, tokenize_text

log = logging.getLogger("router_levers")


def relative_error(experts: ExpertWeights, reps: Tensor, x: Tensor, mask: Tensor, y: Tensor) -> float:
    """‖ŷ − y‖² / ‖y − ȳ‖², ŷ: selected experts exact, the others at their representatives."""
    a = experts.all_activations(x)
    return _relative(torch.einsum("tes,esd->td", torch.where(mask[..., None], a, reps), experts.w_out), y)


def _relative(y_hat: Tensor, y: Tensor) -> float:
    return float(((y_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def _mask(scores: Tensor, k: int, num_shared: int) -> Tensor:
    """Shared experts plus the top-k of the routed ones' scores: (T, E) bool."""
    t = scores.shape[0]
    routed = torch.zeros(t, scores.shape[1], dtype=torch.bool).scatter_(1, torch.topk(scores, k, 1).indices, True)
    return torch.cat([torch.ones(t, num_shared, dtype=torch.bool), routed], 1)


def expert_rows(ffn: FFNWeights, xc: Tensor, xe: Tensor, a: Tensor, mean: Tensor, y: Tensor, budgets: list[float],
                setting: dict, seed: int) -> list[dict]:
    """One expert-level configuration on one layer: oracle vs router at each budget."""
    n, sh, hidden, samples = setting["experts"], setting["shared"], setting["hidden"], setting["samples"]
    plan = plan_experts(ffn, n, "kmeans", sample_a=a[:8192], mean=mean, shared_fraction=sh, seed=seed)
    experts = ExpertWeights.from_ffn(ffn, plan.perm, n)
    reps = mean[plan.perm].reshape(n, -1)
    ns = plan.num_shared
    router_flops = router_flops_per_token(ffn.d_model, n - ns, hidden)
    ks = [top_k_for_budget(ffn_shape(ffn), n, ns, router_flops, b) - ns for b in budgets]
    g = torch.Generator().manual_seed(seed)
    train = torch.randperm(xc.shape[0], generator=g)[:samples]
    targets_c = expert_targets(experts, reps, xc[train])[:, ns:]
    targets_e = expert_targets(experts, reps, xe)[:, ns:]
    fit = fit_router(xc[train], targets_c, ks, hidden=hidden, epochs=10, seed=seed)
    with torch.no_grad():
        scores_e = fit.router(xe)
        scores_c = fit.router(xc[train])
    rows = []
    for budget, k in zip(budgets, ks, strict=True):
        row = {**setting, "budget": budget, "top_k": k + ns,
               "oracle_error": relative_error(experts, reps, xe, _mask(targets_e, k, ns), y),
               "router_error": relative_error(experts, reps, xe, _mask(scores_e, k, ns), y),
               "router_recall": topk_recall(scores_e, targets_e, k)}
        if setting.get("dynamic"):
            # one score threshold, calibrated so the mean k on calibration tokens is k
            thr = torch.quantile(scores_c.reshape(-1)[:: max(1, scores_c.numel() // 500_000)], 1 - k / scores_c.shape[1])
            routed = scores_e > thr
            mask = torch.cat([torch.ones(xe.shape[0], ns, dtype=torch.bool), routed], 1)
            row["dynamic_error"] = relative_error(experts, reps, xe, mask, y)
            row["dynamic_mean_k"] = float(routed.sum(1).float().mean()) + ns
        rows.append(row)
    return rows


def gate_rows(ffn: FFNWeights, xc: Tensor, xe: Tensor, y: Tensor, budgets: list[float]) -> list[dict]:
    """Neuron-level selection from the exact gate, per-token top-k at each FFN FLOPs budget
    (`moefy.neuron_selection`; gate + scores + kept up/down rows within the budget)."""
    methods = {"cats": "CATS: largest act(gate) magnitudes, zero r", "gate-estimate": "gate estimate, mean r"}
    estimate = fit_gate_estimate(ffn, xc)
    b_down = 0 if ffn.b_down is None else ffn.b_down
    rows = []
    for budget in budgets:
        for method, name in methods.items():
            calibration = estimate if method == "gate-estimate" else xc
            try:
                module = neuron_selection_ffn(ffn, calibration, method=method, selection="top-k", budget=budget)
            except InvalidArgumentError:  # the full gate alone exceeds the budget
                continue
            err = _relative(module(xe) - b_down, y)
            rows.append({"lever": "neuron-level gate", "setting": name, "budget": budget, "top_k": module.top_k,
                         "router_error": err})
    return rows


def capture(loaded, batches, layers: list[int], sample_size: int) -> dict[int, Tensor]:
    keep: dict[int, Tensor] = {}

    def on_block(i, _name, _block, calib) -> None:
        if i in layers:
            keep[i] = calib.sample_x.float()
        calib.sample_x = calib.sample_x[:0]

    calibrate_blockwise(loaded.model, loaded.spec, batches, sample_size=sample_size, on_block=on_block, sequential=False)
    return keep


SETTINGS: list[tuple[str, dict]] = [
    ("experts", {"experts": 64, "shared": 0.1, "hidden": 0, "samples": 32768}),
    ("experts", {"experts": 128, "shared": 0.1, "hidden": 0, "samples": 32768}),
    ("experts, shared, dynamic k", {"experts": 256, "shared": 0.1, "hidden": 0, "samples": 32768, "dynamic": True}),
    ("experts", {"experts": 512, "shared": 0.1, "hidden": 0, "samples": 32768}),
    ("shared", {"experts": 256, "shared": 0.0, "hidden": 0, "samples": 32768}),
    ("shared", {"experts": 256, "shared": 0.2, "hidden": 0, "samples": 32768}),
    ("shared", {"experts": 256, "shared": 0.3, "hidden": 0, "samples": 32768}),
    ("router", {"experts": 256, "shared": 0.1, "hidden": 256, "samples": 32768}),
    ("samples", {"experts": 256, "shared": 0.1, "hidden": 0, "samples": 8192}),
]


def markdown(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        router = "linear" if r.get("hidden") == 0 else f"MLP {r.get('hidden')}"
        setting = r.get("setting") or (
            f"{r['experts']} experts, {int(100 * r['shared'])}% shared, {router} router, {r['samples']} samples"
        )
        groups.setdefault((r["lever"], setting, r["budget"]), []).append(r)
    lines = ["| lever | setting | budget | oracle error | router error | recall | dynamic-k error |", "|---|---|---|---|---|---|---|"]

    def mean(rs: list[dict], key: str) -> str:
        vals = [r[key] for r in rs if key in r]
        return f"{sum(vals) / len(vals):.3f}" if vals else "-"

    for (lever, setting, budget), rs in groups.items():
        lines.append(f"| {lever} | {setting} | {int(100 * budget)}% | {mean(rs, 'oracle_error')} | "
                     f"{mean(rs, 'router_error')} | {mean(rs, 'router_recall')} | {mean(rs, 'dynamic_error')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 10, 18, 26])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--calibration-sequences", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=16, help="256-token windows per held-out split")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    blocks = find_blocks(loaded.model, loaded.spec)
    cal = capture(loaded, calibration_batches(loaded, None, args.calibration_sequences), args.layers, 1 << 30)
    evaluation = [c for d in ("english", "code")
                  for c in tokenize_text(bundled_text(d, "evaluation"), loaded.tokenizer, 256, args.eval_sequences, name=d).chunks(8)]
    ev = capture(loaded, evaluation, args.layers, 1 << 30)
    rows: list[dict] = []
    with torch.no_grad():
        for li in args.layers:
            ffn = extract_ffn(blocks[li][1], loaded.spec)
            xc, xe = cal[li], ev[li]
            a = ffn.activation(xc)
            mean = a.mean(0)
            y = ffn(xe) - (0 if ffn.b_down is None else ffn.b_down)
            for lever, setting in SETTINGS:
                if setting["experts"] > ffn.d_ff or ffn.d_ff % setting["experts"]:
                    continue
                for r in expert_rows(ffn, xc, xe, a, mean, y, args.budgets, setting, seed=li):
                    rows.append({"lever": lever, "layer": li, **r})
                    log.info("%s", rows[-1])
            if ffn.gated:
                for r in gate_rows(ffn, xc, xe, y, args.budgets):
                    rows.append({"layer": li, **r})
                    log.info("%s", rows[-1])
    result = {"model": args.model, "layers": args.layers, "calibration_tokens": int(cal[args.layers[0]].shape[0]),
              "eval_tokens": int(ev[args.layers[0]].shape[0]), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
