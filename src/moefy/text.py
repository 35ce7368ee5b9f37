"""Calibration and evaluation text: the bundled corpus, the user's files, deterministic batching.

Splits are named `<domain>_<purpose>` (english_calibration, code_evaluation, ...). Token
sequences are cut from the concatenated text in order (no shuffling), so every run sees the
same tokens. Every causal window starts with one BOS token, whether the tokenizer adds it
itself (Llama-3, Mistral, Gemma) or not (SmolLM2).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from moefy.errors import TextError
from moefy.settings import CALIBRATION_LANGUAGES, CALIBRATION_MIXES

log = logging.getLogger(__name__)

DOMAINS = ("english", "code")  # the default evaluation splits
ALL_DOMAINS = DOMAINS + CALIBRATION_LANGUAGES  # the languages: technical prose (Debian Reference)
# Held-out text in genres no calibration mix contains: quotations (Debian fortune packages, six
# languages, two of them in no mix) and chat dialog lines (chatterbot corpus).
HELD_OUT_GENRES = ("quotes", "dialog")


def bundled_text(domain: str, purpose: str) -> str:
    """The bundled text of one domain (see ALL_DOMAINS) and purpose ('calibration' | 'evaluation')."""
    if domain not in ALL_DOMAINS or purpose not in ("calibration", "evaluation"):
        raise TextError(
            f"no bundled text {domain!r}/{purpose!r}; domains: {', '.join(ALL_DOMAINS)}; purposes: calibration, evaluation"
        )
    return resources.files("moefy.data").joinpath(f"{domain}_{purpose}.txt").read_text(encoding="utf-8")


def held_out_genre(genre: str) -> dict[str, str]:
    """Text per language of a genre that no calibration mix contains ('quotes' | 'dialog')."""
    files = {"quotes": "quotes.json", "dialog": "multilingual.json"}
    if genre not in files:
        raise TextError(f"no held-out genre {genre!r}; genres: {', '.join(HELD_OUT_GENRES)}")
    doc = json.loads(resources.files("moefy.data").joinpath(files[genre]).read_text(encoding="utf-8"))
    return {lang: entry["text"] for lang, entry in doc["languages"].items()}


def mix_counts(mix: dict[str, float], sequences: int) -> dict[str, int]:
    """Sequences per domain for `sequences` in total: shares rounded by largest remainder, every
    domain at least one sequence (so the total may exceed `sequences` when it is tiny)."""
    total = sum(mix.values())
    exact = {d: sequences * w / total for d, w in mix.items()}
    counts = {d: int(v) for d, v in exact.items()}
    for d in sorted(exact, key=lambda d: counts[d] - exact[d])[: sequences - sum(counts.values())]:
        counts[d] += 1
    for d in [d for d, c in counts.items() if c == 0]:  # every domain gets one, from the most over-served
        donor = max(counts, key=lambda e: (counts[e] - exact[e]) if counts[e] > 1 else -1e9)
        if counts[donor] > 1:
            counts[donor] -= 1
        counts[d] = 1
    return counts


def read_text_file(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise TextError(f"text file {str(path)!r} does not exist or is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"text file {str(path)!r} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise TextError(f"text file {str(path)!r} is empty")
    return text


@dataclass
class TokenBatch:
    """Fixed-length token sequences. input_ids: (N, L); attention_mask: (N, L) of ones."""

    input_ids: Tensor
    attention_mask: Tensor
    name: str = ""
    scored: Tensor | None = None  # (N, L) bool: tokens whose prediction counts (sliding windows)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def chunks(self, batch_size: int) -> list[TokenBatch]:
        return [
            TokenBatch(
                self.input_ids[i : i + batch_size],
                self.attention_mask[i : i + batch_size],
                self.name,
                None if self.scored is None else self.scored[i : i + batch_size],
            )
            for i in range(0, self.input_ids.shape[0], batch_size)
        ]


def _bos_to_prepend(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a").input_ids
    return None if (probe and probe[0] == bos) else bos


def _special_wrapped(tokenizer) -> bool:
    probe = tokenizer("a").input_ids
    return len(probe) > len(tokenizer("a", add_special_tokens=False).input_ids)


def _special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP] for BERT),
    read off a probe (transformers 5 tokenizers no longer have build_inputs_with_special_tokens)."""
    wrapped = tokenizer("a").input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    for i in range(len(wrapped) - len(bare) + 1):
        if wrapped[i : i + len(bare)] == bare:
            return list(wrapped[:i]), list(wrapped[i + len(bare) :])
    raise TextError("cannot tell which special tokens this tokenizer adds around a text")


def sliding_windows(ids: list[int], seq_len: int, stride: int, bos: int | None) -> tuple[Tensor, Tensor]:
    """Windows over a token stream: (input_ids (N, L), scored (N, L) bool). With a BOS, each
    window is [BOS] + L-1 stream tokens. Every stream token after the first is scored once;
    with stride < window, later windows carry window - stride tokens of unscored context."""
    body = seq_len - (1 if bos is not None else 0)
    if not 0 < stride <= body:
        raise TextError(f"stride={stride} must be in 1..{body} for seq_len={seq_len}")
    rows, masks = [], []
    scored_until = 0  # stream tokens [0, scored_until) are already scored
    for start in range(0, len(ids) - body + 1, stride):
        window = ids[start : start + body]
        mask = [start + i >= scored_until for i in range(body)]
        if start == 0 and bos is None:
            mask[0] = False  # the very first token has nothing to be predicted from
        rows.append(([bos] if bos is not None else []) + window)
        masks.append(([False] if bos is not None else []) + mask)
        scored_until = start + body
    return torch.tensor(rows, dtype=torch.long).reshape(-1, seq_len), torch.tensor(masks).reshape(-1, seq_len)


def tokenize_text(
    text: str,
    tokenizer,
    seq_len: int,
    max_sequences: int | None = None,
    name: str = "",
    min_sequences: int = 1,
    stride: int | None = None,
) -> TokenBatch:
    """Cut `text` into windows of exactly `seq_len` tokens (special tokens included).

    Causal tokenizers: [BOS] + seq_len-1 text tokens, windows `stride` apart (default: no
    overlap); the BOS is the one the tokenizer adds itself (Llama-3, Mistral, Gemma) or, if it adds
    none, its `bos_token_id` (SmolLM2). Encoder tokenizers ([CLS] ... [SEP]): the tokenizer's own
    wrapping around the text tokens that fit, no overlap.
    """
    if seq_len < 8:
        raise TextError(f"seq_len={seq_len} is too short; use at least 8 tokens")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix, suffix = _special_wrapping(tokenizer) if _special_wrapped(tokenizer) else ([], [])
    if suffix or len(prefix) > 1:  # encoder wrapping ([CLS] ... [SEP]): the tokenizer's own, around each window
        body = seq_len - len(prefix) - len(suffix)
        n = len(ids) // body
        rows = [prefix + ids[i * body : (i + 1) * body] + suffix for i in range(n)]
        input_ids = torch.tensor(rows, dtype=torch.long).reshape(-1, seq_len)
        scored = None
    else:  # causal: [BOS] (the one the tokenizer adds itself, else its bos token if it has one) + text
        bos = prefix[0] if prefix else _bos_to_prepend(tokenizer)
        body = seq_len - (1 if bos is not None else 0)
        input_ids, scored = sliding_windows(ids, seq_len, stride or body, bos)
    if max_sequences is not None:
        input_ids = input_ids[:max_sequences]
        scored = None if scored is None else scored[:max_sequences]
    if input_ids.shape[0] < min_sequences:
        raise TextError(
            f"text {name!r} has {len(ids)} tokens, too short for {min_sequences} sequence(s) of {seq_len} tokens "
            f"(needs at least {min_sequences * body} tokens)"
        )
    log.debug("tokenised %s: %d sequences of %d tokens", name, input_ids.shape[0], seq_len)
    return TokenBatch(input_ids, torch.ones_like(input_ids), name, scored)


def split_batches(
    tokenizer,
    purpose: str,
    seq_len: int,
    max_sequences: int | None,
    text_files: list[str] | None = None,
    domains: tuple[str, ...] = DOMAINS,
) -> dict[str, TokenBatch]:
    """Named token batches: the user's files if given (one split per file), else the bundled domains."""
    if text_files:
        return {
            Path(f).name: tokenize_text(read_text_file(f), tokenizer, seq_len, max_sequences, name=Path(f).name)
            for f in text_files
        }
    return {
        f"{d}": tokenize_text(bundled_text(d, purpose), tokenizer, seq_len, max_sequences, name=f"{d}_{purpose}")
        for d in domains
    }


def mix_batches(tokenizer, mix: str, sequences: int, seq_len: int) -> list[TokenBatch]:
    """The bundled calibration text of a mix (settings.CALIBRATION_MIXES), one batch per domain,
    `sequences` in total split by the mix's shares (`mix_counts`)."""
    if mix not in CALIBRATION_MIXES:
        raise TextError(f"no calibration mix {mix!r}; mixes: {', '.join(CALIBRATION_MIXES)}")
    return [
        tokenize_text(bundled_text(d, "calibration"), tokenizer, seq_len, n, name=f"{d}_calibration")
        for d, n in mix_counts(CALIBRATION_MIXES[mix], sequences).items()
    ]
