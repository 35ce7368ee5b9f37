"""The Python API in a few calls — what the CLI uses.

    import moefy
    moe = moefy.convert("smollm2-135m", moefy.ConvertConfig(budget=0.5))   # search + apply
    moefy.evaluate_model(moe)                                               # perplexity per split, FLOPs
    moe.configure(top_k=96); moe.save("runs/smol-moe")
    again = moefy.load("runs/smol-moe")                                     # base + plan, verified
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moefy.conversion import (
    apply,
    check_config_for,
    ffn_flops_fraction,
    ffn_shape,
    moe_layers,
    search,
)
from moefy.distributed import DataParallel
from moefy.errors import InvalidArgumentError
from moefy.evaluate import (
    embedding_fidelity,
    paired_texts,
    perplexity,
    retrieval_accuracy,
    sentence_embeddings,
)
from moefy.ffn import extract_ffn
from moefy.flops import dense_ffn_flops, moe_ffn_flops
from moefy.models import LoadedModel, ffn_width, load_model
from moefy.moe_model import MoEModel
from moefy.plan import ModelPlan, is_plan_folder
from moefy.routers import router_flops_per_token
from moefy.settings import ConvertConfig, RuntimeConfig, config_for
from moefy.specs import find_blocks
from moefy.text import (
    ALL_DOMAINS,
    TokenBatch,
    bundled_text,
    mix_batches,
    read_text_file,
    split_batches,
    tokenize_text,
)

log = logging.getLogger(__name__)

Target = LoadedModel | MoEModel
CALIBRATION_SEQ_LEN = 256  # tokens per calibration window


def load(
    name: str, *, base: str | None = None, runtime: RuntimeConfig | None = None, dtype: str = "float32", device: str = "cpu"
) -> Target:
    """A converted folder (adapter or export) as an `MoEModel`, else a dense model (bundled name,
    folder, HF id), in `dtype` (float32 | bfloat16 | float16) on `device` (cpu, cuda, cuda:N, mps)."""
    if Path(name).is_dir() and is_plan_folder(name):
        return MoEModel.from_pretrained(name, base=base, runtime=runtime, dtype=dtype, device=device)
    return load_model(name, dtype, device)



def _loaded(target: Target) -> LoadedModel:
    return target.loaded if isinstance(target, MoEModel) else target


def calibration_batches(
    loaded: LoadedModel, text_files: list[str] | None, sequences: int, seq_len: int = CALIBRATION_SEQ_LEN,
    mix: str = "multilingual",
) -> list[TokenBatch]:
    """Calibration text: the user's files, else the bundled calibration text of `mix`
    (settings.CALIBRATION_MIXES), in chunks of 8 sequences."""
    context = loaded.context_length
    if context is not None and context < seq_len:
        raise InvalidArgumentError(f"the model's context is {context} tokens, shorter than the {seq_len}-token calibration windows")
    if text_files:
        text = "\n\n".join(read_text_file(f) for f in text_files)
        batches = [tokenize_text(text, loaded.tokenizer, seq_len, sequences, name="calibration")]
    else:
        batches = mix_batches(loaded.tokenizer, mix, sequences, seq_len)
    return [c for b in batches for c in b.chunks(8)]


def evaluate_model(
    target: Target,
    *,
    text_files: list[str] | None = None,
    seq_len: int = 256,
    max_sequences: int = 40,
    reference: LoadedModel | None = None,
    domains: tuple[str, ...] = ALL_DOMAINS,
    progress: bool = False,
) -> dict:
    """Quality on each held-out split: perplexity (causal LMs; the bundled `domains`: English
    prose, code and five languages) or embedding fidelity and retrieval accuracy (encoders;
    fidelity against the dense base model's embeddings)."""
    loaded = _loaded(target)
    model = loaded.model
    context = loaded.context_length
    if context is not None and seq_len > context:
        raise InvalidArgumentError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens")
    for m in moe_layers(model):
        m.reset_counters()
    splits = []
    if loaded.is_causal:
        batches = split_batches(loaded.tokenizer, "evaluation", seq_len, max_sequences, text_files, domains)
        for name, batch in batches.items():
            splits.append({"split": name, "tokens": batch.num_tokens, "perplexity": perplexity(model, batch, progress=progress)})
    else:
        ref = reference
        if ref is None and isinstance(target, MoEModel):
            ref = load_model(loaded.source, next(model.parameters()).dtype, next(model.parameters()).device)
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
    if isinstance(target, MoEModel):
        result["ffn_flops_fraction"] = ffn_flops_fraction(model)
        result["runtime"] = target.runtime.to_json()
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


def convert(
    model: str | LoadedModel,
    config: ConvertConfig | None = None,
    *,
    calibration_text: list[str] | None = None,
    calibration: list[TokenBatch] | None = None,
    runtime: RuntimeConfig | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    search_checkpoint_dir: str | Path | None = None,
    parallel: DataParallel | None = None,
    progress: bool = False,
) -> MoEModel:
    """Load (if needed), search a plan on calibration text, distil it against the dense model
    (`config.distill`), apply it: the whole conversion. `config` defaults to the recommended
    settings; `runtime` to the k the routers were trained for. Calibration: `calibration`
    (tokenised batches), else the files `calibration_text`, else the bundled calibration text.
    `checkpoint_dir` / `search_checkpoint_dir`: where distillation / the search keep their
    resumable checkpoints (default: none). `parallel`: data-parallel calibration under torchrun
    (`moefy.distributed`). For a model larger than memory see `convert_plan`."""
    config = config or config_for(model if isinstance(model, str) else model.name)
    if isinstance(model, str):
        config.validate_for(ffn_width(model))  # an expert count that cannot fit fails before loading
    loaded = load_model(model, dtype, device) if isinstance(model, str) else model
    check_config_for(loaded, config)
    batches = calibration or calibration_batches(
        loaded, calibration_text, config.calibration_sequences, mix=config.calibration_mix
    )
    plan = search(loaded, batches, config, progress=progress, checkpoint_dir=search_checkpoint_dir, parallel=parallel)
    if config.adaptive_k and config.top_k is None:
        from moefy.allocate import adapt_top_k

        apply(loaded, plan, RuntimeConfig())
        plan.extra["allocation"] = adapt_top_k(loaded, plan, batches, config, progress=progress).summary()
    if config.distill and config.distill_steps > 0:
        from moefy.distill import distill

        apply(loaded, plan, RuntimeConfig())  # the k the routers were searched for
        report = distill(loaded, plan, batches, config, checkpoint_dir=checkpoint_dir, progress=progress)
        plan.extra["distillation"] = report.summary()
    apply(loaded, plan, runtime or RuntimeConfig())
    return MoEModel(loaded=loaded, plan=plan)


def convert_plan(
    model: str | LoadedModel,
    config: ConvertConfig | None = None,
    *,
    stream: bool = False,
    calibration_text: list[str] | None = None,
    calibration: list[TokenBatch] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    search_checkpoint_dir: str | Path | None = None,
    parallel: DataParallel | None = None,
    progress: bool = False,
) -> ModelPlan:
    """The plan of a conversion (what `moefy convert` saves), as `convert` makes it. With `stream`,
    for a model larger than memory: its blocks are read one at a time from its safetensors files and
    the whole model is never loaded (`moefy.streaming`); that is search only, since distillation
    runs the whole model, so it is skipped (logged; the plan records distill=False)."""
    if not stream:
        return convert(model, config, calibration_text=calibration_text, calibration=calibration, dtype=dtype, device=device,
                       checkpoint_dir=checkpoint_dir, search_checkpoint_dir=search_checkpoint_dir, parallel=parallel,
                       progress=progress).sync_plan()
    from moefy.streaming import skeleton, streamed_identity

    if not isinstance(model, str):
        raise InvalidArgumentError("stream=True reads the model from its files: give its name or folder, not a loaded model")
    config = config or config_for(model)
    config.validate_for(ffn_width(model))
    loaded, weights = skeleton(model, dtype, device)  # reads the config and the shard index only
    if config.distill and config.distill_steps > 0:
        log.warning("--stream: distillation is skipped (its teacher and student are forward passes of the whole model); "
                    "convert without --stream where the model fits in memory to distil it")
        config = config.replace(distill=False)
    if config.adaptive_k and config.top_k is None:
        log.warning("--stream: --adaptive-k is skipped (it measures each layer's sensitivity through the whole model); "
                    "every layer gets the budget's k")
        config = config.replace(adaptive_k=False)
    check_config_for(loaded, config)
    batches = calibration or calibration_batches(
        loaded, calibration_text, config.calibration_sequences, mix=config.calibration_mix
    )
    base = streamed_identity(loaded, weights)
    return search(loaded, batches, config, progress=progress, checkpoint_dir=search_checkpoint_dir, base=base, weights=weights,
                  parallel=parallel)


def distill_checkpoint_dir(out: str | Path) -> Path:
    """Where a conversion writing `out` keeps its resumable distillation checkpoint: `OUT.distill`
    beside it (rerun the same command to continue; removed once `out` is saved)."""
    out = Path(out)
    return out.with_name(out.name + ".distill")


def search_checkpoint_dir(out: str | Path) -> Path:
    """Where a conversion writing `out` keeps its resumable search checkpoint: `OUT.search` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".search")


def remove_checkpoints(out: str | Path) -> None:
    """Remove the search and distillation checkpoints of a conversion once `out` is saved."""
    import shutil

    for folder in (search_checkpoint_dir(out), distill_checkpoint_dir(out)):
        shutil.rmtree(folder, ignore_errors=True)


def flops_table(name: str, *, experts: int | None = None, top_k: int | None = None) -> list[dict]:
    """Per-token FFN FLOPs (one layer) for each k: dense, MoE with and without static embeddings.
    For a converted folder: its k; for a dense model: a range of k with `experts` (default: the
    recommended config), router included."""
    target = load(name)
    if isinstance(target, MoEModel):
        from moefy.conversion import layer_shape

        m = moe_layers(target.model)[0]
        if experts is not None and experts != m.num_experts:
            raise InvalidArgumentError(f"--experts {experts}: {name} has {m.num_experts} experts per FFN")
        shape, experts, ks = layer_shape(m), m.num_experts, [top_k or m.top_k]
        router = m.router.flops_per_token() if m.router is not None else 0
    else:
        defaults = ConvertConfig()
        experts = experts or defaults.num_experts
        shape = ffn_shape(extract_ffn(find_blocks(target.model, target.spec)[0][1], target.spec))
        defaults.replace(num_experts=experts).validate_for(shape.d_ff)
        ks = [top_k] if top_k else [max(1, experts * f // 8) for f in (1, 2, 4, 6, 7)]
        shared = defaults.replace(num_experts=experts, top_k=None).num_shared  # the recommended shared experts
        router = router_flops_per_token(shape.d_model, experts - shared, defaults.router_hidden)
    if any(not 1 <= k <= experts for k in ks):
        raise InvalidArgumentError(f"--top-k {ks[0]} must be between 1 and {experts}")
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
    "ConvertConfig", "MoEModel", "RuntimeConfig", "calibration_batches", "convert", "convert_plan", "evaluate_model",
    "ffn_statistics", "flops_table", "load",
]
