"""The built-in zero-shot multiple-choice evaluator (moefy.tasks): scoring as lm-evaluation-harness
does, the shipped offline tasks, the harness path (skipped without lm-eval), and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moefy import tasks
from moefy.cli import main
from moefy.models import load_model
from moefy.tasks import (
    MCExample,
    MCTask,
    encode_pair,
    evaluate_task,
    loglikelihoods,
    predictions,
    wilson_interval,
)
from tests.tiny_folders import char_tokenizer, save_tiny_folder


def _toy() -> MCTask:
    return MCTask("toy", [
        MCExample("The cat sat on the", ("mat.", "moon and stars.", "x"), 0),
        MCExample("1 2 3 4", ("5 6", "7"), 0),
        MCExample("Hello ", ("world!", "there", "you all"), 2),  # trailing space: moves to the continuation
        MCExample("", ("a b c", "d"), 1),  # empty context: BOS (else EOS) stands in for it
    ])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(save_tiny_folder(tmp_path_factory.mktemp("m") / "tiny-llama")))


@pytest.fixture(scope="module")
def tiny_bos(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(save_tiny_folder(tmp_path_factory.mktemp("m") / "tiny-llama-bos", adds_bos=True)))


def _naive_loglikelihood(model, tokenizer, context: str, continuation: str, adds_bos: bool) -> float:
    """By hand: the char tokenizer makes one token per non-space character; the model sees
    [BOS if the tokenizer adds it] + context + continuation and only continuation tokens count."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    vocab = tokenizer.get_vocab()
    ctx = [vocab[c] for c in context if not c.isspace()]
    cont = [vocab[c] for c in continuation if not c.isspace()]
    if not context:
        ctx = [tokenizer.bos_token_id]
    elif adds_bos:
        ctx = [tokenizer.bos_token_id, *ctx]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


# ---- scoring, by hand ---------------------------------------------------------------------------
def test_acc_and_length_normalised_acc_by_hand() -> None:
    # raw: choice 0 (-4 > -5); per character: -4/2 = -2 < -5/6 = -0.83, so choice 1
    assert predictions([-4.0, -5.0], ["ab", "abcdef"]) == (0, 1)
    assert predictions([-3.0, -3.0], ["a", "bbb"]) == (0, 1)  # ties: the first maximum, as np.argmax
    assert predictions([-3.0, -3.0], ["aa", "bb"]) == (0, 0)
    # the length is the choice's, in characters (not bytes), without the delimiter
    assert predictions([-6.0, -4.0], ["ééé", "ab"]) == (1, 0)  # -6/3 = -2 = -4/2: tie, first wins


def test_wilson_interval_matches_the_formula() -> None:
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)
    lo, hi = wilson_interval(500, 1000)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=1e-2)


@pytest.mark.parametrize("adds_bos", [False, True], ids=["no-bos", "adds-bos"])
def test_pairs_are_split_as_the_harness_splits_them(adds_bos: bool) -> None:
    tok = char_tokenizer(adds_bos=adds_bos)
    bos = tok.bos_token_id
    ctx, cont = encode_pair(tok, "ab c ", "de")
    assert cont == tok("de", add_special_tokens=False)["input_ids"]  # never a BOS among the scored tokens
    assert ctx == ([bos] if adds_bos else []) + tok("abc", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "", "xy") == ([bos], tok("xy", add_special_tokens=False)["input_ids"])
    ctx, _ = encode_pair(tok, "<s>ab", "c")  # a context that already starts with BOS gets no second one
    assert ctx.count(bos) == 1


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bos"])
def test_batched_loglikelihoods_equal_one_by_one_by_hand(fixture: str, request: pytest.FixtureRequest) -> None:
    loaded = request.getfixturevalue(fixture)
    task = _toy()
    requests = [(e.context, " " + c) for e in task.examples for c in e.choices]
    got = loglikelihoods(loaded.model, loaded.tokenizer, requests, batch_size=3)
    want = [_naive_loglikelihood(loaded.model, loaded.tokenizer, c, x, fixture == "tiny_bos") for c, x in requests]
    assert got == pytest.approx(want, abs=1e-4)


def test_evaluate_task_counts_what_the_log_likelihoods_say(tiny) -> None:
    task = _toy()
    result = evaluate_task(tiny.model, tiny.tokenizer, task, batch_size=2, keep_predictions=True)
    acc = acc_norm = 0
    for e, r in zip(task.examples, result["examples"], strict=True):
        lls = r["lls"]
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
        pred_norm = max(range(len(lls)), key=lambda i: (lls[i] / len(e.choices[i]), -i))
        acc += pred == e.gold
        acc_norm += pred_norm == e.gold
    assert result["n"] == 4 and result["acc"] == acc / 4 and result["acc_norm"] == acc_norm / 4
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    lo, hi = result["acc_ci95"]
    assert lo <= result["acc"] <= hi


def test_a_perfect_model_scores_one() -> None:
    """A model that always predicts the next character of the gold answers' text gets acc 1."""

    class Oracle(torch.nn.Module):
        def __init__(self, tokenizer) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"max_position_embeddings": 128})()
            self.favourite = tokenizer.get_vocab()["g"]

        def forward(self, input_ids, attention_mask=None):  # every position: 'g' is likely, the rest not
            logits = torch.zeros(*input_ids.shape, 128)
            logits[..., self.favourite] = 10.0
            return type("O", (), {"logits": logits})()

    tok = char_tokenizer()
    task = MCTask("g", [MCExample("q", ("g", "h"), 0), MCExample("q", ("hh", "ggg", "h"), 1)])
    result = evaluate_task(Oracle(tok), tok, task)
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0


# ---- shipped data -------------------------------------------------------------------------------
def test_shipped_tasks_are_real_small_and_documented() -> None:
    names = tasks.available_tasks()
    assert len(names) >= 2
    readme = (Path(tasks.__file__).parent / "data" / "tasks" / "README.md").read_text()
    for name in names:
        task = tasks.load_task(name)
        assert task.path is not None and task.path.stat().st_size <= 1_000_000
        assert len(task.examples) >= 50 and task.licence and task.source and task.split
        assert name in readme
        assert 0 < task.chance < 1
    assert tasks.load_task("moefy_" + names[0], limit=5).examples == tasks.load_task(names[0]).examples[:5]


def test_unknown_task_is_a_one_line_error(tmp_path: Path) -> None:
    from moefy.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="--tasks"):
        tasks.load_task("hellaswagg")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x"], "gold": 0}\n')
    with pytest.raises(InvalidArgumentError):
        tasks.load_task(str(bad))


def test_a_jsonl_file_is_a_task(tmp_path: Path, tiny) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"context": e.context, "choices": list(e.choices), "gold": e.gold})
                              for e in _toy().examples))
    result = tasks.evaluate_tasks(tiny, [str(path)])
    assert result["tasks"][0]["task"] == "mine" and result["tasks"][0]["n"] == 4


# ---- the CLI ------------------------------------------------------------------------------------
def test_cli_eval_tasks_prints_a_table_and_writes_json(tiny, tmp_path: Path, capsys) -> None:
    name = tasks.available_tasks()[0]
    out = tmp_path / "r.json"
    assert main(["eval", tiny.source, "--tasks", name, "--limit", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert name in printed and "acc_norm" in printed
    data = json.loads(out.read_text())
    row = data["tasks"]["tasks"][0]
    assert row["n"] == 6 and 0 <= row["acc"] <= 1


@pytest.mark.parametrize("argv, flag", [
    (["--tasks", "no_such_task"], "--tasks"),
    (["--limit", "0", "--tasks", "x"], "--limit"),
    (["--harness"], "--harness"),
])
def test_cli_eval_bad_task_flags_exit_2(argv: list[str], flag: str, capsys) -> None:
    assert main(["eval", "smollm2-135m", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


# ---- lm-evaluation-harness ----------------------------------------------------------------------
def test_the_harness_gives_the_same_numbers_on_a_local_task(tiny_bos) -> None:
    pytest.importorskip("lm_eval")
    names = tasks.available_tasks()[:2]
    ours = tasks.evaluate_tasks(tiny_bos, names, limit=12)["tasks"]
    theirs = tasks.run_harness(tiny_bos, names, limit=12)["tasks"]
    for a, b in zip(ours, theirs, strict=True):
        assert b["task"] == "moefy_" + a["task"] and b["n"] == a["n"] == 12
        assert b["acc"] == pytest.approx(a["acc"], abs=1e-9)
        assert b["acc_norm"] == pytest.approx(a["acc_norm"], abs=1e-9)


def test_harness_task_definition_points_at_the_shipped_file() -> None:
    task = tasks.load_task(tasks.available_tasks()[0])
    text = tasks.harness_task_yaml(task)
    assert f"task: moefy_{task.name}" in text and str(task.path) in text and "output_type: multiple_choice" in text


# ---- the real model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm_scores_a_shipped_task_above_chance_and_the_harness_agrees() -> None:
    loaded = load_model("smollm2-135m")
    name = "bb_general_knowledge"  # measured on all 69: acc 0.45 against a chance of 0.13
    ours = tasks.evaluate_tasks(loaded, [name], limit=24)["tasks"][0]
    assert ours["acc"] > ours["chance"] + 0.15 and ours["acc_ci95"][0] > ours["chance"], ours
    if tasks.harness_available():
        theirs = tasks.run_harness(loaded, [name], limit=24)["tasks"][0]
        assert theirs["acc"] == pytest.approx(ours["acc"], abs=1e-9)
        assert theirs["acc_norm"] == pytest.approx(ours["acc_norm"], abs=1e-9)
