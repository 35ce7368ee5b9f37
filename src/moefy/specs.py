"""Architecture knowledge as data: one `ArchSpec` per model family, keyed by `config.model_type`.

A spec says where the transformer blocks are and, inside a block, where the FFN's up / gate /
down projections and its activation live. Everything else in moefy (calibration hooks, expert
extraction, module swap) reads these specs; nothing else knows attribute names.

Two FFN layouts exist in Hugging Face models:

* whole-module (`ffn` is set): one module maps the FFN input x to the FFN output y
  (LlamaMLP, GPT2MLP, T5DenseGatedActDense, ...). moefy swaps that module.
* split (`ffn` is None): the FFN is spread over the block (BERT's intermediate/output.dense,
  OPT's fc1/fc2, BLOOM's mlp with a fused residual add). moefy swaps the `down` projection for
  the MoE FFN (which takes x) and the modules in `identity` for `nn.Identity`.

One model_type can hold several layouts (T5: `T5DenseActDense` wi/wo or `T5DenseGatedActDense`
wi_0/wi_1/wo, chosen by `feed_forward_proj`). Its spec lists the others in `variants`;
`resolve_spec(model)` returns the first whose paths resolve in every block of the model.
Every spec is checked against a tiny random model of its family in tests/test_specs.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import cast

from torch import nn

from moefy.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # paths from the model (or its base model) to block lists; all that exist count
    up: str  # path in a block to the up projection (plain FFN: W1; gated: Wu; fused: [Wg; Wu])
    down: str  # path in a block to the down projection W2
    act: str  # path in a block to the activation callable the model itself uses
    gate: str | None = None  # path to the gate projection of a gated FFN (None: plain, or fused)
    ffn: str | None = None  # path to the module computing y = FFN(x); None = split layout
    identity: tuple[str, ...] = ()  # split layout: modules replaced by nn.Identity on swap
    fused_gate_up: bool = False  # `up` holds gate rows then up rows (Phi-3)
    conv1d: bool = False  # GPT-2 Conv1D: weight is (in, out), transposed w.r.t. nn.Linear
    causal: bool = True  # a causal LM (perplexity) vs an encoder (embeddings)
    variants: tuple[ArchSpec, ...] = ()  # other layouts under the same model_type; `resolve_spec` picks one
    notes: str = field(default="", compare=False)

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up

    @property
    def block_paths(self) -> tuple[str, ...]:
        """Every path inside a block this spec reads or replaces."""
        optional = (self.gate, self.ffn)
        return (self.up, self.down, self.act, *(p for p in optional if p is not None), *self.identity)


# Layouts shared by several families; the others are `replace(template, family=..., ...)`.
# `layers` paths are tried from the model and from its base model (`base_model_prefix`), so one
# path covers both `XForCausalLM` and `XModel`.

_BERT = ArchSpec(  # split: intermediate = act(dense(x)); output = LayerNorm(dense(a) + residual)
    family="bert",
    model_types=("bert",),
    layers=("encoder.layer",),
    up="intermediate.dense",
    down="output.dense",
    act="intermediate.intermediate_act_fn",
    identity=("intermediate",),
    causal=False,
)

_GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    layers=("h",),
    up="mlp.c_fc",
    down="mlp.c_proj",
    act="mlp.act",
    ffn="mlp",
    conv1d=True,
)

_GPT_NEOX = ArchSpec(  # mlp = dense_4h_to_h(act(dense_h_to_4h(x)))
    family="gpt-neox",
    model_types=("gpt_neox",),
    layers=("layers",),
    up="mlp.dense_h_to_4h",
    down="mlp.dense_4h_to_h",
    act="mlp.act",
    ffn="mlp",
)

_LLAMA = ArchSpec(  # gated MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))
    family="llama",
    model_types=("llama",),
    layers=("model.layers", "layers"),
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    down="mlp.down_proj",
    act="mlp.act_fn",
    ffn="mlp",
)

_T5_FFN = "layer.-1.DenseReluDense"  # T5LayerFF is the last sub-layer of encoder and decoder blocks
_T5 = ArchSpec(  # T5DenseActDense (feed_forward_proj="relu")
    family="t5",
    model_types=("t5",),
    layers=("encoder.block", "decoder.block"),
    up=f"{_T5_FFN}.wi",
    down=f"{_T5_FFN}.wo",
    act=f"{_T5_FFN}.act",
    ffn=_T5_FFN,
    notes="encoder-decoder: blocks of both stacks; `causal` refers to the decoder",
)

SPECS: tuple[ArchSpec, ...] = (
    # --- encoders -------------------------------------------------------------------------
    _BERT,
    replace(_BERT, family="roberta", model_types=("roberta",)),
    replace(_BERT, family="xlm-roberta", model_types=("xlm-roberta",)),
    ArchSpec(
        family="distilbert",
        model_types=("distilbert",),
        layers=("transformer.layer",),
        up="ffn.lin1",
        down="ffn.lin2",
        act="ffn.activation",
        ffn="ffn",
        causal=False,
    ),
    # --- GPT-style decoders ---------------------------------------------------------------
    _GPT2,
    replace(
        _GPT2,
        family="gpt-bigcode",
        model_types=("gpt_bigcode",),
        conv1d=False,
        notes="same names as GPT-2 but nn.Linear, not Conv1D",
    ),
    _GPT_NEOX,
    replace(
        _GPT_NEOX,
        family="falcon",
        model_types=("falcon",),
        layers=("h",),
        notes="FalconLinear is an nn.Linear; with parallel attention the block adds the attention "
        "output to the MLP output itself, outside the FFN",
    ),
    ArchSpec(
        family="phi",
        model_types=("phi",),
        layers=("model.layers", "layers"),
        up="mlp.fc1",
        down="mlp.fc2",
        act="mlp.activation_fn",
        ffn="mlp",
    ),
    ArchSpec(
        family="opt",
        model_types=("opt",),
        layers=("decoder.layers",),
        up="fc1",
        down="fc2",
        act="activation_fn",
        identity=("fc1", "activation_fn"),
        notes="split layout: fc1 / activation_fn / fc2 sit directly in the decoder layer",
    ),
    ArchSpec(
        family="bloom",
        model_types=("bloom",),
        layers=("h",),
        up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h",
        act="mlp.gelu_impl",
        identity=("mlp.dense_h_to_4h", "mlp.gelu_impl"),
        notes="split layout: BloomMLP.forward(x, residual) adds the residual itself; "
        "pretraining_tp > 1 with slow_but_exact=True reads dense_4h_to_h.weight directly and is not supported",
    ),
    # --- Llama-style gated decoders -------------------------------------------------------
    _LLAMA,
    replace(_LLAMA, family="mistral", model_types=("mistral",)),
    replace(_LLAMA, family="qwen2", model_types=("qwen2",)),
    replace(_LLAMA, family="qwen3", model_types=("qwen3",)),
    replace(_LLAMA, family="gemma", model_types=("gemma",)),
    replace(_LLAMA, family="gemma2", model_types=("gemma2",)),
    replace(
        _LLAMA,
        family="gemma3",
        model_types=("gemma3_text", "gemma3"),
        layers=("model.layers", "layers", "language_model.layers"),
        notes="gemma3 (multimodal): the language model's blocks only; the vision tower stays dense",
    ),
    ArchSpec(
        family="phi3",
        model_types=("phi3",),
        layers=("model.layers", "layers"),
        up="mlp.gate_up_proj",
        down="mlp.down_proj",
        act="mlp.activation_fn",
        ffn="mlp",
        fused_gate_up=True,
        notes="Phi3MLP chunks gate_up_proj's output as (gate, up): gate rows first",
    ),
    # --- encoder-decoder ------------------------------------------------------------------
    replace(
        _T5,
        variants=(  # T5 v1.1 / Flan-T5: T5DenseGatedActDense (feed_forward_proj="gated-gelu")
            replace(_T5, family="t5-gated", up=f"{_T5_FFN}.wi_1", gate=f"{_T5_FFN}.wi_0"),
        ),
    ),
)

_BY_MODEL_TYPE: dict[str, ArchSpec] = {mt: s for s in SPECS for mt in s.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def spec_for(model_type: str) -> ArchSpec:
    """The spec of a `config.model_type`; unknown types raise with the list of supported ones.

    A model_type with several FFN layouts (T5: dense or gated) returns its first layout, with the
    others in `variants`; `resolve_spec` picks the one an instantiated model really has."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path; integer parts index ModuleLists (negative indices allowed)."""
    mod: nn.Module = root
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            mod = cast(nn.ModuleList, mod)[int(part)]
        else:
            mod = getattr(mod, part)
    return mod


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    if name.lstrip("-").isdigit():
        cast(nn.ModuleList, parent)[int(name)] = new
    else:
        setattr(parent, name, new)


def find_blocks(model: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Module]]:
    """All transformer blocks that hold an FFN, as (dotted name from `model`, block), in order.

    Every path of `spec.layers` that exists, from the model or from its base model, contributes
    its blocks (T5: encoder then decoder); a block list reached by two paths counts once."""
    blocks: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    prefixes = [""]
    base_prefix = getattr(model, "base_model_prefix", "")
    if base_prefix and hasattr(model, base_prefix):
        prefixes.append(base_prefix + ".")
    for path in spec.layers:
        for prefix in prefixes:
            try:
                layers = get_submodule(model, prefix + path)
            except (AttributeError, IndexError):
                continue
            if id(layers) not in seen:
                seen.add(id(layers))
                blocks.extend((f"{prefix}{path}.{i}", b) for i, b in enumerate(cast(nn.ModuleList, layers)))
            break
    if not blocks:
        raise UnsupportedArchitectureError(
            f"no transformer blocks found for family {spec.family!r} at any of {spec.layers} "
            f"in {type(model).__name__}"
        )
    return blocks


def resolve_spec(model: nn.Module) -> ArchSpec:
    """The concrete spec of an instantiated model: the spec of its `config.model_type` or, where
    that model_type has several layouts, the first of them whose paths resolve in every block."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not model_type:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; moefy needs a Hugging Face model of "
            f"one of the supported model types: {', '.join(supported_model_types())}"
        )
    spec = spec_for(model_type)
    problems: list[str] = []
    for candidate in (spec, *spec.variants):
        problem = _layout_mismatch(model, candidate)
        if problem is None:
            return replace(candidate, variants=()) if candidate.variants else candidate
        problems.append(f"{candidate.family}: {problem}")
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} (model_type {model_type!r}) matches no known FFN layout: "
        + "; ".join(problems)
    )


def _layout_mismatch(model: nn.Module, spec: ArchSpec) -> str | None:
    """Why `spec` does not describe `model` (None if every path resolves in every block)."""
    try:
        blocks = find_blocks(model, spec)
    except UnsupportedArchitectureError as e:
        return str(e)
    for name, block in blocks:
        for path in spec.block_paths:
            try:
                get_submodule(block, path)
            except (AttributeError, IndexError, TypeError):
                return f"block {name} has no {path!r}"
    return None
