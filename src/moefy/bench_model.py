"""End-to-end speed of a converted model against its dense base: greedy decoding tokens/s and
prefill latency, dense and MoE interleaved in one run, medians over repeats, as ratios."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from moefy.errors import InvalidArgumentError

log = logging.getLogger(__name__)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def bench_models(
    dense: nn.Module,
    moe: nn.Module,
    prompt: torch.Tensor,  # (1, P) token ids for decoding
    prefill: torch.Tensor,  # (B, L) token ids for prefill
    new_tokens: int = 32,
    repeats: int = 5,
) -> dict:
    """Interleaved medians: decode tokens/s (greedy, KV cache) and prefill ms, dense vs MoE."""
    if repeats < 1 or new_tokens < 1:
        raise InvalidArgumentError(f"repeats={repeats} and new_tokens={new_tokens} must be >= 1")

    def decode(model: nn.Module) -> Callable[[], object]:
        return lambda: model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )

    def forward(model: nn.Module) -> Callable[[], object]:
        return lambda: model(input_ids=prefill, attention_mask=torch.ones_like(prefill))

    runs = {
        "dense_decode": decode(dense), "moe_decode": decode(moe),
        "dense_prefill": forward(dense), "moe_prefill": forward(moe),
    }
    for fn in runs.values():  # warm-up (kernel build, allocator)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(_timed(runs[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "new_tokens": new_tokens, "prompt_tokens": prompt.shape[1], "prefill_shape": list(prefill.shape),
        "repeats": repeats, "threads": torch.get_num_threads(),
        "dense_decode_tok_s": new_tokens / med["dense_decode"], "moe_decode_tok_s": new_tokens / med["moe_decode"],
        "decode_speedup": med["dense_decode"] / med["moe_decode"],
        "dense_prefill_ms": 1e3 * med["dense_prefill"], "moe_prefill_ms": 1e3 * med["moe_prefill"],
        "prefill_speedup": med["dense_prefill"] / med["moe_prefill"],
    }
    log.info("end-to-end: %s", result)
    return result
