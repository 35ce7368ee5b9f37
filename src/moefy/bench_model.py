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


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def _clock(name: str) -> Callable[[], float]:
    """`wall`, or `cpu`: the calling thread's CPU time, which leaves out time the process was
    descheduled on a shared machine (needs torch.get_num_threads() == 1)."""
    if name not in CLOCKS:
        raise InvalidArgumentError(f"clock={name!r}; valid are {sorted(CLOCKS)}")
    if name == "cpu" and torch.get_num_threads() != 1:
        raise InvalidArgumentError(f"clock='cpu' needs one torch thread (now {torch.get_num_threads()})")
    return CLOCKS[name]


def _timed(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


@torch.inference_mode()
def bench_models(
    dense: nn.Module,
    moe: nn.Module,
    prompt: torch.Tensor,  # (1, P) token ids for decoding
    prefill: torch.Tensor,  # (B, L) token ids for prefill
    new_tokens: int = 32,
    repeats: int = 5,
    clock: str = "wall",
) -> dict:
    """Interleaved medians: decode tokens/s (greedy, KV cache) and prefill ms, dense vs MoE."""
    if repeats < 1 or new_tokens < 1:
        raise InvalidArgumentError(f"repeats={repeats} and new_tokens={new_tokens} must be >= 1")
    timer = _clock(clock)

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
            times[name].append(_timed(runs[name], timer))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "new_tokens": new_tokens, "prompt_tokens": prompt.shape[1], "prefill_shape": list(prefill.shape),
        "repeats": repeats, "threads": torch.get_num_threads(), "clock": clock,
        "dense_decode_tok_s": new_tokens / med["dense_decode"], "moe_decode_tok_s": new_tokens / med["moe_decode"],
        "decode_speedup": med["dense_decode"] / med["moe_decode"],
        "dense_prefill_ms": 1e3 * med["dense_prefill"], "moe_prefill_ms": 1e3 * med["moe_prefill"],
        "prefill_speedup": med["dense_prefill"] / med["moe_prefill"],
    }
    log.info("end-to-end: %s", result)
    return result


# ---- per-layer profile of a decode step ------------------------------------------------------------
PROFILE_STAGES = ("fused", "router", "select", "kernel", "static", "other")


class _StageClock:
    """Accumulates wall time per stage of every MoE layer during the model's one-token forward
    calls (decode steps): hooks on the model, the layers and their routers, and per-instance
    wrappers of the layers' stage methods (all removed on exit)."""

    def __init__(
        self, model: nn.Module, layers: list[nn.Module], ffns: list[nn.Module], clock: Callable[[], float]
    ) -> None:
        self.model, self.layers, self.ffns, self.clock = model, layers, ffns, clock
        self.seconds = dict.fromkeys((*PROFILE_STAGES, "layer", "ffn", "step"), 0.0)
        self.calls = self.steps = 0
        self.active = False  # inside a decode step
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._start: dict[int, float] = {}

    def _model_pre(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.active = ids is not None and ids.shape[-1] == 1
        self._start[id(m)] = self.clock()

    def _model_post(self, m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        elapsed = self.clock() - self._start.pop(id(m))
        if self.active:
            self.seconds["step"] += elapsed
            self.steps += 1
        self.active = False

    def _hooks(self, module: nn.Module, stage: str) -> None:
        def pre(m: nn.Module, args: object) -> None:
            self._start[id(m)] = self.clock()

        def post(m: nn.Module, args: object, out: object) -> None:
            elapsed = self.clock() - self._start.pop(id(m))
            if self.active:
                self.seconds[stage] += elapsed
                self.calls += stage == "layer"

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _wrap(self, layer: nn.Module, method: str, stage: str) -> None:
        inner = getattr(layer, method)

        def timed(*args: object, **kwargs: object) -> object:
            start = self.clock()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.active:
                    self.seconds[stage] += self.clock() - start

        setattr(layer, method, timed)

    def __enter__(self) -> _StageClock:
        self._handles += [
            self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
            self.model.register_forward_hook(self._model_post, with_kwargs=True),
        ]
        for layer in self.layers:
            self._hooks(layer, "layer")
            router = getattr(layer, "router", None)
            if isinstance(router, nn.Module):
                self._hooks(router, "router")
            for method, stage in _WRAPPED:
                self._wrap(layer, method, stage)
        for ffn in self.ffns:
            self._hooks(ffn, "ffn")
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        for layer in self.layers:
            for method, _ in _WRAPPED:
                layer.__dict__.pop(method, None)


# MoEFFN methods timed as stages (the router is timed by hooks)
_WRAPPED = (("_fused_decode", "fused"), ("_join_shared", "select"), ("_centred_experts", "kernel"), ("_static_total", "static"),
            ("add_compensation", "static"))


@torch.inference_mode()
def profile_decode(
    dense: nn.Module, moe: nn.Module, prompt: torch.Tensor, new_tokens: int = 16, repeats: int = 3,
    clock: str = "wall",
) -> dict:
    """Where a greedy decode step's time goes, dense vs MoE (one-token forward calls only; medians
    over repeats, dense and MoE interleaved).

    Per MoE layer (µs): fused (the one-call decode path: router, top-k, shared experts, kernel,
    static term and compensation vector together, where it applies), router (scorer, top-k, routing
    output), select (shared experts joined to
    the routed ones), kernel (the experts, static term folded in), static (M, compensation),
    other (what remains of the layer: Python, bias, counters), total; `dense_layer_us` is the dense
    FFN's. Per step (ms): the model's forward, its FFN layers, and the rest (attention, norms,
    embeddings, head). The stage timers add about a microsecond per stage to the MoE side.
    """
    from moefy.moe_ffn import MoEFFN

    timer = _clock(clock)
    names = [n for n, m in moe.named_modules() if isinstance(m, MoEFFN)]
    layers = [moe.get_submodule(n) for n in names]
    dense_ffns = [dense.get_submodule(n) for n in names]

    def run(model: nn.Module) -> None:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    samples: dict[str, list[float]] = {}
    run(dense)  # warm-up
    run(moe)
    for r in range(repeats):
        for which in ("dense", "moe") if r % 2 == 0 else ("moe", "dense"):
            is_moe = which == "moe"
            with _StageClock(
                moe if is_moe else dense, layers if is_moe else [], [] if is_moe else dense_ffns, timer
            ) as stages:
                run(moe if is_moe else dense)
            if not stages.steps:
                continue
            ffn = stages.seconds["layer" if is_moe else "ffn"]
            got = {f"{which}_step_ms": 1e3 * stages.seconds["step"] / stages.steps,
                   f"{which}_ffn_ms": 1e3 * ffn / stages.steps,
                   f"{which}_rest_ms": 1e3 * (stages.seconds["step"] - ffn) / stages.steps}
            per_layer = 1e6 / (stages.steps * len(names))
            if is_moe:
                staged = sum(stages.seconds[s] for s in PROFILE_STAGES[:-1])
                got |= {f"layer_{s}_us": per_layer * stages.seconds[s] for s in PROFILE_STAGES[:-1]}
                got |= {"layer_other_us": per_layer * (ffn - staged), "layer_total_us": per_layer * ffn}
            else:
                got["dense_layer_us"] = per_layer * ffn
            for k, v in got.items():
                samples.setdefault(k, []).append(v)
    result: dict = {k: statistics.median(v) for k, v in samples.items()}
    result.update(layers=len(names), new_tokens=new_tokens, prompt_tokens=prompt.shape[1], repeats=repeats,
                  threads=torch.get_num_threads(), clock=clock)
    log.info("decode profile: %s", result)
    return result
