"""Generation fidelity (moefy.generation): greedy continuations, dense vs converted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from moefy import api
from moefy.cli import main
from moefy.errors import InvalidArgumentError
from moefy.generation import (
    compare_tokens,
    default_prompts,
    generation_fidelity,
    greedy_tokens,
    teacher_forced_agreement,
)
from moefy.models import load_model
from moefy.settings import ConvertConfig, config_for
from tests.tiny_folders import calibration_text_file, save_tiny_folder

PROMPTS = ["abc def", "x = 1 + 2", "Q: why?"]


def _convert_settings(folder: str) -> ConvertConfig:
    fast = {"distill": False} if "distill" in {f.name for f in dataclasses.fields(ConvertConfig)} else {}
    return config_for(folder, num_experts=8, top_k=2, shared_fraction=0.0, sample_size=512, router_epochs=2, **fast)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def moe(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    text = calibration_text_file(tmp_path_factory.mktemp("t") / "cal.txt")
    return api.convert(load_model(str(folder)), _convert_settings(str(folder)), calibration_text=[str(text)])


def test_compare_tokens() -> None:
    assert compare_tokens([1, 2, 3, 4], [1, 2, 3, 4]) == {"identical_share": 1.0, "first_divergence": None}
    assert compare_tokens([1, 2, 9, 4], [1, 2, 3, 4]) == {"identical_share": 0.75, "first_divergence": 2}
    assert compare_tokens([9, 2], [1, 2]) == {"identical_share": 0.5, "first_divergence": 0}
    with pytest.raises(InvalidArgumentError):
        compare_tokens([1], [1, 2])


def test_greedy_with_cache_equals_recomputing_every_step(folder: Path) -> None:
    model = load_model(str(folder)).model
    prompt = [1, 10, 20, 30]
    got = greedy_tokens(model, prompt, 12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):] and len(got) == 12


def test_a_model_identical_to_its_reference_has_fidelity_one(folder: Path) -> None:
    dense = load_model(str(folder))
    twin = load_model(str(folder))
    result = generation_fidelity(dense, reference=twin, prompts=PROMPTS, new_tokens=16)
    s = result["summary"]
    assert s["identical_share"] == 1.0 and s["teacher_forced_agreement"] == 1.0 and s["fully_identical"] == 1.0
    assert s["median_first_divergence"] == 16 and s["prompts"] == 3
    assert all(r["first_divergence"] is None for r in result["per_prompt"])
    assert [x["reference"] for x in result["samples"]] == [x["output"] for x in result["samples"]]
    json.dumps(result)  # JSON-able


def test_a_different_model_diverges_somewhere(folder: Path, tmp_path: Path) -> None:
    dense = load_model(str(folder))
    other = load_model(str(save_tiny_folder(tmp_path / "other", seed=1)))
    result = generation_fidelity(dense, reference=other, prompts=PROMPTS, new_tokens=16)
    assert result["summary"]["identical_share"] < 1.0
    assert any(isinstance(r["first_divergence"], int) for r in result["per_prompt"])
    for r in result["per_prompt"]:
        if r["first_divergence"] is not None:
            assert r["identical_share"] <= 1 - 1 / 16


def test_converted_model_is_compared_with_every_expert_selected_and_restored(moe) -> None:
    saved = moe.runtime
    result = generation_fidelity(moe, prompts=PROMPTS, new_tokens=12)
    assert moe.runtime == saved  # the reference run leaves the runtime as it was
    assert "every expert" in result["reference"]
    # the reference is the dense model: the same numbers as the base model's own greedy tokens
    dense = load_model(moe.loaded.source)
    for item, sample in zip(PROMPTS, result["samples"], strict=False):
        ids = dense.tokenizer(item)["input_ids"]
        assert sample["reference"] == dense.tokenizer.decode(greedy_tokens(dense.model, ids, 12))
    # selecting every expert makes the converted model exactly its reference
    moe.configure(selection="all")
    try:
        same = generation_fidelity(moe, prompts=PROMPTS, new_tokens=12)
    finally:
        moe.configure(saved)
    assert same["summary"]["identical_share"] == 1.0 and same["summary"]["teacher_forced_agreement"] == 1.0


def test_teacher_forced_agreement_of_the_reference_itself_is_one(folder: Path) -> None:
    model = load_model(str(folder)).model
    ref = greedy_tokens(model, [1, 5, 6], 10)
    assert teacher_forced_agreement(model, [1, 5, 6], ref) == 1.0


def test_shipped_prompts_are_varied() -> None:
    prompts = default_prompts()
    assert 15 <= len(prompts) <= 40
    kinds = " ".join(p["kind"] for p in prompts)
    assert "code" in kinds and "question" in kinds and "French" in kinds
    assert len({p["id"] for p in prompts}) == len(prompts)


def test_cli_generation_on_a_converted_folder(moe, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "adapter"
    moe.save(adapter)
    out = tmp_path / "g.json"
    assert main(["eval", str(adapter), "--generation", "--new-tokens", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "generation fidelity" in printed and "reference:" in printed
    data = json.loads(out.read_text())
    assert data["generation"]["summary"]["prompts"] == len(default_prompts()) and "splits" not in data


def test_cli_bad_new_tokens_is_a_one_line_error(capsys) -> None:
    assert main(["eval", "smollm2-135m", "--generation", "--new-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--new-tokens" in err[0]
