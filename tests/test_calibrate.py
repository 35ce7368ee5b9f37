"""Calibration accumulators: streaming neuron statistics against brute force (and merge == one
pass), and the input reservoir against a deliberately naive sequential Algorithm R that consumes
the same random draws — the same sample for the same seed, whatever torch's thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from moefy.calibrate import NeuronStats, TokenReservoir, calibrate_blockwise
from tests.analysis_fixtures import loaded_tiny, random_batches


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stream(seed: int = 0, blocks: int = 6, rows: int = 2048, width: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g) for _ in range(blocks)]


def _naive_reservoir(stream: list[torch.Tensor], capacity: int, seed: int) -> torch.Tensor:
    """Algorithm R one element at a time: the i-th element (1-based) past a full reservoir is kept
    with probability capacity / i and overwrites a uniformly random slot, so of two elements drawn
    for the same slot the later one stays. Random draws in the order TokenReservoir makes them (per
    block: one keep draw per element, then one slot per kept element)."""
    g = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []
    seen = 0
    for x in stream:
        free = capacity - len(rows)
        if free > 0:
            rows.extend(r.clone() for r in x[:free])
            seen += min(free, x.shape[0])
            x = x[free:]
        if x.shape[0] == 0:
            continue
        positions = torch.arange(seen + 1, seen + x.shape[0] + 1, dtype=torch.float64)
        keep = torch.rand(x.shape[0], generator=g, dtype=torch.float64) < capacity / positions
        slots = torch.randint(0, capacity, (int(keep.sum()),), generator=g)
        for slot, row in zip(slots.tolist(), x[keep], strict=True):
            rows[slot] = row.clone()
        seen += x.shape[0]
    return torch.stack(rows)


@pytest.mark.parametrize("threads", [1, 8])
def test_reservoir_is_sequential_algorithm_r(threads: int) -> None:
    """Same seed, same sample — also with many threads (a vectorised `rows[slots] = x` with a slot
    drawn twice leaves an unspecified winner, which differs from run to run under threading)."""
    stream = _stream()
    expected = _naive_reservoir(stream, 512, seed=3)
    with _threads(threads):
        for _ in range(4):
            r = TokenReservoir(512, 32, seed=3)
            for x in stream:
                r.add(x)
            assert r.seen == 6 * 2048 and r.rows.shape == (512, 32)
            torch.testing.assert_close(r.rows, expected, rtol=0, atol=0)


def test_reservoir_keeps_a_short_stream_whole_and_in_order() -> None:
    stream = _stream(blocks=2, rows=100)
    r = TokenReservoir(512, 32, seed=0)
    for x in stream:
        r.add(x)
    torch.testing.assert_close(r.rows, torch.cat(stream), rtol=0, atol=0)


def test_reservoir_sample_is_roughly_uniform_over_the_stream() -> None:
    """Each of 6 equal blocks should hold about 1/6 of a 512-row sample (binomial sd ≈ 8.4)."""
    stream = [torch.full((2048, 1), float(i)) for i in range(6)]
    r = TokenReservoir(512, 1, seed=0)
    for x in stream:
        r.add(x)
    counts = torch.bincount(r.rows[:, 0].long(), minlength=6)
    assert counts.sum() == 512 and ((counts - 512 / 6).abs() < 40).all(), counts.tolist()


def test_neuron_stats_match_brute_force_and_merge() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g).relu()  # exact zeros too
    eps = (0.01, 0.3)
    one = NeuronStats(16, eps)
    one.update(a)
    parts = NeuronStats(16, eps), NeuronStats(16, eps)
    parts[0].update(a[:120])
    parts[1].update(a[120:])
    merged = parts[0].merge(parts[1])
    for s in (one, merged):
        assert s.count == 300
        torch.testing.assert_close(s.mean, a.mean(0))
        torch.testing.assert_close(s.variance, a.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.exact_sparsity(), (a == 0).float().mean(0))
        torch.testing.assert_close(s.soft_sparsity(), torch.stack([(a.abs() <= e).float().mean(0) for e in eps]))


def test_blockwise_calibration_is_reproducible() -> None:
    """Two calibrations of the same model on the same text keep the same sample (here with 8 threads)."""
    loaded = loaded_tiny("llama")
    batches = random_batches(32, 48)
    with _threads(8):
        a = calibrate_blockwise(loaded.model, loaded.spec, batches, sample_size=256, sequential=False, seed=1)
        b = calibrate_blockwise(loaded.model, loaded.spec, batches, sample_size=256, sequential=False, seed=1)
    for la, lb in zip(a, b, strict=True):
        assert la.stats.count == lb.stats.count == 32 * 48
        torch.testing.assert_close(la.sample_x, lb.sample_x, rtol=0, atol=0)
        torch.testing.assert_close(la.stats.mean, lb.stats.mean, rtol=0, atol=0)
