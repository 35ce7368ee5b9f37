"""Every supported family end to end through the real surface, on a tiny random model saved as a
Hugging Face folder with a real fast tokenizer of the family's kind (causal: one that adds BOS
itself, as Llama-3 / Mistral / Gemma, or one that does not, as SmolLM2; encoders: one that wraps
texts as [CLS] ... [SEP]): `moefy eval` → `moefy convert` → load the adapter → generate (causal) or
embed (encoders) → `moefy eval` of the converted folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moefy.cli import main
from moefy.evaluate import sentence_embeddings
from moefy.moe_model import MoEModel
from moefy.specs import supported_model_types
from tests.tiny_folders import calibration_text_file, save_tiny_folder

ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert"}
NOT_CONVERTIBLE = {"t5", "gemma3"}  # encoder-decoder (README: not supported); the multimodal wrapper
FAMILIES = sorted(set(supported_model_types()) - NOT_CONVERTIBLE)


def test_every_convertible_family_is_in_the_matrix() -> None:
    assert len(FAMILIES) >= 18 and ENCODERS <= set(FAMILIES)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_end_to_end(model_type: str, tmp_path: Path, capsys) -> None:
    encoder = model_type in ENCODERS
    adds_bos = not encoder and FAMILIES.index(model_type) % 2 == 0  # both causal tokenizer kinds across the matrix
    folder = save_tiny_folder(tmp_path / model_type, model_type, adds_bos=adds_bos, wraps=encoder)
    text = calibration_text_file(tmp_path / "calibration.txt")
    dense_json, moe_json, out = tmp_path / "dense.json", tmp_path / "moe.json", tmp_path / "moe"
    eval_args = ["--seq-len", "64", "--max-sequences", "2"]
    assert main(["eval", str(folder), *eval_args, "--json", str(dense_json)]) == 0, capsys.readouterr().err
    assert main(["convert", str(folder), "--experts", "8", "--top-k", "4", "--shared", "0", "--sample-size", "512",
                 "--router-epochs", "2", "--calibration-sequences", "8", "--calibration-text", str(text),
                 "--distill-steps", "5", "--out", str(out)]) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"moefy.json", "plan.safetensors"}

    moe = MoEModel.from_pretrained(out)
    if encoder:
        emb = sentence_embeddings(moe.model, moe.tokenizer, ["a first text", "and a second one"])
        assert emb.shape[0] == 2 and torch.isfinite(emb).all()
    else:
        prompt = moe.tokenizer("abc def", return_tensors="pt").input_ids
        assert (prompt[0, 0] == moe.tokenizer.bos_token_id) == adds_bos
        generated = moe.model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape == (1, prompt.shape[1] + 4)

    assert main(["eval", str(out), *eval_args, "--json", str(moe_json)]) == 0, capsys.readouterr().err
    dense, converted = json.loads(dense_json.read_text()), json.loads(moe_json.read_text())
    key = "embedding_fidelity" if encoder else "perplexity"
    for d, m in zip(dense["splits"], converted["splits"], strict=True):
        assert d["split"] == m["split"] and torch.isfinite(torch.tensor(m[key]))
    assert 0.0 < converted["ffn_flops_fraction"] < 1.0
