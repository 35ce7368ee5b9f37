"""End to end on the real bundled models (SmolLM2-135M, Gemma 3 270M, all-MiniLM-L6-v2), kept small."""

from __future__ import annotations

import json

import pytest
import torch

from moefy import api
from moefy.cli import main
from moefy.conversion import configure, ffn_flops_fraction, moe_layers
from moefy.models import load_model
from moefy.moe_model import MoEModel
from moefy.settings import ConvertConfig
from moefy.text import bundled_text, tokenize_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_smollm_dense_perplexity_is_sane(smollm) -> None:
    assert smollm.is_causal and smollm.spec.family == "llama"
    assert smollm.tokenizer("hello").input_ids[0] != smollm.tokenizer.bos_token_id  # moefy adds BOS itself
    batch = tokenize_text(bundled_text("code", "evaluation"), smollm.tokenizer, 128, 4)
    assert (batch.input_ids[:, 0] == smollm.tokenizer.bos_token_id).all()
    from moefy.evaluate import perplexity

    ppl = perplexity(smollm.model, batch)
    assert 1.5 < ppl < 60


def test_smollm_conversion_all_experts_is_exact_then_sparse(tmp_path) -> None:
    loaded = load_model("smollm2-135m")
    ids = tokenize_text(bundled_text("english", "evaluation"), loaded.tokenizer, 64, 2).input_ids
    with torch.no_grad():
        dense = loaded.model(input_ids=ids).logits
    config = ConvertConfig(
        num_experts=32, top_k=16, budget=None, method="contiguous", shared_fraction=0.0, calibration_sequences=4,
        sample_size=512, router_epochs=2, router_hidden=32, sequential=False, distill_steps=2,
    )
    converted = api.convert(loaded, config)
    assert len(moe_layers(converted.model)) == len(converted.plan.layers) == 30
    configure(converted.model, top_k=32)  # every expert: the dense model
    with torch.no_grad():
        torch.testing.assert_close(converted.model(input_ids=ids).logits, dense, rtol=1e-3, atol=2e-3)
    configure(converted.model, top_k=16, selection="oracle")
    with torch.no_grad():
        half = converted.model(input_ids=ids).logits
    assert torch.isfinite(half).all() and not torch.allclose(half, dense, atol=1e-2)
    converted.configure(selection="router", top_k=16)
    assert ffn_flops_fraction(converted.model, measured=False) < 0.6
    with torch.no_grad():
        routed = converted.model(input_ids=ids).logits

    # the adapter finds the bundled base by name; the export is standalone
    adapter = converted.save(tmp_path / "adapter")
    assert {p.name for p in adapter.iterdir()} == {"moefy.json", "plan.safetensors"}
    assert (adapter / "plan.safetensors").stat().st_size < 0.05 * sum(
        p.numel() * p.element_size() for n, p in load_model("smollm2-135m").model.named_parameters() if ".mlp." in n
    )
    again = MoEModel.from_pretrained(adapter)
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, routed, rtol=0, atol=0)
    standalone = converted.export(tmp_path / "standalone")
    assert {"config.json", "model.safetensors", "moefy.json", "plan.safetensors"} <= {p.name for p in standalone.iterdir()}
    exported = MoEModel.from_pretrained(standalone)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(input_ids=ids).logits, routed, rtol=0, atol=0)
    assert exported.tokenizer("hello world").input_ids == loaded.tokenizer("hello world").input_ids
    prompt = exported.tokenizer("The history of computing", return_tensors="pt").input_ids
    out = exported.model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out, again.model.generate(prompt, max_new_tokens=8, do_sample=False))


def test_minilm_cli_eval_json(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert main(["eval", "minilm-l6", "--max-sequences", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    split = result["splits"][0]
    assert split["embedding_fidelity"] == 1.0 and split["retrieval_accuracy"] > 0.25  # chance: 1/20
    assert "retrieval_accuracy" in capsys.readouterr().out


def test_cli_errors_exit_nonzero(tmp_path, capsys) -> None:
    assert main(["eval", str(tmp_path / "missing-model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    existing = tmp_path / "out"
    existing.mkdir()
    assert main(["convert", "minilm-l6", "--out", str(existing), "--experts", "64", "--top-k", "8"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "minilm-l6", "--out", str(tmp_path / "o2"), "--experts", "100", "--top-k", "16"]) == 2
    assert "does not divide the FFN width 1536" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_gemma3_whose_tokenizer_adds_bos_end_to_end(tmp_path) -> None:
    """A second real causal LM of another family, whose tokenizer adds BOS itself (the case that used
    to fail in tokenization): eval → convert → save → load by name → generate, on real weights."""
    loaded = load_model("gemma3-270m")
    tok = loaded.tokenizer
    assert loaded.model.config.model_type == "gemma3_text"
    assert tok("hello").input_ids[0] == tok.bos_token_id  # the tokenizer adds BOS itself
    batch = tokenize_text(bundled_text("english", "evaluation"), tok, 64, 2)
    assert batch.input_ids.shape == (2, 64) and (batch.input_ids[:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        dense = loaded.model(input_ids=batch.input_ids).logits
    config = ConvertConfig(num_experts=32, top_k=16, shared_fraction=0.0, method="contiguous", calibration_sequences=4,
                           sample_size=512, router_epochs=2, sequential=False, distill_steps=2)
    moe = api.convert(loaded, config)
    configure(moe.model, top_k=32)  # every expert: the dense model
    with torch.no_grad():
        torch.testing.assert_close(moe.model(input_ids=batch.input_ids).logits, dense, rtol=1e-3, atol=2e-3)
    moe.configure(top_k=16)
    adapter = moe.save(tmp_path / "gemma-moe")
    again = MoEModel.from_pretrained(adapter)  # the recorded base name: the bundled model
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    out = again.model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 6)
    result = api.evaluate_model(again, max_sequences=2, seq_len=64)
    assert all(torch.isfinite(torch.tensor(s["perplexity"])) for s in result["splits"])
