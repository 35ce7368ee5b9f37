"""Expert-major FFN weights: each expert's rows contiguous, so a kernel reads only what it selects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights


@dataclass
class ExpertWeights:
    w_in: Tensor  # (E, S_in, D): gated: S gate rows then S up rows (S_in = 2S); plain: S up rows
    w_out: Tensor  # (E, S, D): rows of W_downᵀ, i.e. w_out[e, j] = W_down[:, neuron(e, j)]
    act: Callable[[Tensor], Tensor]
    gated: bool
    b_in: Tensor | None = None  # (E, S_in)

    @property
    def num_experts(self) -> int:
        return self.w_out.shape[0]

    @property
    def expert_size(self) -> int:
        return self.w_out.shape[1]

    @property
    def d_model(self) -> int:
        return self.w_out.shape[2]

    @classmethod
    def from_ffn(cls, ffn: FFNWeights, perm: Tensor, num_experts: int) -> ExpertWeights:
        """Group the neurons of `ffn` into `num_experts` equal experts: expert e holds neurons
        perm[e*S:(e+1)*S]. The bias of W_down is not an expert's; the MoE module keeps it."""
        h = ffn.d_ff
        if num_experts <= 0 or h % num_experts != 0:
            raise InvalidArgumentError(
                f"num_experts={num_experts} must be a positive divisor of the FFN width {h} "
                f"(experts are balanced: every expert has h/num_experts neurons)"
            )
        if perm.shape != (h,) or not torch.equal(torch.sort(perm).values, torch.arange(h, device=perm.device)):
            raise InvalidArgumentError(f"perm must be a permutation of range({h})")
        s = h // num_experts
        p = ffn.permuted(perm)
        d = ffn.d_model
        up = p.w_up.reshape(num_experts, s, d)
        b_up = None if p.b_up is None else p.b_up.reshape(num_experts, s)
        if p.w_gate is not None:
            gate = p.w_gate.reshape(num_experts, s, d)
            w_in = torch.cat([gate, up], dim=1)  # (E, 2S, D)
            if p.b_gate is not None or b_up is not None:
                zeros = torch.zeros(num_experts, s, dtype=up.dtype, device=up.device)
                b_gate = zeros if p.b_gate is None else p.b_gate.reshape(num_experts, s)
                b_in = torch.cat([b_gate, zeros if b_up is None else b_up], dim=1)
            else:
                b_in = None
        else:
            w_in, b_in = up, b_up
        w_out = p.w_down.t().reshape(num_experts, s, d)
        return cls(
            w_in=w_in.contiguous(), w_out=w_out.contiguous(), act=ffn.act, gated=p.gated,
            b_in=None if b_in is None else b_in.contiguous(),
        )

    def all_activations(self, x: Tensor) -> Tensor:
        """a_e(x) for every expert at once: (T, D) -> (T, E, S). Full cost (one dense pass)."""
        e, d = self.num_experts, self.d_model
        pre = (x @ self.w_in.reshape(-1, d).t()).reshape(x.shape[0], e, -1)  # (T, E, S_in)
        if self.b_in is not None:
            pre = pre + self.b_in
        s = self.expert_size
        return self.act(pre[..., :s]) * pre[..., s:] if self.gated else self.act(pre)

    def expert_activation(self, x: Tensor, expert: int) -> Tensor:
        """a_E(x) for one expert: (T, D) -> (T, S)."""
        pre = x @ self.w_in[expert].t()
        if self.b_in is not None:
            pre = pre + self.b_in[expert]
        if not self.gated:
            return self.act(pre)
        s = self.expert_size
        return self.act(pre[:, :s]) * pre[:, s:]
