"""`moefy compare` (moefy.compare) and the runtime baselines it needs: zero representatives, random
selection; the labelled embedding tasks for encoders. Tiny models only (a few seconds a grid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moefy.cli import main
from moefy.compare import CompareSpec, Evaluator, markdown, row_key, run_compare
from moefy.conversion import apply, moe_layers
from moefy.embedding_tasks import EMBEDDING_TASKS, evaluate_embedding_task, query_of
from moefy.errors import InvalidArgumentError
from moefy.evaluate import sentence_embeddings
from moefy.models import load_model
from moefy.plan import ModelPlan
from moefy.settings import ConvertConfig, RuntimeConfig
from moefy.tasks import load_task
from tests.analysis_fixtures import converted_tiny
from tests.tiny_folders import save_tiny_folder

TINY_CONFIG = ConvertConfig(num_experts=8, shared_fraction=0.125, calibration_sequences=8, sample_size=512, router_epochs=2,
                            distill_steps=2, distill_batch=2, distill_checkpoint_every=1)


def _spec(folder: Path, **kw) -> CompareSpec:
    return CompareSpec(model=str(folder), config=TINY_CONFIG, budgets=(0.75, 0.5),
                       tasks=("bb_general_knowledge", "bb_cause_and_effect"), limit=3, eval_sequences=2, **kw)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def grid(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("grid") / "compare"
    return out, run_compare(_spec(tiny_folder), out)


def _numbers(rows: list[dict]) -> list[tuple]:
    return [(r["key"], r["top_k"], r["ffn_flops_fraction"], [(m["metric"], m["task"], m["n"], m["value"], m["ci95"])
                                                             for m in r["metrics"]]) for r in rows]


def test_grid_writes_every_row_with_task_split_count_and_interval(grid) -> None:
    out, result = grid
    assert result["complete"]
    keys = [r["key"] for r in result["rows"]]
    assert keys[0] == "dense@1"
    assert {row_key(m, b) for m in ("moefication", "gmoefication", "moefy", "random", "static", "oracle", "cats")
            for b in (0.75, 0.5)} <= set(keys)
    for r in result["rows"]:
        assert r["metrics"], r["key"]
        for m in r["metrics"]:
            assert m["task"] and m["split"] and m["n"] > 0 and m["ci95"] is not None
            lo, hi = m["ci95"]
            assert lo <= hi and (m["metric"] == "perplexity" or lo <= m["value"] <= hi)
        if r["method"] not in ("dense", "oracle", "cats"):  # CATS' threshold meets its budget on calibration text only
            assert r["ffn_flops_fraction"] <= r["budget"] + 1e-9, r["key"]
    assert {r["ffn_flops_fraction"] for r in result["rows"] if r["method"] == "oracle"} == {1.0}
    saved = json.loads((out / "compare.json").read_text())
    assert _numbers(saved["rows"]) == _numbers(result["rows"])
    md = (out / "compare.md").read_text()
    assert "Tables 1/2" in md and "Table 3" in md and "bb_general_knowledge acc (n=3 examples)" in md
    assert (out / "compare.png").stat().st_size > 1000
    assert (out / "plan-search" / "moefy.json").is_file()


def test_every_expert_selected_equals_dense(grid, tiny_folder: Path) -> None:
    """Whatever the baseline settings, a layer computing every expert is the dense FFN."""
    out, result = grid
    dense_row = result["rows"][0]
    plan = ModelPlan.load(out / "plan-search")
    loaded = load_model(str(tiny_folder))
    evaluate = Evaluator(load_model(str(tiny_folder)), _spec(tiny_folder))
    n = plan.layers[0].num_experts
    for settings in ({}, {"zero_representatives": True}, {"selection": "random"}, {"selection": "static"}):
        apply(loaded, plan, RuntimeConfig(top_k=n, **settings))  # type: ignore[arg-type]
        for got, want in zip(evaluate(loaded), dense_row["metrics"], strict=True):
            assert got["value"] == pytest.approx(want["value"], rel=1e-4), (settings, got)


def test_an_interrupted_grid_resumes_to_the_same_rows(grid, tiny_folder: Path, tmp_path: Path) -> None:
    _, whole = grid
    out = tmp_path / "compare"
    methods = ("dense", "moefication", "static", "moefy")  # a cheaper grid of the same settings
    seen: list[str] = []

    def dies_after_three(row: dict) -> None:
        seen.append(row["key"])
        if len(seen) == 3:
            raise KeyboardInterrupt  # as a kill right after the third row was saved

    with pytest.raises(KeyboardInterrupt):
        run_compare(_spec(tiny_folder, methods=methods), out, on_row=dies_after_three)
    partial = json.loads((out / "compare.json").read_text())
    assert not partial["complete"] and len(partial["rows"]) == 3
    assert "incomplete" in (out / "compare.md").read_text()
    again: list[str] = []
    resumed = run_compare(_spec(tiny_folder, methods=methods), out, on_row=lambda row: again.append(row["key"]))
    assert again and not set(again) & set(seen)  # finished rows are not run again
    # the same rows to float rounding: the batched kernels' measured sparse/dense choice (and the
    # thread split of their sums) can differ between runs, which moves the last bits
    got, want = _numbers(resumed["rows"]), _numbers([r for r in whole["rows"] if r["method"] in methods])
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want, strict=True):
        assert [m[:3] for m in g[3]] == [m[:3] for m in w[3]], g[0]
        assert [v for m in g[3] for v in (m[3], *m[4])] == pytest.approx([v for m in w[3] for v in (m[3], *m[4])], rel=1e-6), g[0]


def test_a_grid_of_other_settings_is_not_mixed_in(grid, tiny_folder: Path) -> None:
    out, _ = grid
    with pytest.raises(InvalidArgumentError, match="other settings"):
        run_compare(_spec(tiny_folder).__class__(**{**_spec(tiny_folder).__dict__, "eval_sequences": 3}), out)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budgets", "1.5"], "--budgets 1.5 must be in (0, 1)"),
        (["--budgets", "a,b"], "give numbers separated by commas"),
        (["--budgets", "0.5,0.5"], "repeats a budget"),
        (["--methods", "moefy,snap"], "--methods snap: valid methods are"),
        (["--tasks", "nope"], "--tasks 'nope': not a task moefy ships"),
        (["--limit", "0"], "--limit 0 must be at least 1"),
        (["--experts", "7"], "--experts 7 does not divide the FFN width 1536"),
        (["--distill-steps", "-1"], "--distill-steps -1"),
    ],
)
def test_bad_flags_exit_2_before_any_model_loads(flags: list[str], message: str, tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import moefy.models

    monkeypatch.setattr(moefy.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["compare", "smollm2-135m", "--out", str(tmp_path / "c"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_encoder_is_judged_on_labelled_embedding_tasks_only(tmp_path: Path, capsys) -> None:
    assert main(["compare", "minilm-l6", "--out", str(tmp_path / "c"), "--tasks", "bb_cause_and_effect"]) == 2
    assert "not a labelled task for an encoder" in capsys.readouterr().err


def test_encoder_grid_rows(tmp_path: Path) -> None:
    folder = save_tiny_folder(tmp_path / "tiny-bert", "bert", wraps=True)
    spec = CompareSpec(model=str(folder), config=TINY_CONFIG, budgets=(0.75,), methods=("dense", "gmoefication", "static"),
                       tasks=("bb_phrase_relatedness",), limit=8, eval_sequences=2)
    result = run_compare(spec, tmp_path / "out")
    dense, *rows = result["rows"]
    assert [r["method"] for r in rows] == ["gmoefication", "static"]
    fidelity = {m["metric"]: m["value"] for m in dense["metrics"]}
    assert fidelity["embedding_fidelity"] == pytest.approx(1.0)
    assert all({m["metric"] for m in r["metrics"]} == {"embedding_fidelity", "retrieval_acc", "acc"} for r in result["rows"])
    assert "bb_phrase_relatedness acc (n=8 examples)" in markdown(result)


# ---- the runtime baselines ----------------------------------------------------------------------------
def test_zero_representatives_drop_the_static_vectors_and_switch_back() -> None:
    _, moe = converted_tiny("llama", shared_fraction=0.25)
    x = torch.randn(2, 5, moe_layers(moe.model)[0].d_model)
    m = moe_layers(moe.model)[0]
    before = m(x)
    moe.configure(zero_representatives=True)
    idx = m.select(x.reshape(-1, m.d_model))  # (T, K)
    a = m.expert_weights.all_activations(x.reshape(-1, m.d_model))  # (T, E, S)
    want = torch.stack([sum((a[t, e] @ m.w_out[e] for e in row.tolist()), torch.zeros(m.d_model)) for t, row in enumerate(idx)])
    if m.b_out is not None:
        want = want + m.b_out
    torch.testing.assert_close(m(x).reshape(-1, m.d_model), want, rtol=1e-5, atol=1e-5)
    assert m.representatives.abs().sum() > 0  # the trained r is kept
    moe.configure(zero_representatives=False)
    torch.testing.assert_close(m(x), before)


def test_random_selection_is_uniform_per_token_shared_first_and_reproducible() -> None:
    _, moe = converted_tiny("llama", shared_fraction=0.25)
    moe.configure(selection="random", top_k=5)
    m = moe_layers(moe.model)[0]
    x = torch.randn(64, m.d_model)
    first = m.select(x)
    assert first.shape == (64, 5)
    assert (first[:, : m.num_shared] == torch.arange(m.num_shared)).all()
    assert all(len(set(r.tolist())) == 5 for r in first)
    assert len({tuple(r.tolist()) for r in first}) > 1  # it varies per token
    moe.configure(selection="random", top_k=5)  # reseeded: the same draws again
    assert torch.equal(m.select(x), first)


def test_a_plan_saved_before_zero_representatives_existed_still_loads(tmp_path: Path) -> None:
    _, moe = converted_tiny("llama")
    folder = moe.save(tmp_path / "p")
    meta = json.loads((folder / "moefy.json").read_text())
    del meta["runtime"]["zero_representatives"]
    (folder / "moefy.json").write_text(json.dumps(meta))
    assert ModelPlan.load(folder).runtime.zero_representatives is False


# ---- labelled embedding tasks ---------------------------------------------------------------------------
def test_queries_of_the_shipped_tasks() -> None:
    assert query_of("For each word...\nQ: home town\nA:") == "home town"
    assert query_of("Find a movie similar to A, B, C:") == "A, B, C"
    for name in EMBEDDING_TASKS:
        assert all(query_of(e.context) for e in load_task(name).examples)


def test_embedding_task_accuracy_is_the_nearest_choice(tmp_path: Path) -> None:
    loaded = load_model(str(save_tiny_folder(tmp_path / "tiny-bert", "bert", wraps=True)))
    task = load_task("bb_phrase_relatedness", limit=12)
    result = evaluate_embedding_task(loaded.model, loaded.tokenizer, task)
    hits = 0
    for e in task.examples:
        q = sentence_embeddings(loaded.model, loaded.tokenizer, [query_of(e.context)])
        c = sentence_embeddings(loaded.model, loaded.tokenizer, list(e.choices))
        hits += int((c @ q[0]).argmax()) == e.gold
    assert result["acc"] == hits / 12 and result["n"] == 12
    assert result["acc_ci95"][0] <= result["acc"] <= result["acc_ci95"][1]


def test_the_report_shows_the_comparison_and_samples(grid, tmp_path: Path) -> None:
    from moefy.generation import generation_fidelity
    from moefy.moe_model import MoEModel
    from moefy.report import GENERATION_FILE, render_html

    out, _ = grid
    moe = MoEModel.from_pretrained(out / "plan-search")
    folder = moe.save(tmp_path / "conv")
    gen = generation_fidelity(moe, prompts=["The history of"], new_tokens=4)
    (folder / GENERATION_FILE).write_text(json.dumps(gen))
    page = render_html(folder, tmp_path / "no-analysis", compare=out)
    assert "Against the baselines (moefy compare)" in page and "Table 3: expert selection" in page
    assert "Sample outputs, dense vs MoE" in page and "The history of" in page
    assert page.count("data:image/png;base64,") == 1  # the compare figure
