"""Expert construction: balanced k-means (issue 16, item 4) and `plan_experts`."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moefy.errors import InvalidArgumentError
from moefy.experts import _auction, balanced_kmeans, balanced_objective, plan_experts
from moefy.ffn import FFNWeights

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kmeans.py"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _old_balanced_kmeans():  # type: ignore[no-untyped-def]
    """The greedy implementation before issue 16, kept verbatim in the benchmark."""
    spec = importlib.util.spec_from_file_location("bench_kmeans", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.old_balanced_kmeans


def _features(h: int, d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, d, generator=g)
    if rank is not None:
        x = torch.randn(h, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.3 * x
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize(
    ("h", "d", "n"),
    [(8, 3, 1), (8, 3, 8), (12, 4, 3), (30, 5, 6), (64, 16, 2), (96, 8, 32), (128, 32, 16), (250, 10, 25), (384, 24, 64)],
)
def test_exact_balance_for_many_shapes(h: int, d: int, n: int) -> None:
    labels = balanced_kmeans(_features(h, d, seed=h + n), n, seed=1)
    assert labels.shape == (h,) and labels.dtype == torch.long
    assert torch.equal(torch.bincount(labels, minlength=n), torch.full((n,), h // n))


def test_duplicate_and_constant_rows_stay_balanced() -> None:
    x = torch.zeros(48, 6)
    x[:24] = 1.0  # two groups of identical rows: every distance ties
    labels = balanced_kmeans(x, 8)
    assert torch.equal(torch.bincount(labels, minlength=8), torch.full((8,), 6))
    labels = balanced_kmeans(torch.zeros(20, 3), 4)
    assert torch.equal(torch.bincount(labels, minlength=4), torch.full((4,), 5))


def test_deterministic_per_seed() -> None:
    x = _features(256, 24, seed=0, rank=4)
    a, b = balanced_kmeans(x, 16, seed=3), balanced_kmeans(x.clone(), 16, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(balanced_kmeans(x, 16, seed=4), a)  # the seed picks the initial centres


@pytest.mark.parametrize(("h", "d", "n", "rank"), [(256, 16, 8, None), (256, 16, 8, 4), (384, 48, 64, None), (384, 48, 64, 6)])
def test_objective_no_worse_than_the_old_greedy_loop(h: int, d: int, n: int, rank: int | None) -> None:
    old = _old_balanced_kmeans()
    for seed in range(2):
        x = _features(h, d, seed=seed, rank=rank)
        before = balanced_objective(x, old(x, n, seed=seed), n)
        after = balanced_objective(x, balanced_kmeans(x, n, seed=seed), n)
        assert after <= before * 1.005, (seed, before, after)


def test_recovers_a_planted_clustering() -> None:
    g = torch.Generator().manual_seed(0)
    n, size, d = 24, 8, 32
    centres = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) * 10
    truth = torch.arange(n).repeat_interleave(size)
    truth = truth[torch.randperm(n * size, generator=g)]
    x = centres[truth] + 0.05 * torch.randn(n * size, d, generator=g)
    for seed in range(3):
        labels = balanced_kmeans(x, n, seed=seed)
        # the same partition: each found cluster is exactly one planted cluster
        pairs = torch.unique(torch.stack([labels, truth]), dim=1)
        assert pairs.shape[1] == n, seed


def test_clear_error_when_the_count_does_not_divide() -> None:
    x = _features(10, 4, seed=0)
    for n in (3, 0, 11):
        with pytest.raises(InvalidArgumentError, match="divide"):
            balanced_kmeans(x, n)


def test_clear_error_for_non_finite_features() -> None:
    x = _features(16, 4, seed=0)
    x[3, 1] = float("nan")
    with pytest.raises(InvalidArgumentError, match="NaN"):
        balanced_kmeans(x, 4)


def test_auction_is_near_optimal() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    h, n = 60, 6
    size = h // n
    benefit = torch.randn(h, n, generator=g)
    spread = float((benefit.max(1).values - benefit.min(1).values).mean())
    eps = 1e-4 * spread
    labels, _ = _auction(benefit, size, torch.zeros(n), [1e-2 * spread, eps])
    assert torch.equal(torch.bincount(labels, minlength=n), torch.full((n,), size))
    got = float(benefit.gather(1, labels[:, None]).sum())
    slots = benefit.repeat_interleave(size, dim=1).numpy()  # (h, h): one column per slot
    rows, cols = scipy_optimize.linear_sum_assignment(slots, maximize=True)
    best = float(slots[rows, cols].sum())
    assert got >= best - h * eps - 1e-4


def _ffn(h: int, d: int, seed: int = 0) -> FFNWeights:
    g = torch.Generator().manual_seed(seed)
    return FFNWeights(
        w_up=torch.randn(h, d, generator=g), w_down=torch.randn(d, h, generator=g), act=torch.nn.SiLU(),
        w_gate=torch.randn(h, d, generator=g),
    )


@pytest.mark.parametrize(("method", "shared"), [("kmeans", 0.0), ("kmeans", 0.25), ("coactivation", 0.0)])
def test_plan_experts_is_a_balanced_permutation(method: str, shared: float) -> None:
    h, d, n = 96, 16, 8
    ffn = _ffn(h, d)
    a = torch.randn(64, h, generator=torch.Generator().manual_seed(1))
    plan = plan_experts(ffn, n, method, sample_a=a, mean=a.mean(0), shared_fraction=shared, seed=2)
    assert torch.equal(plan.perm.sort().values, torch.arange(h))
    assert plan.expert_size == h // n and plan.num_shared == round(shared * n)
    again = plan_experts(ffn, n, method, sample_a=a, mean=a.mean(0), shared_fraction=shared, seed=2)
    assert torch.equal(plan.perm, again.perm)


def test_plan_experts_refuses_a_count_that_does_not_divide() -> None:
    with pytest.raises(InvalidArgumentError, match="does not divide the FFN width 96"):
        plan_experts(_ffn(96, 8), 7)


@pytest.mark.parametrize("epochs", [1, 10])  # 10 steps: OneCycleLR's warm-up ends at step 0 (it divided by zero)
def test_router_trains_for_any_number_of_steps(epochs: int) -> None:
    from moefy.routers import fit_router

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    targets = torch.rand(64, 4, generator=g)
    fit = fit_router(x, targets, 2, hidden=0, epochs=epochs, batch_size=64)
    assert 0.0 <= fit.recall <= 1.0 and fit.loss == fit.loss
