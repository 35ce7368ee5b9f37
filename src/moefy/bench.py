"""FFN-layer latency: a dense gated FFN against its MoE conversion, timed interleaved in one run.

The dense layer is the Hugging Face computation (`F.linear` for gate, up and down); the MoE layer
is the same weights grouped into `num_experts` experts of h / num_experts neurons, of which each
token uses `top_k` (random routing, no duplicates), computed by an expert kernel from
`moefy.kernels`. The router is not timed: this measures the expert computation the conversion
makes sparse. Each repeat times dense and MoE back to back (alternating which goes first), and the
medians are compared, so machine noise hits both sides alike. The ideal speedup is
num_experts / top_k (the fraction of FFN weights and FLOPs that run).

With `flush_cache` the last-level cache is overwritten before every timed call, as the other
layers of a real model would: otherwise a small layer (SmolLM2's 10 MB) is timed from cache.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moefy.errors import InvalidArgumentError
from moefy.ffn import FFNWeights
from moefy.kernels import ExpertWeights, get_kernel

log = logging.getLogger(__name__)

FLUSH_BYTES = 256 * 2**20  # larger than any last-level cache of the machines we run on


def random_gated_ffn(d: int, h: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> FFNWeights:
    """A SiLU-gated FFN (Llama layout) with N(0, 1/fan_in) weights."""
    gen = torch.Generator().manual_seed(seed)

    def weight(rows: int, cols: int) -> Tensor:
        return (torch.randn(rows, cols, generator=gen) / cols**0.5).to(dtype)

    return FFNWeights(w_up=weight(h, d), w_gate=weight(h, d), w_down=weight(d, h), act=F.silu)


def random_routing(tokens: int, num_experts: int, top_k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """idx (T, K) of distinct experts per token, and softmax-normalised scales (T, K)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=gen)
    top = scores.topk(top_k, dim=1)
    return top.indices, torch.softmax(top.values, dim=1)


def _flush(buffer: Tensor | None) -> None:
    if buffer is not None:
        buffer.add_(1)


def _time(fn: Callable[[], Tensor], buffer: Tensor | None) -> float:
    _flush(buffer)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_ffn_layer(
    d: int,
    h: int,
    num_experts: int,
    top_k: int,
    tokens: int,
    dtype: torch.dtype = torch.float32,
    repeats: int = 20,
    kernel: str = "auto",
    warmup: int = 2,
    flush_cache: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Median latency of one dense gated FFN layer and of its MoE conversion (top_k of num_experts).

    Returns a dict: the configuration, `dense_ms` and `moe_ms` (medians), `speedup`
    (dense_ms / moe_ms), `ideal` (num_experts / top_k) and `efficiency` (speedup / ideal).
    """
    if h % num_experts != 0:
        raise InvalidArgumentError(f"num_experts={num_experts} must divide h={h}")
    if not 1 <= top_k <= num_experts:
        raise InvalidArgumentError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    if repeats < 1:
        raise InvalidArgumentError(f"repeats={repeats} must be >= 1")
    expert_ffn = get_kernel(kernel)
    ffn = random_gated_ffn(d, h, dtype, seed)
    experts = ExpertWeights.from_ffn(ffn, torch.arange(h), num_experts)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    idx, scale = random_routing(tokens, num_experts, top_k, seed + 2)
    scale = scale.to(dtype)
    buffer = torch.zeros(FLUSH_BYTES // 4, dtype=torch.float32) if flush_cache else None
    w_gate, w_up, w_down = ffn.w_gate, ffn.w_up, ffn.w_down
    assert w_gate is not None

    def dense() -> Tensor:
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)

    def moe() -> Tensor:
        return expert_ffn(x, experts, idx, scale)

    dense_times: list[float] = []
    moe_times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            dense()
            moe()
        for r in range(repeats):
            if r % 2 == 0:
                dense_times.append(_time(dense, buffer))
                moe_times.append(_time(moe, buffer))
            else:
                moe_times.append(_time(moe, buffer))
                dense_times.append(_time(dense, buffer))
    dense_ms = 1e3 * statistics.median(dense_times)
    moe_ms = 1e3 * statistics.median(moe_times)
    result = {
        "d": d, "h": h, "num_experts": num_experts, "top_k": top_k, "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "repeats": repeats,
        "threads": torch.get_num_threads(), "flush_cache": flush_cache,
        "dense_ms": dense_ms, "moe_ms": moe_ms, "speedup": dense_ms / moe_ms,
        "ideal": num_experts / top_k, "efficiency": dense_ms / moe_ms / (num_experts / top_k),
    }
    log.info(
        "d=%d h=%d E=%d k=%d T=%d %s: dense %.3f ms, moe %.3f ms, speedup %.2fx (ideal %.1fx)",
        d, h, num_experts, top_k, tokens, result["dtype"], dense_ms, moe_ms, result["speedup"], result["ideal"],
    )
    return result
