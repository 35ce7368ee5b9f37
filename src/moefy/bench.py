"""FFN-layer latency: a dense gated FFN against its MoE conversion, timed interleaved in one run.

The dense layer is the Hugging Face computation (`F.linear` for gate, up and down); the MoE layer
is the same weights grouped into `num_experts` experts of h / num_experts neurons, of which each
token uses `top_k` (random routing, no duplicates), computed by an expert kernel from
`moefy.kernels`. The router is not timed: this measures the expert computation the conversion
makes sparse. Each repeat times dense and MoE back to back (alternating which goes first), and the
medians are compared, so machine noise hits both sides alike. The ideal speedup is
num_experts / top_k (the fraction of FFN weights and FLOPs that run).

With `cold_weights` (default) every repeat reads its own copy of the layer's weights, cycling
through enough copies to exceed the last-level cache, as decoding through a many-layer model does:
weights come from memory while code and small tensors stay cached. Without it a small layer
(SmolLM2's 10 MB) is timed from cache.

Two more figures put the speedup in context. `moe_all_ms` times the same kernel with every
expert selected (k = n): `speedup_vs_all` is the gain from skipping experts alone, free of how
well the dense BLAS runs on this CPU (MKL's fp32 paths are slow on AMD CPUs, which can push the
dense ratio past the ideal). `dense_gbps` / `moe_gbps` are the weight bytes each side must read
(the active experts' union for MoE) over its time: the figure that bounds decoding.

Roofline: at batch 1 a layer is memory-bound, so each side's weight bytes / time is compared with
the rate of a plain tensor sum over the same weight copies, timed in the same interleaved loop (so
machine noise hits it alike): a kernel at 1.0 reads as fast as a sum does.

`clock="cpu"` measures the calling thread's CPU time instead of wall time: on a shared,
oversubscribed machine it leaves out the time the process was descheduled. It needs
torch.get_num_threads() == 1 (other threads' work would not be counted).
"""

from __future__ import annotations

import functools
import logging
import platform
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

COLD_BYTES = 256 * 2**20  # weight copies cycled per side: more than any last-level cache we run on
MAX_COPIES = 64


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


def cpu_name() -> str:
    """The CPU model (`model name` of /proc/cpuinfo), for every table of figures."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_bandwidth_gbps(mib: int = 256, repeats: int = 7, clock: str = "wall") -> float:
    """The machine's read bandwidth with the current thread count, GB/s: the median rate of
    summing a `mib` MiB fp32 tensor (two copies alternated, each larger than any cache we run on).
    The roofline a memory-bound kernel is judged against: bytes it must read / time / this."""
    timer = {"wall": time.perf_counter, "cpu": time.thread_time}[clock]
    n = mib * 2**20 // 4
    bufs = [torch.ones(n), torch.ones(n)]
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            start = timer()
            bufs[r % 2].sum()
            if r:  # the first pass warms the pages
                times.append(timer() - start)
    return 4 * n / statistics.median(times) / 1e9


def _time(fn: Callable[[], Tensor], clock: Callable[[], float]) -> float:
    """Seconds one call of fn takes by `clock`."""
    start = clock()
    fn()
    return clock() - start


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
    cold_weights: bool = True,
    clock: str = "wall",
    seed: int = 0,
    bandwidth_gbps: float | None = None,
) -> dict[str, Any]:
    """Median latency of one dense gated FFN layer and of its MoE conversion (top_k of num_experts).

    Returns a dict: the configuration, `dense_ms`, `moe_ms` and `moe_all_ms` (medians), `speedup`
    (dense_ms / moe_ms), `ideal` (num_experts / top_k), `efficiency` (speedup / ideal),
    `speedup_vs_all` (moe_all_ms / moe_ms), `dense_gbps` / `moe_gbps` / `moe_all_gbps` (weight bytes
    read per second), `read_ms` / `read_gbps` (a plain tensor sum over the same weight bytes, timed
    in the same interleaved loop: the roofline) and `dense_roofline` / `moe_roofline` /
    `moe_all_roofline` (each rate over read_gbps; 1.0: reading at the speed of a plain sum).
    `bandwidth_gbps`, if given, is recorded as is.
    """
    if h % num_experts != 0:
        raise InvalidArgumentError(f"num_experts={num_experts} must divide h={h}")
    if not 1 <= top_k <= num_experts:
        raise InvalidArgumentError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    if repeats < 1:
        raise InvalidArgumentError(f"repeats={repeats} must be >= 1")
    clocks = {"wall": time.perf_counter, "cpu": time.thread_time}
    if clock not in clocks:
        raise InvalidArgumentError(f"clock={clock!r}; valid are {sorted(clocks)}")
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise InvalidArgumentError(
            f"clock='cpu' needs torch.set_num_threads(1) (now {torch.get_num_threads()} threads)"
        )
    timer = clocks[clock]
    expert_ffn = get_kernel(kernel)
    layer_bytes = 3 * d * h * torch.empty((), dtype=dtype).element_size()
    copies = min(MAX_COPIES, -(-COLD_BYTES // layer_bytes)) if cold_weights else 1
    ffns = [random_gated_ffn(d, h, dtype, seed + 100 * c) for c in range(copies)]
    experts = [ExpertWeights.from_ffn(f, torch.arange(h), num_experts) for f in ffns]
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    # a fresh routing every repeat, as successive tokens have (and no expert stays cache-warm)
    routings = [random_routing(tokens, num_experts, top_k, seed + 2 + r) for r in range(repeats)]
    routings = [(idx, scale.to(dtype)) for idx, scale in routings]
    idx_all, scale_all = random_routing(tokens, num_experts, num_experts, seed + 1)
    scale_all = scale_all.to(dtype)

    def dense(r: int) -> Tensor:
        f = ffns[r % copies]
        assert f.w_gate is not None
        return F.linear(F.silu(F.linear(x, f.w_gate)) * F.linear(x, f.w_up), f.w_down)

    def moe(r: int) -> Tensor:
        idx, scale = routings[r % repeats]
        return expert_ffn(x, experts[r % copies], idx, scale)

    def moe_all(r: int) -> Tensor:  # half a cycle away from the copy moe just read
        return expert_ffn(x, experts[(r + copies // 2) % copies], idx_all, scale_all)

    def read(r: int) -> Tensor:  # a plain sum over a cold copy of the bytes dense reads: the roofline
        f = ffns[(r + copies // 3) % copies]
        assert f.w_gate is not None
        return f.w_gate.sum() + f.w_up.sum() + f.w_down.sum()

    runs: dict[str, Callable[[int], Tensor]] = {"dense": dense, "moe": moe, "moe_all": moe_all, "read": read}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for r in range(warmup):
            for fn in runs.values():
                fn(r)
        for r in range(repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                times[name].append(_time(functools.partial(runs[name], warmup + r), timer))
    dense_ms, moe_ms, moe_all_ms, read_ms = (1e3 * statistics.median(times[name]) for name in runs)
    weight_bytes = layer_bytes
    # fraction of the experts some token uses (the union): what MoE must read
    active = statistics.mean(torch.unique(idx[idx >= 0]).numel() for idx, _ in routings) / num_experts
    result = {
        "d": d, "h": h, "num_experts": num_experts, "top_k": top_k, "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "repeats": repeats,
        "threads": torch.get_num_threads(), "cold_weights": cold_weights, "weight_copies": copies,
        "clock": clock, "dense_ms": dense_ms, "moe_ms": moe_ms, "moe_all_ms": moe_all_ms,
        "speedup": dense_ms / moe_ms, "ideal": num_experts / top_k,
        "efficiency": dense_ms / moe_ms / (num_experts / top_k), "speedup_vs_all": moe_all_ms / moe_ms,
        "dense_gbps": weight_bytes / dense_ms / 1e6, "moe_gbps": active * weight_bytes / moe_ms / 1e6,
        "moe_all_gbps": weight_bytes / moe_all_ms / 1e6, "all_vs_dense": dense_ms / moe_all_ms,
        "read_ms": read_ms, "read_gbps": weight_bytes / read_ms / 1e6,
    }
    for side in ("dense", "moe", "moe_all"):
        result[f"{side}_roofline"] = result[f"{side}_gbps"] / result["read_gbps"]
    if bandwidth_gbps:
        result["bandwidth_gbps"] = bandwidth_gbps
    log.info(
        "d=%d h=%d E=%d k=%d T=%d %s: dense %.3f ms, moe %.3f ms, speedup %.2fx (ideal %.1fx)",
        d, h, num_experts, top_k, tokens, result["dtype"], dense_ms, moe_ms, result["speedup"], result["ideal"],
    )
    return result
