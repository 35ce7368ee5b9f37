"""Routers of converted models: small models that predict, from the FFN input x, a score per
expert whose top-k should match the oracle's (the experts with the largest residual norm).

Targets (computed exactly on calibration samples, `expert_targets`):
* `residual` (default): ‖(a_e − r_e) W_down[:, e]ᵀ‖, the output-space error of dropping e;
* `sq`: Σ_{j∈e} (a_j − r_j)², the target of the G-MoEfication code;
* `mass`: Σ_{j∈e} |a_j|, MoEfication's activation mass.

Loss (`fit_router`): a listwise term that rewards getting the top-k set right (cross-entropy
of the predicted softmax against the oracle top-k indicator) plus regression on standardised
log scores, so the ranking is also sensible for other k.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError
from moefy.kernels import ExpertWeights
from moefy.layers.routers import RouterOutput
from moefy.settings import ROUTER_TARGETS as TARGETS

log = logging.getLogger(__name__)



class MLPRouter(nn.Module):
    """x (T, D) -> scores (T, E). hidden=0: a linear router."""

    def __init__(self, d_model: int, num_experts: int, hidden: int = 256) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.hidden = d_model, num_experts, hidden
        self.register_buffer("x_mean", torch.zeros(d_model))
        self.register_buffer("x_scale", torch.ones(d_model))
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, num_experts))
        else:
            self.net = nn.Linear(d_model, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.x_mean) * self.x_scale)

    def flops_per_token(self) -> int:
        return router_flops_per_token(self.d_model, self.num_experts, self.hidden)


def router_flops_per_token(d_model: int, num_experts: int, hidden: int = 0) -> int:
    """FLOPs of one `MLPRouter` call per token. Multiply-adds count 2; input standardisation counts
    2 per feature; the hidden layer's bias and SiLU count 4 per unit."""
    d, e, h = d_model, num_experts, hidden
    core = 2 * (d * h + h * e) + 4 * h if h > 0 else 2 * d * e
    return 2 * d + core


@torch.no_grad()
def expert_targets(
    experts: ExpertWeights, representatives: Tensor, x: Tensor, target: str = "residual", chunk: int = 2048
) -> Tensor:
    """Per-expert target scores for samples x (N, D): (N, E)."""
    if target not in TARGETS:
        raise InvalidArgumentError(f"unknown router target {target!r}; valid: {', '.join(TARGETS)}")
    gram = torch.einsum("esd,erd->esr", experts.w_out, experts.w_out)  # (E, S, S)
    out = []
    for i in range(0, x.shape[0], chunk):
        xc = x[i : i + chunk]
        a = experts.all_activations(xc)  # (T, E, S)
        u = a - representatives
        if target == "residual":
            out.append(torch.einsum("tes,esr,ter->te", u, gram, u).clamp_min(0).sqrt())
        elif target == "sq":
            out.append((u * u).sum(-1))
        else:
            out.append(a.abs().sum(-1))
    return torch.cat(out)


@dataclass
class RouterFit:
    router: MLPRouter
    recall: float  # held-out recall of the oracle top-k set
    loss: float


def fit_router(
    x: Tensor,
    targets: Tensor,
    top_k: int | Sequence[int],
    *,
    hidden: int = 256,
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    holdout: float = 0.1,
) -> RouterFit:
    """Train a router on samples x (N, D) with oracle targets (N, E) for a top-k, or for several
    (the listwise label is then the mean of the top-k indicators, so one router serves each k).
    The reported recall is at the first k."""
    n, d = x.shape
    e = targets.shape[1]
    ks = [top_k] if isinstance(top_k, int) else list(top_k)
    if not ks or not all(1 <= k <= e for k in ks):
        raise InvalidArgumentError(f"router top_k={top_k} must be in 1..{e}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(n, generator=g)
    n_val = max(1, int(holdout * n))
    val, train = order[:n_val], order[n_val:]
    if train.shape[0] < 2:
        raise InvalidArgumentError(f"too few samples to train a router: {n} (need at least {n_val + 2})")
    router = MLPRouter(d, e, hidden)
    router.x_mean.copy_(x[train].mean(0))
    router.x_scale.copy_(1.0 / x[train].std(0).clamp_min(1e-6))
    log_t = torch.log(targets + 1e-6)
    z = (log_t - log_t.mean(1, keepdim=True)) / log_t.std(1, keepdim=True).clamp_min(1e-6)  # (N, E)
    label = torch.zeros_like(targets)  # (N, E): mean over ks of (top-k indicator / k)
    for k in ks:
        top = torch.topk(targets, k, dim=1).indices
        label.scatter_add_(1, top, torch.full_like(top, 1.0 / (k * len(ks)), dtype=targets.dtype))
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(train.shape[0] / batch_size)
    # OneCycleLR divides by pct_start·steps − 1: 0 at exactly 10 steps (a ZeroDivisionError), so shift it there
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1 if steps != 10 else 0.2)
    loss_value = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            perm = train[torch.randperm(train.shape[0], generator=g)]
            for i in range(0, perm.shape[0], batch_size):
                b = perm[i : i + batch_size]
                pred = router(x[b])
                listwise = -(label[b] * torch.log_softmax(pred, dim=1)).sum(1).mean()
                regression = nn.functional.mse_loss(pred, z[b])
                loss = listwise + 0.5 * regression
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_value = float(loss.detach())
    router.eval()
    recall = topk_recall(router(x[val]).detach(), targets[val], ks[0])
    return RouterFit(router=router, recall=recall, loss=loss_value)


def topk_recall(scores: Tensor, targets: Tensor, k: int) -> float:
    """Fraction of the oracle's top-k experts that the scores' top-k also pick."""
    pred = torch.topk(scores, k, dim=1).indices
    true = torch.topk(targets, k, dim=1).indices
    hit = torch.zeros_like(targets, dtype=torch.bool).scatter_(1, true, True).gather(1, pred)
    return float(hit.float().mean())


def select_top(scores: Tensor, k: int, tau: float | None = None) -> Tensor:
    """The k best-scoring experts per token: (T, E) -> (T, k) int64, in no particular order for a
    fixed k (an unsorted top-k costs about half a sorted one; the kernels sum over the slots). With
    `tau` (dynamic k), best first, and only the shortest prefix whose positive score mass reaches τ
    of the total is kept (the first always); the other slots are -1."""
    if tau is None:
        return torch.topk(scores, k, dim=-1, sorted=False).indices
    top = torch.topk(scores, k, dim=-1)
    mass = top.values.clamp_min(0).cumsum(1) / scores.clamp_min(0).sum(1, keepdim=True).clamp_min(1e-12)
    before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)  # mass before each slot
    return torch.where(before < tau, top.indices, torch.full_like(top.indices, -1))


class ExpertRouter(nn.Module):
    """The router of a converted layer, in the `moefy.layers.Router` contract: tokens (T, D) ->
    `RouterOutput` over the R routed experts (shared experts are the MoE layer's business).

    `scorer` (an `MLPRouter`) predicts each routed expert's residual norm; the top `top_k` (or the
    dynamic-k prefix of mass τ) are selected. Weights are 1 at inference; in training mode with
    gradients on they are the straight-through gates g = 1 + p − sg(p), p = softmax(logits), whose
    value is 1 (the forward is unchanged) and whose gradient reaches the scorer (`moefy.finetune`)."""

    def __init__(self, scorer: MLPRouter, *, top_k: int, tau: float | None = None) -> None:
        super().__init__()
        self.scorer = scorer
        self.num_experts = scorer.num_experts  # R routed experts
        self.top_k = top_k
        self.tau = tau

    def forward(self, x: Tensor) -> RouterOutput:
        logits = self.scorer(x).to(x.dtype)  # (T, R)
        idx = select_top(logits.detach(), self.top_k, self.tau)  # (T, K)
        probs = torch.softmax(logits.float(), dim=-1)  # (T, R)
        if self.training and torch.is_grad_enabled():
            p = probs.gather(1, idx.clamp_min(0))
            weights = (1.0 + p - p.detach()).to(x.dtype)
        else:
            weights = torch.ones(idx.shape, dtype=x.dtype, device=x.device)
        return RouterOutput(idx=idx, weights=weights, logits=logits, probs=probs)

    def flops_per_token(self) -> int:
        return self.scorer.flops_per_token()
