"""Analyses on tiny random models: sparsity against brute force, routing diagnostics against the
MoE layer itself, specialisation, cost against hand-computed FLOPs, save/load round trips,
figures, and the `analyze` / `report` CLI."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moefy.analysis import (
    AnalysisError,
    CostBreakdown,
    RoutingDiagnostics,
    SparsityProfile,
    Specialisation,
    cost_breakdown,
    expert_specialisation,
    load_result,
    routing_diagnostics,
    save_result,
    silhouette_score,
    sparsity_profile,
)
from moefy.analysis.corpus import TextCategory, text_categories
from moefy.analysis.routing import layer_loss_sweep
from moefy.analysis.sparsity import swap_activation
from moefy.analysis.specialisation import pca_2d
from moefy.conversion import configure, moe_layers
from moefy.errors import InvalidArgumentError
from moefy.ffn import extract_ffn
from moefy.flops import FFNShape, dense_ffn_flops, moe_ffn_flops
from moefy.models import LoadedModel
from moefy.specs import find_blocks
from moefy.text import TokenBatch
from tests.analysis_fixtures import converted_tiny, loaded_tiny, random_batches, shared_analysis_folder


@pytest.fixture(scope="session")
def analysis_folder(tmp_path_factory):
    return shared_analysis_folder(tmp_path_factory)


# ---- sparsity ---------------------------------------------------------------------------------------
def _activations(loaded: LoadedModel, batches: list[TokenBatch]) -> list[torch.Tensor]:
    """Brute force: every layer's FFN activations (T, h) by hooking the dense model."""
    seen: list[torch.Tensor] = []
    blocks = find_blocks(loaded.model, loaded.spec)
    handles = []
    for _, block in blocks:
        ffn = extract_ffn(block, loaded.spec)
        mod = block.get_submodule(loaded.spec.ffn or loaded.spec.up)
        handles.append(mod.register_forward_pre_hook(lambda _m, a, ffn=ffn: seen.append(ffn.activation(a[0]).reshape(-1, ffn.d_ff))))
    with torch.no_grad():
        for b in batches:
            loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in handles:
        h.remove()
    n = len(blocks)
    return [torch.cat(seen[i::n]) for i in range(n)]


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_sparsity_matches_brute_force(model_type: str) -> None:
    loaded = loaded_tiny(model_type)
    batches = random_batches()
    eps = (0.01, 0.1)
    profile = sparsity_profile(loaded, batches, eps=eps, sample_size=10_000, neurons=3, pooled=500)
    acts = _activations(loaded, batches)
    assert profile.tokens == profile.sample_tokens == 16 * 32
    for i, a in enumerate(acts):
        r = a.mean(0)
        assert profile.exact[i] == pytest.approx(float((a == 0).float().mean()), abs=1e-6)
        for j, e in enumerate(eps):
            assert profile.soft[i, j] == pytest.approx(float((a.abs() <= e).float().mean()), abs=1e-6)
            assert profile.centred[i, j] == pytest.approx(float(((a - r).abs() <= e).float().mean()), abs=2e-3)
    assert profile.neuron_values.shape == (3, 16 * 32)
    assert profile.layer_values.shape == profile.layer_r.shape == (500,)
    assert len(profile.neuron_kinds) == 3
    if model_type == "opt":  # ReLU: many exact zeros; SiLU (llama): none
        assert float(profile.exact.min()) > 0.2
    else:
        assert float(profile.exact.max()) == 0.0


def test_relu_swap_makes_exact_zeros_and_is_labelled(tmp_path) -> None:
    loaded = loaded_tiny("bert")
    before = sparsity_profile(loaded, random_batches(), eps=(0.1,))
    swap_activation(loaded, "relu")
    after = sparsity_profile(loaded, random_batches(), eps=(0.1,), note="synthetic")
    assert float(before.exact.max()) == 0.0 and float(after.exact.min()) > 0.2
    assert "ReLU" in after.label and after.note
    with pytest.raises(InvalidArgumentError, match="unknown activation"):
        swap_activation(loaded, "tanh")
    with pytest.raises(InvalidArgumentError, match="eps"):
        sparsity_profile(loaded, random_batches(), eps=(0.0,))


def test_results_round_trip(tmp_path) -> None:
    profile = sparsity_profile(loaded_tiny("llama"), random_batches(), eps=(0.03, 0.3))
    json_path, st_path = save_result(profile, tmp_path, "sparsity-x")
    assert json_path.is_file() and st_path is not None and st_path.is_file()
    back = load_result(SparsityProfile, tmp_path, "sparsity-x")
    assert back.label == profile.label and back.eps == profile.eps and back.layer_names == profile.layer_names
    torch.testing.assert_close(back.centred, profile.centred)
    with pytest.raises(AnalysisError, match="does not hold"):
        load_result(CostBreakdown, tmp_path, "sparsity-x")
    with pytest.raises(AnalysisError, match="no analysis result"):
        load_result(SparsityProfile, tmp_path, "missing")


# ---- routing ----------------------------------------------------------------------------------------
def test_routing_diagnostics_against_the_moe_layer() -> None:
    loaded, _ = converted_tiny(selection="router")
    batches = random_batches(8, 24, seed=3)
    diag = routing_diagnostics(loaded.model, batches, name="tiny", causal=True, max_tokens=10_000)
    layers = moe_layers(loaded.model)
    tokens = 8 * 24
    assert diag.tokens == tokens
    assert diag.load.shape == (len(layers), 8)
    torch.testing.assert_close(diag.load.sum(1), torch.full((len(layers),), float(tokens * 4)))
    assert ((diag.recall >= 0) & (diag.recall <= 1)).all()
    assert (diag.mass_captured <= diag.oracle_mass_captured + 1e-6).all()  # the oracle's top-k maximises it
    # relative error == ‖MoE(x) − all-experts(x)‖ / ‖all-experts(x)‖ on the same inputs
    from moefy.analysis.routing import capture_moe_inputs

    x = capture_moe_inputs(loaded.model, batches, 10_000)[0]
    m = layers[0]
    with torch.no_grad():
        y_moe = m(x)
        m.configure(selection="all")
        y_all = m(x)
        m.configure(selection="router", top_k=4)
    expected = float((y_moe - y_all).norm() / y_all.norm())
    assert diag.relative_error[0] == pytest.approx(expected, rel=1e-3)
    # the loss sweep restores every layer's configuration
    assert all(m.selection == "router" and m.top_k == 4 for m in layers)
    # the sweep's losses against brute force: mean next-token NLL of the dense model (a fresh copy)
    # and of the converted model as configured, on the same tokens
    assert diag.layer_loss.shape == (len(layers),)
    assert diag.dense_loss == pytest.approx(_mean_nll(loaded_tiny("llama").model, batches), rel=1e-4)
    assert diag.full_loss == pytest.approx(_mean_nll(loaded.model, batches), rel=1e-4)
    assert 0.99 < float(diag.loss_share.sum()) < 1.01 or float(diag.layer_delta.clamp_min(0).sum()) == 0


def _mean_nll(model: torch.nn.Module, batches: list[TokenBatch]) -> float:
    """Mean next-token negative log-likelihood over every predicted token (brute force)."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
            target = b.input_ids[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            tokens += target.numel()
    return nll / tokens


def test_oracle_selection_has_perfect_recall_and_all_experts_no_loss() -> None:
    loaded, _ = converted_tiny(selection="oracle")
    batches = random_batches(4, 16, seed=4)
    diag = routing_diagnostics(loaded.model, batches, name="tiny", causal=True, loss_sweep=False)
    assert diag.layer_loss.isnan().all()
    torch.testing.assert_close(diag.recall, torch.ones_like(diag.recall))
    torch.testing.assert_close(diag.mass_captured, diag.oracle_mass_captured)
    configure(loaded.model, top_k=8)
    dense, full, per_layer = layer_loss_sweep(loaded.model, batches, causal=True)
    assert full == pytest.approx(dense, abs=1e-5) and per_layer == pytest.approx([dense] * len(per_layer), abs=1e-5)


def test_encoder_loss_is_one_minus_cosine() -> None:
    loaded, _ = converted_tiny("bert", selection="oracle")
    diag = routing_diagnostics(loaded.model, random_batches(4, 16), name="tiny-bert", causal=False)
    assert diag.quality_metric == "1-cosine"
    assert diag.dense_loss == pytest.approx(0.0, abs=1e-6) and 0 <= diag.full_loss <= 2


def test_routing_needs_a_converted_model() -> None:
    with pytest.raises(AnalysisError, match="no MoE layers"):
        routing_diagnostics(loaded_tiny("llama").model, random_batches(), name="dense", causal=True)


# ---- specialisation ----------------------------------------------------------------------------------
def test_silhouette_and_pca() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g) + 6])
    labels = torch.tensor([0] * 10 + [1] * 10)
    assert silhouette_score(x, labels) > 0.6
    sklearn = pytest.importorskip("sklearn.metrics")
    noisy = torch.randint(0, 3, (20,), generator=g)
    assert silhouette_score(x, noisy) == pytest.approx(float(sklearn.silhouette_score(x.numpy(), noisy.numpy())), abs=1e-6)
    proj, var = pca_2d(x)
    assert proj.shape == (20, 2) and var[0] > 0.8 and var[0] >= var[1]
    with pytest.raises(AnalysisError, match="clusters"):
        silhouette_score(x, torch.zeros(20, dtype=torch.long))


def test_specialisation_usage_vectors() -> None:
    loaded, _ = converted_tiny(selection="router")
    cats = [
        TextCategory("A", "fam1", "the quick brown fox jumps over the lazy dog " * 12),
        TextCategory("B", "fam1", "pack my box with five dozen liquor jugs " * 12),
        TextCategory("C", "fam2", "0123456789 {}[]()<>;:=+-*/ " * 12),
        TextCategory("D", "fam2", "x"),  # too short for one chunk: skipped with a note
    ]
    s = expert_specialisation(loaded.model, loaded.tokenizer, cats, name="tiny", chunk_tokens=24, chunks_per_category=3,
                              tsne=False)
    assert s.categories == ["A", "B", "C"] and s.families == ["fam1", "fam1", "fam2"]
    assert s.usage.shape == (9, len(moe_layers(loaded.model)), 8)
    torch.testing.assert_close(s.usage.sum(-1), torch.ones(9, s.usage.shape[1]))
    assert s.pca.shape == (9, 2) and -1 <= s.silhouette_family <= 1
    assert any("skipped D" in n for n in s.notes)


def test_bundled_text_categories() -> None:
    cats = text_categories()
    names = [c.name for c in cats]
    assert len(cats) >= 20 and "French" in names and "Python code" in names and "English prose" in names
    assert len({c.family for c in cats}) >= 8
    assert all(len(c.text) > 1000 for c in cats)
    with pytest.raises(AnalysisError, match="Klingon"):
        text_categories(["Klingon"])


# ---- cost --------------------------------------------------------------------------------------------
def test_cost_breakdown_matches_hand_count() -> None:
    loaded, _ = converted_tiny(selection="router")
    c = cost_breakdown(loaded.model, name="tiny", measured=False)
    m = moe_layers(loaded.model)[0]
    d, h = 32, 128
    shape = FFNShape(d, h, gated=True)
    assert c.dense[0] == dense_ffn_flops(shape) == 3 * 2 * d * h + h
    router = m.router.flops_per_token()
    # 4 of 8 experts: half the expert FLOPs, k + 1 static-vector adds, plus the router
    assert c.moe_static[0] == pytest.approx((3 * 2 * d * h + h) / 2 + d * 5 + router)
    assert c.moe_no_static[0] == pytest.approx(moe_ffn_flops(shape, 8, 4, router, static_embeddings=False))
    assert c.moe_no_static[0] > c.moe_static[0]
    t = c.totals
    assert t["moe_static_fraction"] == pytest.approx(sum(c.moe_static) / sum(c.dense))
    assert c.curve_k_fraction[-1] == 1.0 and c.curve_static[-1] > 1.0  # all experts + router costs more than dense


# ---- figures and CLI ------------------------------------------------------------------------------------
def test_figures_from_folder(analysis_folder) -> None:
    from moefy.analysis.results import load_folder
    from moefy.plots import figures_from_folder, png_bytes

    folder = analysis_folder
    results = load_folder(folder / "analysis")
    assert len(results.sparsity) == 2 and results.sparsity[-1].note  # synthetic references last
    assert isinstance(results.routing, RoutingDiagnostics) and isinstance(results.specialisation, Specialisation)
    figs = figures_from_folder(folder / "analysis")
    stems = [f.stem for f in figs]
    for stem in ["fig1_sparsity", "fig1b_sparsity_eps", "routing_load", "routing_quality", "routing_layer_loss",
                 "fig5_specialisation", "fig3_cost"]:
        assert stem in stems
    assert sum(s.startswith("fig4_centring") for s in stems) == 2
    assert png_bytes(figs[-1].figure)[:8] == b"\x89PNG\r\n\x1a\n"
    for f in figs:
        for ax in f.figure.axes:
            if ax.get_visible() and ax.has_data() and ax.get_label() != "<colorbar>":
                assert ax.get_xlabel() and ax.get_ylabel(), f"{f.stem}: unlabelled axes"


def test_cli_report_from_saved_results(analysis_folder, tmp_path, capsys) -> None:
    import shutil

    from moefy.cli import main

    folder = tmp_path / "conv"  # the conversion with only its cost analysis: a quick report
    (folder / "analysis").mkdir(parents=True)
    for name in ("moefy.json", "plan.safetensors", "analysis/cost.json"):
        shutil.copy(analysis_folder / name, folder / name)
    assert main(["report", str(folder), "--no-compute"]) == 0
    assert (folder / "report.html").is_file() and "wrote" in capsys.readouterr().out
    assert (folder / "analysis" / "figures" / "fig3_cost.png").is_file()
    assert main(["report", str(folder), "--no-compute", "--recompute"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--no-compute"]) == 2
    err = capsys.readouterr().err
    assert "not a moefy folder" in err and len(err.strip().splitlines()) == 1


def test_cli_help_and_bad_input(capsys) -> None:
    from moefy.cli import main
    from moefy.cli.analysis_commands import cmd_analyze, cmd_report

    assert "Figures 1 and 4" in (cmd_analyze.__doc__ or "") and "self-contained" in (cmd_report.__doc__ or "")
    assert main(["analyze", "tiny", "--eps", "0", "0.1"]) == 2  # checked before any model is looked up
    err = capsys.readouterr().err
    assert "eps" in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", "tiny", "--activation", "tanh"]) == 2  # argparse's own check, still one line
    err = capsys.readouterr().err
    assert "--activation" in err and "tanh" in err and len(err.strip().splitlines()) == 1


def test_encoder_windows_are_wrapped_like_the_tokenizer_wraps_text() -> None:
    """tokenize_text on a [CLS] ... [SEP] tokenizer (transformers 5 has no build_inputs_with_special_tokens)."""
    from moefy.text import tokenize_text

    class WrappingTokenizer:
        def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
            ids = [3 + b % 100 for b in text.encode()]
            return SimpleNamespace(input_ids=[101, *ids, 102] if add_special_tokens else ids)

    batch = tokenize_text("abcdefghij" * 5, WrappingTokenizer(), seq_len=12, max_sequences=3)
    assert batch.input_ids.shape == (3, 12)
    assert (batch.input_ids[:, 0] == 101).all() and (batch.input_ids[:, -1] == 102).all()
    assert batch.input_ids[0, 1:11].tolist() == [3 + b % 100 for b in b"abcdefghij"]
