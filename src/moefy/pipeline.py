"""The main job, end to end: evaluate the dense model, convert it with the recommended settings
(`moefy.settings.ConvertConfig` defaults), evaluate the MoE model, save its plan, write its report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from moefy.api import (
    convert,
    distill_checkpoint_dir,
    evaluate_model,
    remove_checkpoints,
    search_checkpoint_dir,
)
from moefy.conversion import check_config_for, ffn_flops_fraction
from moefy.models import ffn_width, load_model
from moefy.outputs import check_writable
from moefy.settings import ConvertConfig

log = logging.getLogger(__name__)


def run_main_job(
    name: str = "smollm2-135m",
    config: ConvertConfig | None = None,
    *,
    out: str = "runs/smollm2-135m-moe",
    eval_sequences: int = 40,
    overwrite: bool = False,
    report: bool = True,
    progress: bool = True,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict:
    """Returns the summary that is also written to `out/results.json`."""
    config = config or ConvertConfig()
    check_writable(out, overwrite=overwrite)
    config.validate_for(ffn_width(name))  # before loading
    loaded = load_model(name, dtype, device)
    check_config_for(loaded, config)  # before minutes of dense evaluation
    t0 = time.perf_counter()
    dense = evaluate_model(loaded, max_sequences=eval_sequences, progress=progress)
    log.info("dense evaluation took %.0f s", time.perf_counter() - t0)
    reference = load_model(name, dtype, device) if not loaded.is_causal else None  # encoders: fidelity vs dense
    t0 = time.perf_counter()
    moe = convert(loaded, config, checkpoint_dir=distill_checkpoint_dir(out), search_checkpoint_dir=search_checkpoint_dir(out),
                  progress=progress)
    plan = moe.plan
    conversion_seconds = time.perf_counter() - t0
    evaluation = evaluate_model(moe, max_sequences=eval_sequences, reference=reference, progress=progress)
    summary = {
        "model": name,
        "dtype": dtype,
        "settings": config.to_json(),
        "conversion_seconds": round(conversion_seconds, 1),
        "search_seconds": round(plan.seconds, 1),
        "distillation": plan.extra.get("distillation"),
        "top_k": plan.layers[0].top_k,
        "top_k_per_layer": [lp.top_k for lp in plan.layers],
        "allocation": plan.extra.get("allocation"),
        "num_experts": config.num_experts,
        "ffn_flops_fraction": round(ffn_flops_fraction(loaded.model), 4),
        "dense": dense["splits"],
        "moe": evaluation["splits"],
        "router_recall": [lp.router_recall for lp in plan.layers],
    }
    plan.extra["evaluation"] = summary
    moe.save(out, overwrite=overwrite)
    remove_checkpoints(out)
    (Path(out) / "results.json").write_text(json.dumps(summary, indent=2))
    if report:
        from moefy.report import write_report

        summary["report"] = str(write_report(out, converted=moe))
    summary["out"] = out
    return summary
