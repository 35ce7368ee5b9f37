"""General MoE layers: routers, losses, capacity, the MoE module, and the from-scratch experiment
(`benchmarks/train_from_scratch.py`, smoke)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moefy.errors import InvalidArgumentError
from moefy.kernels import KERNELS, get_kernel
from moefy.layers import (
    Experts,
    GeometricRouter,
    MoE,
    NoisyTopKRouter,
    TopKRouter,
    apply_capacity,
    cv_squared,
    expert_capacity,
    expert_counts,
    grouped_expert_ffn,
    grouped_expert_outputs,
    importance_loss,
    load_loss,
    mixtral_router,
    normalize_expert_output,
    resolve_kernel,
    router_z_loss,
    smooth_load,
    switch_balance_loss,
    switch_router,
)
from moefy.layers.dispatch import per_slot_expert_outputs

D = 16


def _routers(num_experts: int, top_k: int) -> list[nn.Module]:
    return [
        TopKRouter(D, num_experts, top_k, renormalize=True),
        TopKRouter(D, num_experts, top_k, renormalize=False),
        NoisyTopKRouter(D, num_experts, top_k),
        GeometricRouter(D, num_experts, top_k, activation="softplus"),
        GeometricRouter(D, num_experts, top_k, activation="sigmoid"),
        GeometricRouter(D, num_experts, top_k, activation="relu"),
    ]


# --- one expert is the dense FFN --------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kernel", [None, "grouped", "reference"])
def test_one_expert_equals_dense_ffn_outputs_and_gradients(gated: bool, kernel: str | None) -> None:
    torch.manual_seed(0)
    h = 24
    dense_up = nn.Linear(D, 2 * h if gated else h, bias=False)
    dense_down = nn.Linear(h, D, bias=False)

    def dense(x: torch.Tensor) -> torch.Tensor:
        pre = dense_up(x)
        a = F.silu(pre[:, :h]) * pre[:, h:] if gated else F.silu(pre)
        return dense_down(a)

    experts = Experts(1, D, h, activation="silu", gated=gated)
    with torch.no_grad():
        experts.w_in.copy_(dense_up.weight.unsqueeze(0))  # (1, S_in, D)
        experts.w_out.copy_(dense_down.weight.t().unsqueeze(0))  # (1, S, D)
    moe = MoE(router=TopKRouter(D, 1, 1, renormalize=False), experts=experts, kernel=kernel)

    x = torch.randn(2, 5, D)
    x_moe, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe = moe(x_moe).y
    y_dense = dense(x_dense.reshape(-1, D)).reshape(x.shape)
    torch.testing.assert_close(y_moe, y_dense)
    g = torch.randn_like(y_moe)
    (y_moe * g).sum().backward()
    (y_dense * g).sum().backward()
    torch.testing.assert_close(x_moe.grad, x_dense.grad)
    torch.testing.assert_close(experts.w_in.grad[0], dense_up.weight.grad)
    torch.testing.assert_close(experts.w_out.grad[0], dense_down.weight.grad.t())


# --- kernels: the grouped eager path and the default kernel equal the reference ----------------


def _idx_with_empty_slots(t: int, e: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # (T, K) distinct per row
    idx[torch.rand(t, k, generator=g) < 0.2] = -1
    return idx


@pytest.mark.parametrize("gated", [False, True])
def test_grouped_and_default_kernels_equal_reference(gated: bool) -> None:
    torch.manual_seed(1)
    experts = Experts(5, D, 8, activation="gelu", gated=gated, bias=True, init_std=0.3)
    with torch.no_grad():
        experts.b_in.normal_()
    x = torch.randn(13, D)
    idx = _idx_with_empty_slots(13, 5, 3)
    scale = torch.rand(13, 3)
    reference = get_kernel("reference")
    results = {}
    for name, kernel in (("reference", reference), ("grouped", grouped_expert_ffn), ("default", resolve_kernel())):
        experts.zero_grad()
        xg = x.clone().requires_grad_()
        y = kernel(xg, experts.weights(), idx, scale)
        y.pow(2).sum().backward()
        results[name] = (y, xg.grad, experts.w_in.grad.clone(), experts.w_out.grad.clone())
    for name in ("grouped", "default"):
        for got, want in zip(results[name], results["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # per-slot outputs (geometric MoE) through any summing kernel equal the grouped ones
    per_slot = grouped_expert_outputs(x, experts.weights(), idx)  # (T, K, D)
    for kernel in (reference, resolve_kernel()):
        torch.testing.assert_close(per_slot_expert_outputs(x, experts.weights(), idx, kernel), per_slot,
                                   rtol=1e-4, atol=1e-5)
    assert torch.all(per_slot[idx < 0] == 0)


def test_default_kernel_is_the_fast_one_when_registered() -> None:
    expected = KERNELS["auto"] if "auto" in KERNELS else grouped_expert_ffn
    assert resolve_kernel() is expected


# --- routers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_top_k_indices_unique_per_token(top_k: int) -> None:
    torch.manual_seed(2)
    x = torch.randn(64, D)
    for router in _routers(6, top_k):
        for mode in (router.train, router.eval):
            mode()
            out = router(x)
            assert out.idx.shape == (64, top_k) and out.idx.dtype == torch.int64
            assert ((out.idx >= 0) & (out.idx < 6)).all()
            assert (out.idx.sort(dim=1).values.diff(dim=1) > 0).all(), type(router).__name__
        # ties everywhere: a zero gate scores every expert the same
        with torch.no_grad():
            router.gate.weight.zero_()
        router.eval()
        assert (router(x).idx.sort(dim=1).values.diff(dim=1) > 0).all()


def test_softmax_router_weights() -> None:
    torch.manual_seed(3)
    x = torch.randn(10, D)
    renorm, plain = mixtral_router(D, 5), TopKRouter(D, 5, 2, renormalize=False)
    plain.load_state_dict(renorm.state_dict())
    a, b = renorm(x), plain(x)
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(10))
    torch.testing.assert_close(b.weights, a.probs.gather(1, a.idx))  # Switch/plain: the probabilities
    torch.testing.assert_close(a.weights.sum(-1), torch.ones(10))  # Mixtral: renormalised
    torch.testing.assert_close(a.weights, torch.softmax(a.logits.gather(1, a.idx), dim=-1))  # = softmax of top-k
    s = switch_router(D, 5)(x)
    assert s.idx.shape == (10, 1) and torch.equal(s.idx[:, 0], s.probs.argmax(-1))


def test_noisy_router_noise_only_in_training() -> None:
    torch.manual_seed(4)
    router = NoisyTopKRouter(D, 4, 2)
    nn.init.normal_(router.gate.weight)
    x = torch.randn(8, D)
    router.eval()
    out = router(x)
    torch.testing.assert_close(out.logits, out.clean_logits)
    router.train()
    out = router(x)
    assert not torch.allclose(out.logits, out.clean_logits)
    torch.testing.assert_close(out.noise_std, torch.full((8, 4), math.log(2.0)))  # softplus(0) at init


@pytest.mark.parametrize("normalize", ["l2", "rms"])
def test_geometric_moe_is_sum_of_predicted_norms_times_directions(normalize: str) -> None:
    torch.manual_seed(5)
    experts = Experts(4, D, 8, normalize=normalize, init_std=0.3)
    router = GeometricRouter(D, 4, 2, activation="sigmoid")
    moe = MoE(router=router, experts=experts)
    x = torch.randn(7, D)
    out = moe(x)
    rho = torch.sigmoid(router.gate(x))  # (T, E)
    w = experts.weights()
    v = torch.stack([w.expert_activation(x, e) @ w.w_out[e] for e in range(4)], dim=1)  # (T, E, D)
    e_dir = v / v.norm(dim=-1, keepdim=True) * (math.sqrt(D) if normalize == "rms" else 1.0)
    top = rho.topk(2, dim=-1).indices
    want = (rho.gather(1, top).unsqueeze(-1) * e_dir.gather(1, top.unsqueeze(-1).expand(-1, -1, D))).sum(1)
    torch.testing.assert_close(out.y, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.router.weights, rho.gather(1, top))
    norms = normalize_expert_output(v, normalize).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1.0 if normalize == "l2" else math.sqrt(D)), rtol=1e-4,
                               atol=1e-4)


# --- losses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (8, 3)])
def test_uniform_routing_gives_the_minimum_of_each_balance_loss(num_experts: int, top_k: int) -> None:
    t = num_experts * 5
    probs = torch.full((t, num_experts), 1.0 / num_experts)
    idx = (torch.arange(t).unsqueeze(1) + torch.arange(top_k)) % num_experts  # every expert equally often
    weights = torch.full((t, top_k), 1.0 / top_k)
    torch.testing.assert_close(switch_balance_loss(probs, idx), torch.tensor(1.0))
    torch.testing.assert_close(importance_loss(idx, weights, num_experts), torch.tensor(0.0))
    torch.testing.assert_close(load_loss(expert_counts(idx, num_experts)), torch.tensor(0.0))
    logits = torch.zeros(t, num_experts)
    torch.testing.assert_close(load_loss(smooth_load(logits, logits, torch.ones(t, num_experts), top_k)),
                               torch.tensor(0.0))
    # and collapse onto one expert gives the maximum of the Switch loss, N
    collapsed = torch.zeros(t, num_experts)
    collapsed[:, 0] = 1.0
    torch.testing.assert_close(switch_balance_loss(collapsed, torch.zeros(t, 1, dtype=torch.long)),
                               torch.tensor(float(num_experts)))


def test_losses_match_hand_computed_values() -> None:
    # Switch: f = (1/2, 1/2, 0), P = (0.4, 0.4, 0.2): 3 · (0.2 + 0.2) = 1.2
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    torch.testing.assert_close(switch_balance_loss(probs, torch.tensor([[0], [1]])), torch.tensor(1.2))
    # an empty slot (-1) is not an assignment: f = (1, 0, 0), P as above: 3 · 0.4
    torch.testing.assert_close(switch_balance_loss(probs, torch.tensor([[0], [-1]])), torch.tensor(1.2))
    # CV²([1, 2, 3]) = (2/3) / 2² = 1/6
    torch.testing.assert_close(cv_squared(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(1 / 6))
    # importance = (0.6 + 0.1, 0.4, 0.9) = (0.7, 0.4, 0.9): mean 2/3, var 0.0380/0.9 ...
    idx, w = torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    imp = [0.7, 0.4, 0.9]
    mean = sum(imp) / 3
    var = sum((v - mean) ** 2 for v in imp) / 3
    torch.testing.assert_close(importance_loss(idx, w, 3), torch.tensor(var / mean**2))
    # load of seed 001: counts (2, 1, 1) -> mean 4/3, var 2/9, CV² = (2/9) / (16/9) = 1/8
    torch.testing.assert_close(load_loss(expert_counts(idx, 3)), torch.tensor(1 / 8))
    # z-loss: logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4: mean(ln²2, 4 ln²2) = 2.5 ln²2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2.0) ** 2))
    # smooth load (Shazeer et al.), k = 1: expert 0 is in, threshold 0: Φ(1); experts 1, 2 out, threshold 1: Φ(-1)
    s = torch.tensor([[1.0, 0.0, 0.0]])
    phi = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    torch.testing.assert_close(smooth_load(s, s, torch.ones(1, 3), 1), torch.tensor([phi, 1 - phi, 1 - phi]))


def test_balance_losses_have_gradients_for_the_router() -> None:
    torch.manual_seed(6)
    router = NoisyTopKRouter(D, 4, 2)
    nn.init.normal_(router.gate.weight, std=0.1)
    out = router(torch.randn(32, D))
    loss = (switch_balance_loss(out.probs, out.idx) + importance_loss(out.idx, out.weights, 4)
            + load_loss(smooth_load(out.clean_logits, out.logits, out.noise_std, 2)) + router_z_loss(out.logits))
    loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0 and router.noise.weight.grad.abs().sum() > 0


# --- capacity ---------------------------------------------------------------------------------


def test_expert_capacity_formula() -> None:
    assert expert_capacity(4, 3, 2, 1.25) == 4  # ⌈1.25 · 4 · 2 / 3⌉ = ⌈3.33⌉
    assert expert_capacity(8, 4, 1, 1.0) == 2
    assert expert_capacity(10, 1, 1, 1.1) == 11  # not 12 from 11.000000000000002
    assert expert_capacity(16, 4, 2, 0.5) == 4


def test_capacity_drops_counted_exactly() -> None:
    # Priority: all first choices in token order, then all second choices. Capacity 2:
    # slot 0: t0→0 (1st), t1→0 (2nd), t2→0 (3rd: over), t3→1 (1st)
    # slot 1: t0→1 (2nd), t1→2 (1st), t2→1 (3rd: over), t3→0 (4th: over)
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    res = apply_capacity(idx, 3, capacity=2, overflow="drop")
    expected_over = torch.tensor([[False, False], [False, False], [True, True], [False, True]])
    assert torch.equal(res.overflow, expected_over)
    assert torch.equal(res.idx, torch.tensor([[0, 1], [0, 2], [-1, -1], [1, -1]]))
    assert res.num_dropped == 3 and res.num_overflow == 3 and res.num_tokens_dropped == 1
    assert res.routed_per_expert.tolist() == [4, 3, 1] and res.overflow_per_expert.tolist() == [2, 1, 0]
    kept = apply_capacity(idx, 3, capacity=2, overflow="pass")
    assert torch.equal(kept.idx, idx) and kept.num_dropped == 0 and kept.num_overflow == 3
    assert kept.num_tokens_dropped == 0


def test_capacity_matches_brute_force_count() -> None:
    for seed in range(5):
        idx = _idx_with_empty_slots(50, 6, 2, seed)
        cap = expert_capacity(50, 6, 2, 0.8)
        res = apply_capacity(idx, 6, cap)
        seen = [0] * 6
        want = torch.zeros_like(res.overflow)
        for j in range(idx.shape[1]):
            for t in range(idx.shape[0]):
                e = int(idx[t, j])
                if e >= 0:
                    want[t, j] = seen[e] >= cap
                    seen[e] += 1
        assert torch.equal(res.overflow, want)
        assert res.num_dropped == sum(max(0, n - cap) for n in seen)
        assert (expert_counts(res.idx, 6) <= cap).all()


def test_moe_with_capacity_drops_tokens_and_counts_them() -> None:
    torch.manual_seed(7)
    experts = Experts(4, D, 8, init_std=0.3)
    router = TopKRouter(D, 4, 1)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0], router.gate.weight[1, 0] = 10.0, -10.0  # x_0 > 0: expert 0, else expert 1
    x = torch.randn(40, D)
    x[:, 0] = torch.where(torch.arange(40) < 25, 1.0, -1.0)  # 25 tokens to expert 0, 15 to expert 1
    moe = MoE(router=router, experts=experts, capacity_factor=1.0, eval_capacity_factor=None)
    out = moe(x)  # training mode: capacity ⌈40 / 4⌉ = 10
    assert out.capacity.capacity == 10
    assert out.capacity.num_dropped == (25 - 10) + (15 - 10)
    assert out.capacity.num_tokens_dropped == 20
    assert out.capacity.overflow_per_expert.tolist() == [15, 5, 0, 0]
    dropped_tokens = out.capacity.dropped.any(dim=1)
    assert torch.all(out.y[dropped_tokens] == 0)
    want = get_kernel("reference")(x, experts.weights(), out.capacity.idx, out.router.weights)
    torch.testing.assert_close(out.y, want)
    moe.eval()
    assert moe(x).capacity is None  # no capacity at evaluation


def test_shared_expert_is_added() -> None:
    torch.manual_seed(8)
    shared = nn.Linear(D, D)
    experts = Experts(3, D, 4)
    router = TopKRouter(D, 3, 2)
    x = torch.randn(6, D)
    with_shared = MoE(router=router, experts=experts, shared_expert=shared)(x).y
    without = MoE(router=router, experts=experts)(x).y
    torch.testing.assert_close(with_shared, without + shared(x))


# --- bad arguments ----------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(InvalidArgumentError, match=r"top_k=5 .*num_experts=4.*1\.\.4"):
        TopKRouter(D, 4, 5)
    with pytest.raises(InvalidArgumentError, match=r"top_k=3 .*num_experts=2"):
        GeometricRouter(D, 2, 3)
    with pytest.raises(InvalidArgumentError, match=r"top_k=0"):
        NoisyTopKRouter(D, 2, 0)
    with pytest.raises(InvalidArgumentError, match=r"top_k=9"):
        expert_capacity(16, 8, 9, 1.0)
    for factor in (0, -1.0, float("nan")):
        with pytest.raises(InvalidArgumentError, match=r"capacity_factor=.* must be > 0"):
            expert_capacity(16, 4, 1, factor)
        with pytest.raises(InvalidArgumentError, match=r"capacity_factor=.* must be > 0"):
            MoE(router=TopKRouter(D, 4, 1), experts=Experts(4, D, 8), capacity_factor=factor)
    with pytest.raises(InvalidArgumentError, match=r"'layer'.*l2, rms"):
        Experts(4, D, 8, normalize="layer")
    with pytest.raises(InvalidArgumentError, match=r"'tanh'.*softplus, sigmoid, relu"):
        GeometricRouter(D, 4, 2, activation="tanh")
    with pytest.raises(InvalidArgumentError, match=r"'mish'.*relu, gelu"):
        Experts(4, D, 8, activation="mish")
    with pytest.raises(InvalidArgumentError, match=r"'bounce'.*drop, pass"):
        apply_capacity(torch.zeros(2, 1, dtype=torch.long), 2, 1, overflow="bounce")
    with pytest.raises(InvalidArgumentError, match=r"'warp'.*grouped.*reference"):
        MoE(router=TopKRouter(D, 4, 1), experts=Experts(4, D, 8), kernel="warp")
    with pytest.raises(InvalidArgumentError, match=r"scores 3 experts .* holds 4"):
        MoE(router=TopKRouter(D, 3, 1), experts=Experts(4, D, 8))


# --- the from-scratch experiment (benchmarks/train_from_scratch.py), tiny -------------------------


def test_demo_trains_every_scheme(tmp_path) -> None:
    from benchmarks.train_from_scratch import DEFAULT_SCHEMES, DemoConfig, plot_results, run_demo

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
    cfg = DemoConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16, d_ff=128, batch_size=4, steps=4, eval_every=2,
                     eval_sequences=4, warmup=1)
    schemes = [*DEFAULT_SCHEMES, "noisy_top2"]  # every router kind: dense, softmax, geometric, noisy
    summary, results = run_demo(text[:8000], text[8000:], cfg, schemes)
    assert [r.scheme for r in results] == schemes
    flops = {r.scheme: r.ffn_flops_per_token for r in results}
    for r in results:
        assert math.isfinite(r.final_val_loss) and len(r.val_curve) == 3
        assert abs(flops[r.scheme] - flops["dense"]) / flops["dense"] < 0.1  # equal active FFN FLOPs (+ router)
        for f in r.load_per_layer:
            assert abs(sum(f) - 1) < 1e-5
    plot_results(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert summary["results"][0]["scheme"] == "dense"
