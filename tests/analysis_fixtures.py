"""Shared fixtures of the analysis and report tests: tiny models with a byte tokenizer, and one
conversion folder with every analysis saved (built once per test session)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moefy.analysis import (
    cost_breakdown,
    expert_specialisation,
    routing_diagnostics,
    save_result,
    sparsity_profile,
)
from moefy.analysis.corpus import TextCategory
from moefy.analysis.results import COST, ROUTING, SPECIALISATION
from moefy.analysis.sparsity import swap_activation
from moefy.convert import ConvertConfig, convert
from moefy.models import LoadedModel
from moefy.specs import resolve_spec
from moefy.text import TokenBatch
from tests.tiny_models import tiny_model


class ByteTokenizer:
    """A stand-in tokenizer for tiny models: one token per UTF-8 byte (ids 3..127), BOS = 1."""

    bos_token_id = 1
    all_special_ids = [0, 1, 2]

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[3 + b % 125 for b in text.encode("utf-8")])


def loaded_tiny(model_type: str, seed: int = 0) -> LoadedModel:
    model = tiny_model(model_type, seed=seed)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), spec=resolve_spec(model), name=f"tiny-{model_type}", source="")


def random_batches(n_seq: int = 16, seq_len: int = 32, seed: int = 1) -> list[TokenBatch]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n_seq, seq_len), generator=g)
    return TokenBatch(ids, torch.ones_like(ids), "random").chunks(8)


def tiny_config(**kw) -> ConvertConfig:
    base = dict(num_experts=8, top_k=4, sample_size=512, router_epochs=3, router_hidden=16, kernel="reference",
                sequential=False)
    base.update(kw)
    return ConvertConfig(**base)


def converted_tiny(model_type: str = "llama", **kw):
    """(LoadedModel converted in place, ConvertedModel)."""
    loaded = loaded_tiny(model_type)
    return loaded, convert(loaded, random_batches(32, 48), tiny_config(**kw))


_FOLDERS: dict[int, Path] = {}


def shared_analysis_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama conversion folder with every analysis saved in FOLDER/analysis, built once
    per test session (test modules wrap this in their own session fixture)."""
    key = id(tmp_path_factory)
    if key not in _FOLDERS:
        _FOLDERS[key] = _build_analysis_folder(tmp_path_factory.mktemp("analysis") / "conv")
    return _FOLDERS[key]


def _build_analysis_folder(target: Path) -> Path:
    from moefy.checkpoint import save_converted

    profile = sparsity_profile(loaded_tiny("llama"), random_batches(), eps=(0.01, 0.1, 0.3))
    relu = loaded_tiny("bert")
    swap_activation(relu, "relu")
    relu_profile = sparsity_profile(relu, random_batches(), eps=(0.01, 0.1, 0.3), label="tiny-bert ReLU (synthetic)",
                                    note="synthetic reference for the test")
    loaded, result = converted_tiny("llama")
    folder = save_converted(result, target)
    out = folder / "analysis"
    save_result(profile, out, "sparsity-tiny-llama")
    save_result(relu_profile, out, "sparsity-tiny-bert-relu")
    save_result(routing_diagnostics(loaded.model, random_batches(4, 24), name="tiny", causal=True), out, ROUTING)
    cats = [TextCategory(n, f, t * 10) for n, f, t in [
        ("A", "f1", "alpha beta gamma delta "), ("B", "f1", "alpha beta epsilon zeta "),
        ("C", "f2", "def f(x): return x + 1\n"), ("D", "f3", "0101 1100 0011 ")]]
    spec = expert_specialisation(loaded.model, loaded.tokenizer, cats, name="tiny", chunk_tokens=16, chunks_per_category=3,
                                 tsne=False)
    spec.tsne = spec.pca.clone()  # draw the t-SNE panel too, without paying for t-SNE
    save_result(spec, out, SPECIALISATION)
    save_result(cost_breakdown(loaded.model, name="tiny"), out, COST)
    return folder
