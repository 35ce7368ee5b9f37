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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moefy.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate dotted paths from the model (or its base model) to the blocks
    up: str  # path in a block to the up projection (plain FFN: W1; gated: Wu; fused: [Wg; Wu])
    down: str  # path in a block to the down projection W2
    act: str  # path in a block to the activation callable the model itself uses
    gate: str | None = None  # path to the gate projection of a gated FFN (None: plain, or fused)
    ffn: str | None = None  # path to the module computing y = FFN(x); None = split layout
    identity: tuple[str, ...] = ()  # split layout: modules replaced by nn.Identity on swap
    fused_gate_up: bool = False  # `up` holds gate rows then up rows (Phi-3)
    conv1d: bool = False  # GPT-2 Conv1D: weight is (in, out), transposed w.r.t. nn.Linear
    causal: bool = True  # a causal LM (perplexity) vs an encoder (embeddings)
    notes: str = field(default="", compare=False)

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up


_LLAMA_LIKE = dict(
    layers=("model.layers", "layers"),
    up="mlp.up_proj",
    gate="mlp.gate_proj",
    down="mlp.down_proj",
    act="mlp.act_fn",
    ffn="mlp",
)

_BERT_LIKE = dict(
    layers=("encoder.layer",),
    up="intermediate.dense",
    down="output.dense",
    act="intermediate.intermediate_act_fn",
    identity=("intermediate",),
    causal=False,
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(family="llama", model_types=("llama",), **_LLAMA_LIKE),
    ArchSpec(family="bert", model_types=("bert",), **_BERT_LIKE),
)

_BY_MODEL_TYPE: dict[str, ArchSpec] = {mt: s for s in SPECS for mt in s.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def spec_for(model_type: str) -> ArchSpec:
    """The spec of a `config.model_type`; unknown types raise with the list of supported ones."""
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
            mod = mod[int(part)]  # type: ignore[index]
        else:
            mod = getattr(mod, part)
    return mod


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    if name.lstrip("-").isdigit():
        parent[int(name)] = new  # type: ignore[index]
    else:
        setattr(parent, name, new)


def find_blocks(model: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Module]]:
    """All transformer blocks that hold an FFN, as (dotted name from `model`, block), in order."""
    blocks: list[tuple[str, nn.Module]] = []
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
            blocks.extend((f"{prefix}{path}.{i}", b) for i, b in enumerate(layers))  # type: ignore[arg-type]
            break
    if not blocks:
        raise UnsupportedArchitectureError(
            f"no transformer blocks found for family {spec.family!r} at any of {spec.layers} "
            f"in {type(model).__name__}"
        )
    return blocks
