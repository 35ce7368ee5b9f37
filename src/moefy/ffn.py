"""moefy's view of one dense FFN: its weights in one canonical layout, and model surgery on it.

Canonical layout (row vector x of width d, intermediate width h; docs/DESIGN.md):

    plain:  a = act(x W_upᵀ + b_up)                          y = a W_downᵀ + b_down
    gated:  a = act(x W_gateᵀ + b_gate) ⊙ (x W_upᵀ + b_up)    y = a W_downᵀ + b_down

`extract_ffn` reads any supported block into this layout (undoing Conv1D transposes and
fused gate/up projections); `swap_ffn` puts a new module (the MoE FFN) in the FFN's place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from moefy.specs import ArchSpec, get_submodule, set_submodule


@dataclass
class FFNWeights:
    w_up: Tensor  # (h, d)
    w_down: Tensor  # (d, h)
    act: Callable[[Tensor], Tensor]  # the model's own activation module
    w_gate: Tensor | None = None  # (h, d), gated FFNs only
    b_up: Tensor | None = None  # (h,)
    b_gate: Tensor | None = None  # (h,)
    b_down: Tensor | None = None  # (d,)

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    @property
    def d_model(self) -> int:
        return self.w_up.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w_up.shape[0]

    def activation(self, x: Tensor) -> Tensor:
        """a(x): (..., d) -> (..., h), the intermediate activation the model computes."""
        up = nn.functional.linear(x, self.w_up, self.b_up)
        if self.w_gate is None:
            return self.act(up)
        return self.act(nn.functional.linear(x, self.w_gate, self.b_gate)) * up

    def output(self, a: Tensor) -> Tensor:
        """y from a: (..., h) -> (..., d)."""
        return nn.functional.linear(a, self.w_down, self.b_down)

    def __call__(self, x: Tensor) -> Tensor:
        return self.output(self.activation(x))

    def permuted(self, perm: Tensor) -> FFNWeights:
        """The same FFN with its intermediate neurons reordered by `perm` (h,)."""

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[perm]

        return replace(
            self,
            w_up=self.w_up[perm],
            w_gate=rows(self.w_gate),
            b_up=rows(self.b_up),
            b_gate=rows(self.b_gate),
            w_down=self.w_down[:, perm],
        )


def _weight_and_bias(module: nn.Module, conv1d: bool) -> tuple[Tensor, Tensor | None]:
    weight = module.weight.detach()
    if conv1d:  # transformers' Conv1D stores (in, out)
        weight = weight.t()
    bias = getattr(module, "bias", None)
    return weight, (None if bias is None else bias.detach())


def extract_ffn(block: nn.Module, spec: ArchSpec) -> FFNWeights:
    """Read the FFN of one transformer block into the canonical layout (views, no copies
    except where a transpose or split is needed)."""
    w_up, b_up = _weight_and_bias(get_submodule(block, spec.up), spec.conv1d)
    w_down, b_down = _weight_and_bias(get_submodule(block, spec.down), spec.conv1d)
    act = get_submodule(block, spec.act) if spec.act else None
    assert callable(act), f"activation at {spec.act!r} is not callable"
    w_gate = b_gate = None
    if spec.fused_gate_up:
        h = w_up.shape[0] // 2
        w_gate, w_up = w_up[:h], w_up[h:]
        if b_up is not None:
            b_gate, b_up = b_up[:h], b_up[h:]
    elif spec.gate is not None:
        w_gate, b_gate = _weight_and_bias(get_submodule(block, spec.gate), spec.conv1d)
    return FFNWeights(w_up=w_up, w_down=w_down, act=act, w_gate=w_gate, b_up=b_up, b_gate=b_gate, b_down=b_down)


def ffn_input_module(block: nn.Module, spec: ArchSpec) -> nn.Module:
    """The module whose (first positional) input is the FFN input x, for hooks."""
    return get_submodule(block, spec.ffn if spec.ffn is not None else spec.up)


def ffn_output_module(block: nn.Module, spec: ArchSpec) -> nn.Module:
    """The module whose output is the FFN output y (before any residual add)."""
    return get_submodule(block, spec.ffn if spec.ffn is not None else spec.down)


def swap_ffn(block: nn.Module, spec: ArchSpec, new_ffn: nn.Module) -> None:
    """Replace the block's FFN by `new_ffn`, a module mapping x (..., d) to y (..., d).
    The new module takes the block's train/eval mode."""
    new_ffn.train(block.training)
    if spec.ffn is not None:
        set_submodule(block, spec.ffn, new_ffn)
        return
    set_submodule(block, spec.down, new_ffn)
    for path in spec.identity:
        set_submodule(block, path, nn.Identity())


class ReferenceFFN(nn.Module):
    """The canonical FFN as a module (used to prove the canonical view is exact)."""

    def __init__(self, weights: FFNWeights) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, x: Tensor) -> Tensor:
        return self.weights(x)


@torch.no_grad()
def check_ffn_view(block: nn.Module, spec: ArchSpec, x: Tensor) -> tuple[Tensor, Tensor]:
    """(y from the model's own modules, y from moefy's canonical view) for an input x (..., d)."""
    weights = extract_ffn(block, spec)
    own = ffn_output_module(block, spec)
    if spec.ffn is not None:
        y_model = own(x)
    else:
        # split layout: run the model's own up -> act -> down chain
        y_model = get_submodule(block, spec.down)(_split_activation(block, spec, x))
    return y_model, weights(x)


def _split_activation(block: nn.Module, spec: ArchSpec, x: Tensor) -> Tensor:
    up = get_submodule(block, spec.up)(x)
    return get_submodule(block, spec.act)(up)
