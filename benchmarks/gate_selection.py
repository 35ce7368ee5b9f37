"""Quality of neuron-level selection from the exact gate, end to end, by masking (a quality
study, not an execution path): every gated FFN computes its gate in full, keeps per token the
neurons with the largest score, and replaces the others by a representative. FFN FLOPs as a
gate-first kernel would execute them: (1 + 2f)/3 for a kept fraction f.

Scores: `absg` is CATS (|act(gate)|, zero representatives); `est` is the gate estimate with
mean representatives: ‖W_down[:, j]‖² · E[(a_j − r_j)² | gate_j], with u_j ≈ α_j + β_j·gate_j
and its residual variance fitted per neuron on calibration text.

    python benchmarks/gate_selection.py --budgets 0.75 0.5 --out results/gate_selection.json
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch
from torch import Tensor, nn

from moefy.api import calibration_batches, evaluate_model
from moefy.ffn import FFNWeights, extract_ffn
from moefy.models import load_model
from moefy.specs import find_blocks


def fit_gate_estimate(ffn: FFNWeights, x: Tensor) -> dict[str, Tensor]:
    """Per-neuron fit on FFN inputs x (N, d): u ≈ α + β·gate and its residual variance, the mean
    activation r and ‖W_down[:, j]‖²."""
    g, u = x @ ffn.w_gate.t(), x @ ffn.w_up.t()
    gm, um = g.mean(0), u.mean(0)
    beta = ((g - gm) * (u - um)).mean(0) / (g - gm).var(0).clamp_min(1e-12)
    alpha = um - beta * gm
    return {
        "mean": (ffn.act(g) * u).mean(0), "alpha": alpha, "beta": beta,
        "resid_var": ((u - alpha - beta * g) ** 2).mean(0), "w2": (ffn.w_down**2).sum(0),
    }


def gate_estimate_score(est: dict[str, Tensor], g: Tensor, act_g: Tensor) -> Tensor:
    """‖W_down[:, j]‖² · E[(a_j − r_j)² | gate_j] for gate pre-activations g and act(g)."""
    return est["w2"] * ((act_g * (est["alpha"] + est["beta"] * g) - est["mean"]) ** 2 + act_g**2 * est["resid_var"])


def fit_estimates(loaded, sequences: int) -> list[dict[str, Tensor]]:
    blocks = find_blocks(loaded.model, loaded.spec)
    mlps = [b.mlp for _, b in blocks]
    xs: dict[int, list[Tensor]] = {i: [] for i in range(len(mlps))}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, i=i: xs[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, m in enumerate(mlps)
    ]
    try:
        with torch.no_grad():
            for b in calibration_batches(loaded, None, sequences):
                loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, (_, block) in enumerate(blocks):
        ffn = extract_ffn(block, loaded.spec)
        out.append(fit_gate_estimate(ffn, torch.cat(xs.pop(i))))
    return out


def masked_forward(est: dict[str, Tensor], keep: float, score: str):
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        act_g = self.act_fn(g)
        a = act_g * u
        if score == "absg":
            s, r = act_g.abs(), torch.zeros_like(est["mean"])
        else:
            s, r = gate_estimate_score(est, g, act_g), est["mean"]
        k = int(keep * s.shape[-1])
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, torch.topk(s, k, -1).indices, True)
        return self.down_proj(torch.where(mask, a, r))

    return forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a Llama-family model (gate_proj/up_proj/down_proj)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--scores", nargs="+", default=["est", "absg"], choices=["est", "absg"])
    p.add_argument("--calibration-sequences", type=int, default=32)
    p.add_argument("--eval-sequences", type=int, default=40)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    ests = fit_estimates(loaded, args.calibration_sequences)
    mlps = [b.mlp for _, b in find_blocks(loaded.model, loaded.spec)]
    rows = []
    for score in args.scores:
        for budget in args.budgets:
            keep = (3 * budget - 1) / 2
            for m, est in zip(mlps, ests, strict=True):
                m.forward = types.MethodType(masked_forward(est, keep, score), m)
            res = evaluate_model(loaded, max_sequences=args.eval_sequences)
            rows.append({"score": score, "budget": budget, "kept_fraction": keep,
                         **{f"{s['split']}_perplexity": s["perplexity"] for s in res["splits"]}})
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
