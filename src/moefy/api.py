"""The Python API in a few calls: load, evaluate, convert, save — what the CLI uses.

    import moefy.api as moefy
    dense = moefy.load_any("smollm2-135m")
    converted = moefy.convert_model("smollm2-135m", num_experts=128, budget=0.75)
    moefy.evaluate_model(converted)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moefy.checkpoint import is_converted_checkpoint, load_converted, save_converted
from moefy.convert import ConvertConfig, ConvertedModel, configure, convert, ffn_flops_fraction, moe_layers
from moefy.errors import InvalidArgumentError
from moefy.evaluate import (
    embedding_fidelity,
    paired_texts,
    perplexity,
    retrieval_accuracy,
    sentence_embeddings,
)
from moefy.flops import FFNShape, dense_ffn_flops, k_for_budget, moe_ffn_flops
from moefy.models import LoadedModel, load_model
from moefy.text import TokenBatch, bundled_text, read_text_file, split_batches, tokenize_text

log = logging.getLogger(__name__)

Target = LoadedModel | ConvertedModel


def load_any(name: str) -> Target:
    """A dense model (bundled name, folder, HF id) or a converted checkpoint folder."""
    if Path(name).is_dir() and is_converted_checkpoint(name):
        return load_converted(name)
    return load_model(name)


def _loaded(target: Target) -> LoadedModel:
    return target.loaded if isinstance(target, ConvertedModel) else target


def calibration_batches(loaded: LoadedModel, text_files: list[str] | None, sequences: int, seq_len: int = 256) -> list[TokenBatch]:
    """Calibration text: the user's files, else the bundled English and code calibration splits
    (half each), in chunks of 8 sequences."""
    if text_files:
        text = "\n\n".join(read_text_file(f) for f in text_files)
        batches = [tokenize_text(text, loaded.tokenizer, seq_len, sequences, name="calibration")]
    else:
        per = max(1, sequences // 2)
        batches = [
            tokenize_text(bundled_text(d, "calibration"), loaded.tokenizer, seq_len, per, name=f"{d}_calibration")
            for d in ("english", "code")
        ]
    return [c for b in batches for c in b.chunks(8)]


def evaluate_model(
    target: Target,
    *,
    text_files: list[str] | None = None,
    seq_len: int = 256,
    max_sequences: int = 40,
    reference: LoadedModel | None = None,
    progress: bool = False,
) -> dict:
    """Quality on each held-out split: perplexity (causal LMs) or embedding fidelity and
    retrieval accuracy (encoders; fidelity against the dense base model's embeddings)."""
    loaded = _loaded(target)
    model = loaded.model
    for m in moe_layers(model):
        m.reset_counters()
    splits = []
    if loaded.is_causal:
        batches = split_batches(loaded.tokenizer, "evaluation", seq_len, max_sequences, text_files)
        for name, batch in batches.items():
            splits.append({"split": name, "tokens": batch.num_tokens, "perplexity": perplexity(model, batch, progress=progress)})
    else:
        ref = reference
        if ref is None and isinstance(target, ConvertedModel):
            ref = load_model(loaded.name)
        texts = {Path(f).name: read_text_file(f) for f in text_files} if text_files else {"english": bundled_text("english", "evaluation")}
        for name, text in texts.items():
            pairs = paired_texts(text, max_pairs=max_sequences * 5)
            q = sentence_embeddings(model, loaded.tokenizer, pairs.queries)
            d = sentence_embeddings(model, loaded.tokenizer, pairs.documents)
            if ref is not None:
                rq = sentence_embeddings(ref.model, ref.tokenizer, pairs.queries)
                rd = sentence_embeddings(ref.model, ref.tokenizer, pairs.documents)
                fidelity = embedding_fidelity(torch.cat([q, d]), torch.cat([rq, rd]))
            else:
                fidelity = 1.0  # the dense model is its own reference
            splits.append(
                {"split": name, "pairs": len(pairs.queries), "embedding_fidelity": fidelity,
                 "retrieval_accuracy": retrieval_accuracy(q, d)}
            )
    result: dict = {"model": loaded.name, "splits": splits}
    if isinstance(target, ConvertedModel):
        result["ffn_flops_fraction"] = ffn_flops_fraction(model)
        result["config"] = target.config.to_json()
    return result


def ffn_statistics(name: str, *, text_files: list[str] | None = None, max_sequences: int = 16, seq_len: int = 256) -> list[dict]:
    """Per-layer activation statistics of a dense model over calibration text."""
    from moefy.calibrate import calibrate_blockwise

    loaded = load_model(name)
    batches = calibration_batches(loaded, text_files, max_sequences, seq_len)
    rows = []
    for layer in calibrate_blockwise(loaded.model, loaded.spec, batches, sample_size=2048, sequential=False):
        st = layer.stats
        soft = st.soft_sparsity()  # (len(eps), h)
        row = {
            "layer": layer.index, "tokens": st.count, "mean|a|": float(st.total_abs.sum() / st.count / st.d_ff),
            "exact_sparsity": float(st.exact_sparsity().mean()),
        }
        for e, frac in zip(st.eps, soft.mean(1).tolist(), strict=True):
            row[f"|a|<={e:g}"] = frac
        rows.append(row)
    return rows


def convert_model(
    name: str | LoadedModel,
    *,
    num_experts: int = 128,
    top_k: int | None = None,
    budget: float | None = None,
    calibration_text: list[str] | None = None,
    calibration_sequences: int = 128,
    progress: bool = False,
    keep_calibration: bool = False,
    **options,
) -> ConvertedModel:
    """Load (if needed), calibrate and convert. Give `top_k` or an FFN FLOPs `budget`."""
    loaded = load_model(name) if isinstance(name, str) else name
    options = {k: v for k, v in options.items() if v is not None}
    if top_k is None and budget is None:
        budget = 0.75
    if budget is not None and not 0 < budget <= 1:
        raise InvalidArgumentError(f"--budget {budget} must be in (0, 1]")
    config = ConvertConfig(num_experts=num_experts, top_k=top_k or num_experts, **options)
    if budget is not None:
        config.top_k = k_for_model_budget(loaded, config, budget)
    batches = calibration_batches(loaded, calibration_text, calibration_sequences)
    return convert(loaded, batches, config, progress=progress, keep_calibration=keep_calibration)


def k_for_model_budget(loaded: LoadedModel, config: ConvertConfig, budget: float) -> int:
    """The top_k that keeps a dense model's FFNs, once converted with `config`, within an FFN
    FLOPs budget (router included)."""
    from moefy.ffn import extract_ffn
    from moefy.routers import MLPRouter
    from moefy.specs import find_blocks

    ffn = extract_ffn(find_blocks(loaded.model, loaded.spec)[0][1], loaded.spec)
    shape = FFNShape(ffn.d_model, ffn.d_ff, ffn.gated, ffn.b_up is not None, ffn.b_down is not None)
    shared = round(config.shared_fraction * config.num_experts)
    router = 0
    if config.selection == "router":
        router = MLPRouter(ffn.d_model, config.num_experts - shared, config.router_hidden).flops_per_token()
    return k_for_budget(shape, config.num_experts, budget, router, min_k=max(1, shared + 1))


def convert_and_save(name: str, out: str, *, overwrite: bool = False, **kwargs) -> dict:
    """Convert and save; returns a summary (time, k, FLOPs fraction, router recall)."""
    if Path(out).exists() and not overwrite:
        from moefy.errors import CheckpointError

        raise CheckpointError(f"output folder {out!r} already exists; pass --overwrite to replace it")
    converted = convert_model(name, **kwargs)
    save_converted(converted, out, overwrite=overwrite)
    recalls = [r.router_recall for r in converted.layers if r.router_recall is not None]
    return {
        "out": out, "seconds": round(converted.seconds, 1), "num_experts": converted.config.num_experts,
        "top_k": converted.config.top_k, "ffn_flops_fraction": round(ffn_flops_fraction(converted.model, measured=False), 4),
        "mean_router_recall": round(sum(recalls) / len(recalls), 4) if recalls else None,
    }


def flops_table(name: str, *, experts: int = 128, top_k: int | None = None) -> list[dict]:
    """Per-token FFN FLOPs (one layer) for each k: dense, MoE with and without static embeddings."""
    if Path(name).is_dir() and is_converted_checkpoint(name):
        converted = load_converted(name)
        m = moe_layers(converted.model)[0]
        shape = FFNShape(m.d_model, m.num_experts * m.expert_size, m.gated, m.b_in is not None, m.b_out is not None)
        experts, ks = m.num_experts, [m.top_k]
        router = m.router.flops_per_token() if m.router is not None else 0
    else:
        from moefy.ffn import extract_ffn
        from moefy.specs import find_blocks

        loaded = load_model(name)
        ffn = extract_ffn(find_blocks(loaded.model, loaded.spec)[0][1], loaded.spec)
        shape = FFNShape(ffn.d_model, ffn.d_ff, ffn.gated, ffn.b_up is not None, ffn.b_down is not None)
        ks = [top_k] if top_k else [max(1, experts * f // 8) for f in (1, 2, 4, 6, 7)]
        from moefy.routers import MLPRouter

        router = MLPRouter(shape.d_model, experts, ConvertConfig.router_hidden).flops_per_token()  # the default router
    dense = dense_ffn_flops(shape)
    rows = []
    for k in ks:
        with_static = moe_ffn_flops(shape, experts, k, router)
        without = moe_ffn_flops(shape, experts, k, router, static_embeddings=False)
        rows.append({
            "experts": experts, "top_k": k, "dense_flops": dense, "router_flops": router, "moe_flops": int(with_static),
            "moe_fraction": with_static / dense, "no_static_flops": int(without), "no_static_fraction": without / dense,
        })
    return rows


__all__ = [
    "load_any", "evaluate_model", "convert_model", "convert_and_save", "flops_table", "ffn_statistics",
    "calibration_batches", "configure", "save_converted", "load_converted",
]
