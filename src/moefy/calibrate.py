"""Calibration: stream per-neuron FFN statistics over text, block by block.

Mechanics follow GPTQ / llm-compressor: capture the inputs of the first transformer block
with a pre-hook, then walk the blocks one at a time — hook the FFN input, run the block,
fold what the hook saw into mergeable accumulators, remove the hook, move on. Only one block's
activations are alive at once, so models larger than memory can later be streamed block by
block, and statistics from several workers merge with `NeuronStats.merge`.

`calibrate_blockwise` hands each block to a callback *before* computing the next block's
inputs, so the callback may convert the block and the next block then sees the inputs it will
really see in the converted model (sequential conversion). Where the weights are is a
`WeightSource`: in memory (nothing to do), or read from safetensors shards one block at a time
(`moefy.streaming`). A walk can start at any block given the hidden states entering it (a
resumed search, `moefy.search_checkpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from moefy.errors import CalibrationError
from moefy.ffn import FFNWeights, extract_ffn, ffn_input_module
from moefy.settings import DEFAULT_EPS
from moefy.specs import ArchSpec, find_blocks
from moefy.text import TokenBatch

if TYPE_CHECKING:
    from moefy.distributed import DataParallel

log = logging.getLogger(__name__)


class WeightSource(Protocol):
    """Where a calibrated model's weights are while the walk needs them."""

    def embeddings(self) -> AbstractContextManager[object]:
        """Everything before the first block (embeddings) is loaded inside this context."""
        ...

    def block(self, index: int, name: str, block: nn.Module) -> AbstractContextManager[object]:
        """Block `index` is loaded inside this context (and may be freed after it)."""
        ...


class InMemory:
    """The whole model is in memory already: nothing to load or free."""

    def embeddings(self) -> AbstractContextManager[object]:
        return nullcontext()

    def block(self, index: int, name: str, block: nn.Module) -> AbstractContextManager[object]:
        return nullcontext()


@dataclass
class NeuronStats:
    """Streaming per-neuron statistics of activations a (T, h). Mergeable: stats over a union
    of token sets = `merge` of the stats of the parts."""

    d_ff: int
    eps: tuple[float, ...] = DEFAULT_EPS
    count: int = 0
    total: Tensor = field(default=None)  # type: ignore[assignment]  # (h,) Σ a, float64
    total_sq: Tensor = field(default=None)  # type: ignore[assignment]  # (h,) Σ a²
    total_abs: Tensor = field(default=None)  # type: ignore[assignment]  # (h,) Σ |a|
    exact_zero: Tensor = field(default=None)  # type: ignore[assignment]  # (h,) #(a == 0)
    near_zero: Tensor = field(default=None)  # type: ignore[assignment]  # (len(eps), h) #(|a| <= eps)

    def __post_init__(self) -> None:
        if any(e <= 0 for e in self.eps):
            raise CalibrationError(f"eps values must be > 0, got {self.eps}")
        h = self.d_ff
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.total = z(h) if self.total is None else self.total
        self.total_sq = z(h) if self.total_sq is None else self.total_sq
        self.total_abs = z(h) if self.total_abs is None else self.total_abs
        self.exact_zero = z(h) if self.exact_zero is None else self.exact_zero
        self.near_zero = z(len(self.eps), h) if self.near_zero is None else self.near_zero

    def update(self, a: Tensor) -> None:
        """Fold a batch of activations (T, h) in."""
        a = a.detach().reshape(-1, self.d_ff).double()
        self.count += a.shape[0]
        self.total += a.sum(0)
        self.total_sq += (a * a).sum(0)
        abs_a = a.abs()
        self.total_abs += abs_a.sum(0)
        self.exact_zero += (a == 0).sum(0)
        for i, e in enumerate(self.eps):
            self.near_zero[i] += (abs_a <= e).sum(0)

    def merge(self, other: NeuronStats) -> NeuronStats:
        if other.d_ff != self.d_ff or other.eps != self.eps:
            raise CalibrationError("cannot merge statistics of different widths or eps grids")
        return NeuronStats(
            d_ff=self.d_ff, eps=self.eps, count=self.count + other.count,
            total=self.total + other.total, total_sq=self.total_sq + other.total_sq,
            total_abs=self.total_abs + other.total_abs, exact_zero=self.exact_zero + other.exact_zero,
            near_zero=self.near_zero + other.near_zero,
        )

    @property
    def mean(self) -> Tensor:  # (h,) E[a], the G-MoEfication representative
        return (self.total / max(self.count, 1)).float()

    @property
    def variance(self) -> Tensor:  # (h,)
        m = self.total / max(self.count, 1)
        return (self.total_sq / max(self.count, 1) - m * m).clamp_min(0).float()

    def exact_sparsity(self) -> Tensor:  # (h,) fraction of tokens with a == 0
        return (self.exact_zero / max(self.count, 1)).float()

    def soft_sparsity(self) -> Tensor:  # (len(eps), h) fraction with |a| <= eps
        return (self.near_zero / max(self.count, 1)).float()

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "count": torch.tensor(self.count), "eps": torch.tensor(self.eps), "total": self.total,
            "total_sq": self.total_sq, "total_abs": self.total_abs, "exact_zero": self.exact_zero,
            "near_zero": self.near_zero,
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> NeuronStats:
        return cls(
            d_ff=sd["total"].shape[0], eps=tuple(float(e) for e in sd["eps"]), count=int(sd["count"]),
            total=sd["total"], total_sq=sd["total_sq"], total_abs=sd["total_abs"],
            exact_zero=sd["exact_zero"], near_zero=sd["near_zero"],
        )


class TokenReservoir:
    """A bounded uniform random sample of FFN inputs x (rows) over a stream (reservoir sampling,
    Algorithm R in blocks). Memory is `capacity` rows whatever the corpus size."""

    def __init__(self, capacity: int, d_model: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.rows = torch.empty(0, d_model)
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        free = self.capacity - self.rows.shape[0]
        if free > 0:
            take = x[:free]
            self.rows = torch.cat([self.rows, take])
            self.seen += take.shape[0]
            x = x[free:]
        if x.shape[0] == 0:
            return
        # for the i-th stream element (1-based), keep with probability capacity / i at a random slot
        positions = torch.arange(self.seen + 1, self.seen + x.shape[0] + 1, dtype=torch.float64)
        u = torch.rand(x.shape[0], generator=self.generator, dtype=torch.float64)
        keep = u < self.capacity / positions
        kept = x[keep]  # (n, d) in stream order
        slots = torch.randint(0, self.capacity, (kept.shape[0],), generator=self.generator)
        # a slot drawn twice keeps the later row, as the sequential algorithm would (an indexed
        # assignment with duplicate indices leaves the winner unspecified, and it varies with threads)
        last = torch.full((self.capacity,), -1, dtype=torch.long).scatter_reduce(
            0, slots, torch.arange(kept.shape[0]), reduce="amax"
        )
        filled = last >= 0
        self.rows[filled] = kept[last[filled]]
        self.seen += x.shape[0]


@dataclass
class LayerCalibration:
    """What calibration keeps for one FFN: its statistics and a sample of its inputs."""

    index: int
    name: str
    stats: NeuronStats
    sample_x: Tensor  # (N, d) FFN inputs; a = ffn.activation(sample_x)


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Captured inputs of the first block for each calibration chunk."""

    hidden: list[Tensor]  # each (B, L, d)
    args: list[tuple]
    kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[TokenBatch]) -> BlockInputs:
    """Run the model's embedding part on each batch and capture what the first block receives."""
    captured = BlockInputs([], [], [])

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append(
            {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        )
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    device = next(p.device for p in model.parameters() if not p.is_meta)  # streamed: the blocks are on "meta"
    try:
        for batch in batches:
            try:
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


BlockCallback = Callable[[int, str, nn.Module, LayerCalibration], None]
OutputsCallback = Callable[[int, list[Tensor]], None]


@torch.no_grad()
def calibrate_blockwise(
    model: nn.Module,
    spec: ArchSpec,
    batches: list[TokenBatch],
    *,
    sample_size: int = 8192,
    eps: tuple[float, ...] = DEFAULT_EPS,
    on_block: BlockCallback | None = None,
    sequential: bool = True,
    keep: bool = True,
    seed: int = 0,
    weights: WeightSource | None = None,
    start: int = 0,
    hidden: list[Tensor] | None = None,
    on_outputs: OutputsCallback | None = None,
    parallel: DataParallel | None = None,
) -> list[LayerCalibration]:
    """Walk the blocks in order, collecting each FFN's statistics and input sample.

    `on_block(i, name, block, calibration)` runs after block i was calibrated; it may swap the
    block's FFN. With `sequential`, block i is then re-run so that block i+1 is calibrated on
    the outputs of the *converted* block i (the inputs it will see in the converted model).
    `on_outputs(i, outputs)` then gets those outputs (one (B, L, d) tensor per batch).
    With `keep=False` only the callback sees each LayerCalibration (bounded memory).
    `weights` loads (and frees) the blocks as the walk reaches them (default: all in memory).
    `start`, `hidden`: begin at block `start`, whose inputs are `hidden` (a resumed walk).
    `parallel`: this process runs its share of the batches; statistics and sample are merged
    (`moefy.distributed`, under torchrun).
    """
    if spec.family == "t5":
        from moefy.errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError("block-wise calibration of encoder-decoder models (T5) is not supported yet")
    named_blocks = find_blocks(model, spec)
    blocks = [b for _, b in named_blocks]
    weights = weights or InMemory()
    if parallel is not None:
        batches = parallel.shard(batches)
    results: list[LayerCalibration] = []
    if start >= len(blocks):
        return results
    with weights.embeddings():
        inputs = capture_first_block_inputs(model, blocks, batches)
    if start > 0:  # resumed: the captured arguments (masks, positions) with the saved hidden states
        assert hidden is not None and len(hidden) == len(inputs.hidden), "a resumed walk needs one hidden state per batch"
        inputs.hidden = hidden
    hidden = inputs.hidden
    for i, (name, block) in enumerate(named_blocks):
        if i < start:
            continue
        with weights.block(i, name, block):
            layer, hidden = _calibrate_block(
                i, name, block, spec, hidden, inputs, sample_size, eps, seed, on_block, sequential, parallel
            )
        if on_outputs is not None:
            on_outputs(i, hidden)
        if keep:
            results.append(layer)
    return results


def _calibrate_block(
    i: int, name: str, block: nn.Module, spec: ArchSpec, hidden: list[Tensor], inputs: BlockInputs, sample_size: int,
    eps: tuple[float, ...], seed: int, on_block: BlockCallback | None, sequential: bool, parallel: DataParallel | None,
) -> tuple[LayerCalibration, list[Tensor]]:
    """Calibrate one block on `hidden`, hand it to `on_block`; returns its calibration and outputs."""
    ffn = extract_ffn(block, spec)
    stats = NeuronStats(ffn.d_ff, eps)
    reservoir = TokenReservoir(sample_size, ffn.d_model, seed=seed + i)
    seen: list[Tensor] = []  # data parallel: this process's FFN inputs, sampled once all are gathered
    sample = reservoir.add if parallel is None else seen.append
    handle = ffn_input_module(block, spec).register_forward_pre_hook(_stats_hook(ffn, stats, sample, name))
    try:
        outputs = _run_block(block, hidden, inputs)
    finally:
        handle.remove()
    if parallel is not None:
        stats = parallel.merge_stats(stats)
        for x in parallel.gather(seen, ffn.d_model):  # every batch's inputs in batch order: the single-process sample
            reservoir.add(x)
        del seen
    layer = LayerCalibration(index=i, name=name, stats=stats, sample_x=reservoir.rows)
    log.info("calibrated %s (block %d): %d tokens, %d sampled", name, i, stats.count, reservoir.rows.shape[0])
    del ffn  # a streamed block's weights must be freeable once the walk leaves it
    if on_block is not None:
        on_block(i, name, block, layer)
        if sequential:
            outputs = _run_block(block, hidden, inputs)
    return layer, outputs


def _stats_hook(ffn: FFNWeights, stats: NeuronStats, sample: Callable[[Tensor], None], name: str) -> Callable:
    def hook(_mod: nn.Module, args: tuple) -> None:
        x = args[0]
        a = ffn.activation(x)
        if not torch.isfinite(a).all():
            raise CalibrationError(f"non-finite (NaN or inf) FFN activations in layer {name}")
        stats.update(a)
        sample(x)

    return hook


def _run_block(block: nn.Module, hidden: list[Tensor], inputs: BlockInputs) -> list[Tensor]:
    return [_block_output(block(h, *a, **kw)) for h, a, kw in zip(hidden, inputs.args, inputs.kwargs, strict=True)]
