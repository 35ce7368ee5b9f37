"""Tiny random models saved as real Hugging Face folders (config, safetensors weights and a real
fast tokenizer), built offline, so that everything that reads a model *by name* — the CLI,
`moefy.models.load_model`, `MoEModel.from_pretrained` without `base=`, `MoEModel.export` — can be
tested in seconds.

The tokenizer is character level: `<pad> <s> </s> <unk>` (ids 0-3) and the 94 printable ASCII
characters that are not whitespace (ids 4-97), so every id fits the tiny models' 128-token
vocabulary; whitespace separates words and is not a token; other characters are `<unk>`. It adds
no special tokens itself, so moefy prepends `<s>` to every sequence, as for SmolLM2.

    folder = save_tiny_folder(tmp_path / "tiny-llama")
    loaded = moefy.models.load_model(str(folder))
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from moefy.text import bundled_text
from tests.tiny_models import VOCAB, tiny_model

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
MAX_POSITIONS = 512  # room for moefy's 256-token calibration and evaluation windows
_POSITION_KEY = {"gpt2": "n_positions", "gpt_bigcode": "n_positions"}  # default: max_position_embeddings


def char_tokenizer(adds_bos: bool = False, wraps: bool = False) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer whose ids all lie below the tiny models' vocabulary size;
    with `adds_bos` it puts `<s>` before every text itself, as Llama-3, Mistral and Gemma do; with
    `wraps` it wraps every text in `<s> ... </s>`, as BERT's [CLS] ... [SEP]."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *chars])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if wraps:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    elif adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_folder(
    folder: Path, model_type: str = "llama", seed: int = 0, adds_bos: bool = False, wraps: bool = False
) -> Path:
    """`tiny_model(model_type, seed=seed)` with room for 512 positions, saved with `char_tokenizer()`
    as a Hugging Face model folder (fp32 safetensors)."""
    model = tiny_model(model_type, seed=seed, **{_POSITION_KEY.get(model_type, "max_position_embeddings"): MAX_POSITIONS})
    model.save_pretrained(folder, safe_serialization=True)
    char_tokenizer(adds_bos, wraps).save_pretrained(folder)
    return folder


def calibration_text_file(path: Path, chars: int = 40_000) -> Path:
    """A UTF-8 text file: the first `chars` characters of the bundled English calibration text."""
    path.write_text(bundled_text("english", "calibration")[:chars], encoding="utf-8")
    return path
