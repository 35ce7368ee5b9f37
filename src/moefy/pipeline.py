"""The main job, end to end: evaluate the dense model, convert it with the recommended settings,
evaluate the MoE model, save it, and write its report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from moefy.api import convert_model, evaluate_model
from moefy.checkpoint import save_converted
from moefy.convert import ffn_flops_fraction
from moefy.errors import CheckpointError
from moefy.models import load_model

log = logging.getLogger(__name__)

# Recommended settings per bundled model (see README "Results" for the measurements behind them).
RECOMMENDED: dict[str, dict] = {
    "smollm2-135m": dict(num_experts=256, method="kmeans", shared_fraction=0.1),
    "minilm-l6": dict(num_experts=256, method="kmeans", shared_fraction=0.1),
}
FALLBACK = dict(num_experts=128, method="kmeans", shared_fraction=0.1)


def run_main_job(
    name: str = "smollm2-135m",
    *,
    out: str = "runs/smollm2-135m-moe",
    num_experts: int | None = None,
    budget: float = 0.75,
    shared_fraction: float | None = None,
    eval_sequences: int = 40,
    overwrite: bool = False,
    report: bool = True,
) -> dict:
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"output folder {out!r} already exists; pass --overwrite to replace it")
    settings = dict(RECOMMENDED.get(name, FALLBACK))
    if num_experts is not None:
        settings["num_experts"] = num_experts
    if shared_fraction is not None:
        settings["shared_fraction"] = shared_fraction
    loaded = load_model(name)
    t0 = time.perf_counter()
    dense = evaluate_model(loaded, max_sequences=eval_sequences, progress=True)
    log.info("dense evaluation took %.0f s", time.perf_counter() - t0)
    dense_identity = loaded.identity()
    reference = load_model(name) if not loaded.is_causal else None  # encoders: fidelity vs dense
    converted = convert_model(loaded, budget=budget, progress=True, **settings)
    moe = evaluate_model(converted, max_sequences=eval_sequences, reference=reference, progress=True)
    summary = {
        "model": name,
        "settings": converted.config.to_json(),
        "budget": budget,
        "conversion_seconds": round(converted.seconds, 1),
        "ffn_flops_fraction": round(ffn_flops_fraction(converted.model), 4),
        "dense": dense["splits"],
        "moe": moe["splits"],
        "router_recall": [r.router_recall for r in converted.layers],
    }
    assert converted.base_identity == dense_identity
    save_converted(converted, out, overwrite=overwrite, extra={"evaluation": summary})
    (Path(out) / "results.json").write_text(json.dumps(summary, indent=2))
    if report:
        try:
            from moefy.report import write_report
        except ImportError:  # the report module is optional at this stage
            log.warning("moefy.report is not available; skipping the HTML report")
        else:
            summary["report"] = str(write_report(out, converted=converted))
    summary["out"] = out
    return summary
