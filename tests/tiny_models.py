"""Tiny random Hugging Face models of every supported family, built from configs (no hub, no files).

Each model has width 32, 2 blocks (T5: 2 encoder + 2 decoder), FFN width 128, a vocabulary of 128,
fp32 weights drawn from a fixed seed, and is in eval mode. Biases are redrawn (HF initialises them
to 0) so that bias handling is exercised and ReLU FFNs are not half dead by symmetry.

    model = tiny_model("llama")
    logits = model_output(model, tiny_inputs(model))
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import Tensor, nn

D_MODEL = 32
D_FF = 128
NUM_LAYERS = 2
NUM_HEADS = 4
VOCAB = 128
MAX_POSITIONS = 64
INIT_STD = 0.1  # larger than HF's 0.02 so activations leave the linear region of GeLU/SiLU
BIAS_STD = 0.1

_LLAMA_LIKE: dict[str, Any] = dict(
    hidden_size=D_MODEL,
    intermediate_size=D_FF,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=NUM_HEADS,
    num_key_value_heads=2,
    head_dim=D_MODEL // NUM_HEADS,
    max_position_embeddings=MAX_POSITIONS,
)
_BERT_LIKE: dict[str, Any] = dict(
    hidden_size=D_MODEL,
    intermediate_size=D_FF,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=NUM_HEADS,
    max_position_embeddings=MAX_POSITIONS,
    type_vocab_size=2,
)
_GPT2_LIKE: dict[str, Any] = dict(
    n_embd=D_MODEL,
    n_inner=D_FF,
    n_layer=NUM_LAYERS,
    n_head=NUM_HEADS,
    n_positions=MAX_POSITIONS,
    bos_token_id=1,
    eos_token_id=2,
)
_T5: dict[str, Any] = dict(
    d_model=D_MODEL,
    d_kv=D_MODEL // NUM_HEADS,
    d_ff=D_FF,
    num_layers=NUM_LAYERS,
    num_decoder_layers=NUM_LAYERS,
    num_heads=NUM_HEADS,
    decoder_start_token_id=0,
)

# model_type -> (config kwargs, model class name). Causal LMs get their LM head, encoders are bare.
_TINY: dict[str, tuple[dict[str, Any], str]] = {
    "bert": (_BERT_LIKE, "BertModel"),
    "roberta": (_BERT_LIKE, "RobertaModel"),
    "xlm-roberta": (_BERT_LIKE, "XLMRobertaModel"),
    "distilbert": (
        dict(
            dim=D_MODEL,
            hidden_dim=D_FF,
            n_layers=NUM_LAYERS,
            n_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
        "DistilBertModel",
    ),
    "gpt2": (_GPT2_LIKE, "GPT2LMHeadModel"),
    "gpt_bigcode": (_GPT2_LIKE, "GPTBigCodeForCausalLM"),
    "gpt_neox": (
        dict(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
        "GPTNeoXForCausalLM",
    ),
    "falcon": (
        dict(
            hidden_size=D_MODEL,
            ffn_hidden_size=D_FF,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
        ),
        "FalconForCausalLM",
    ),
    "phi": (
        dict(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
        "PhiForCausalLM",
    ),
    "phi3": (
        dict(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "Phi3ForCausalLM",
    ),
    "llama": (_LLAMA_LIKE, "LlamaForCausalLM"),
    "mistral": (_LLAMA_LIKE, "MistralForCausalLM"),
    "qwen2": (_LLAMA_LIKE, "Qwen2ForCausalLM"),
    "qwen3": (_LLAMA_LIKE, "Qwen3ForCausalLM"),
    "gemma": (_LLAMA_LIKE, "GemmaForCausalLM"),
    "gemma2": (_LLAMA_LIKE, "Gemma2ForCausalLM"),
    "gemma3_text": (_LLAMA_LIKE, "Gemma3ForCausalLM"),
    "opt": (
        dict(
            hidden_size=D_MODEL,
            ffn_dim=D_FF,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
        "OPTForCausalLM",
    ),
    "bloom": (
        dict(hidden_size=D_MODEL, n_layer=NUM_LAYERS, n_head=NUM_HEADS),
        "BloomForCausalLM",
    ),  # FFN = 4 * width
    "t5": (_T5, "T5ForConditionalGeneration"),
}

# model_type -> variant -> extra config kwargs; the first variant is the default (variant=None).
_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "t5": {"dense": dict(feed_forward_proj="relu"), "gated": dict(feed_forward_proj="gated-gelu")},
}

# Every (model_type, variant) a test should cover; gemma3 is the multimodal wrapper (tiny SigLIP tower).
TINY_CASES: list[tuple[str, str | None]] = [
    *((mt, None) for mt in _TINY if mt not in _VARIANTS),
    ("gemma3", None),
    *((mt, v) for mt, variants in _VARIANTS.items() for v in variants),
]


def case_id(case: tuple[str, str | None]) -> str:
    model_type, variant = case
    return model_type if variant is None else f"{model_type}-{variant}"


def tiny_config(model_type: str, variant: str | None = None, **overrides: Any) -> transformers.PretrainedConfig:
    """The config of `tiny_model(model_type, variant)`; `overrides` replace config values (e.g.
    max_position_embeddings)."""
    if model_type == "gemma3":
        return _gemma3_config()
    if model_type not in _TINY:
        raise KeyError(f"no tiny model for model_type {model_type!r}; known: {sorted([*_TINY, 'gemma3'])}")
    kwargs, _ = _TINY[model_type]
    variants = _VARIANTS.get(model_type, {})
    if variant is not None and variant not in variants:
        raise KeyError(f"no variant {variant!r} of {model_type!r}; known: {sorted(variants)}")
    extra = variants[variant or next(iter(variants))] if variants else {}
    values = {"vocab_size": VOCAB, "initializer_range": INIT_STD, **kwargs, **extra, **overrides}
    return transformers.AutoConfig.for_model(model_type, **values)


def _gemma3_config() -> transformers.PretrainedConfig:
    text = tiny_config("gemma3_text")
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4)


def tiny_model(
    model_type: str, variant: str | None = None, seed: int = 0, **overrides: Any
) -> transformers.PreTrainedModel:
    """A tiny random model of `model_type` (eval mode, fp32, eager attention), the same for the same
    seed; `overrides` go to `tiny_config`."""
    config = tiny_config(model_type, variant, **overrides)
    config._attn_implementation = "eager"
    cls_name = "Gemma3ForConditionalGeneration" if model_type == "gemma3" else _TINY[model_type][1]
    cls = getattr(transformers, cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, BIAS_STD)
    return model.float().eval()


def tiny_inputs(
    model: transformers.PreTrainedModel, batch: int = 2, seq: int = 8, seed: int = 0
) -> dict[str, Tensor]:
    """Random token ids for `model` (plus decoder ids for encoder-decoder models)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(VOCAB, model.config.get_text_config().vocab_size)
    inputs = {"input_ids": torch.randint(3, vocab, (batch, seq), generator=gen)}  # ids 0-2: pad/bos/eos
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (batch, seq), generator=gen)
    return inputs


@torch.no_grad()
def model_output(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The model's final output: logits if it has an LM head, else the last hidden states."""
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
