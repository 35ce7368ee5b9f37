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
from moefy.api import convert
from moefy.models import LoadedModel
from moefy.moe_model import MoEModel
from moefy.settings import ConvertConfig, RuntimeConfig
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


_SEARCH_FIELDS = set(ConvertConfig.__dataclass_fields__)
_RUNTIME_ONLY = set(RuntimeConfig.__dataclass_fields__) - _SEARCH_FIELDS  # selection, tau, kernel


def tiny_settings(**kw) -> tuple[ConvertConfig, RuntimeConfig]:
    """Small, fast settings for tiny models: 8 experts, k=4 (no budget), no shared expert, a small
    MLP router, the reference kernel. Keyword arguments go to ConvertConfig, except the runtime-only
    ones (selection, tau, kernel), which go to RuntimeConfig."""
    search = dict(num_experts=8, top_k=4, budget=None, shared_fraction=0.0, sample_size=512, router_epochs=3,
                  router_hidden=16, sequential=False, distill=False, adaptive_k=False)
    runtime = dict(kernel="reference")
    for k, v in kw.items():
        (runtime if k in _RUNTIME_ONLY else search)[k] = v
    if "budget" in kw and "top_k" not in kw:
        search["top_k"] = None
    return ConvertConfig(**search), RuntimeConfig(**runtime)


def tiny_config(**kw) -> ConvertConfig:
    return tiny_settings(**kw)[0]


def convert_tiny(loaded: LoadedModel, batches: list[TokenBatch] | None = None, **kw) -> MoEModel:
    """`moefy.api.convert` with `tiny_settings(**kw)` on `batches` (default: 32 random sequences of 48)."""
    config, runtime = tiny_settings(**kw)
    return convert(loaded, config, calibration=random_batches(32, 48) if batches is None else batches, runtime=runtime)


def converted_tiny(model_type: str = "llama", **kw) -> tuple[LoadedModel, MoEModel]:
    """(LoadedModel converted in place, its MoEModel)."""
    loaded = loaded_tiny(model_type)
    return loaded, convert_tiny(loaded, **kw)


_FOLDERS: dict[int, Path] = {}


def shared_analysis_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama conversion folder with every analysis saved in FOLDER/analysis, built once
    per test session (test modules wrap this in their own session fixture)."""
    key = id(tmp_path_factory)
    if key not in _FOLDERS:
        _FOLDERS[key] = _build_analysis_folder(tmp_path_factory.mktemp("analysis") / "conv")
    return _FOLDERS[key]


def _build_analysis_folder(target: Path) -> Path:
    profile = sparsity_profile(loaded_tiny("llama"), random_batches(), eps=(0.01, 0.1, 0.3))
    relu = loaded_tiny("bert")
    swap_activation(relu, "relu")
    relu_profile = sparsity_profile(relu, random_batches(), eps=(0.01, 0.1, 0.3), label="tiny-bert ReLU (synthetic)",
                                    note="synthetic reference for the test")
    loaded, moe = converted_tiny("llama")
    folder = moe.save(target)
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
