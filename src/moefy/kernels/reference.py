"""The eager reference kernel: one expert at a time, one token at a time. Slow by design; it is
the oracle that every fast kernel must equal."""

from __future__ import annotations

import torch
from torch import Tensor

from moefy.kernels.weights import ExpertWeights


def reference_expert_ffn(x: Tensor, weights: ExpertWeights, idx: Tensor, scale: Tensor | None = None) -> Tensor:
    """Σ_j scale[t, j] · v_{idx[t, j]}(x_t) with v_e(x) = a_e(x) W_out[e] (no output bias).

    x: (T, D); idx: (T, K) int64, -1 marks an empty slot (dynamic k, dropped tokens);
    scale: (T, K) or None (= 1). Returns (T, D).
    """
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0:
                continue
            a = weights.expert_activation(x[t : t + 1], e)  # (1, S)
            v = a @ weights.w_out[e]  # (1, D)
            if scale is not None:
                v = v * scale[t, j]
            out[t] += v[0]
    return out
