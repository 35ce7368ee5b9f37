"""Fine-tune the routers of a converted model end to end on text, with a load-balance loss.

Dimension legend: T tokens, E experts, R = E − num_shared routed experts, K selected per token.

Top-k selection has no gradient, so each selected routed expert gets a straight-through gate (the
weights of `moefy.routers.ExpertRouter` in training mode; Bengio et al. 2013's estimator, as in the
gates of Switch/ST-MoE):

    y = M + Σ_{e∈S} g_e (v_e − m_e),     g_e = 1 + p_e − sg(p_e),     p = softmax(router logits)  (R,)

The forward value is the converted model's own (g = 1); ∂L/∂p_e = ⟨∂L/∂y, v_e − m_e⟩, so the
router learns how much computing expert e instead of its static vector m_e helps the language
model. Gating v_e − m_e rather than v_e matters: an unselected expert still contributes m_e.

    loss = CE(next token) + balance_weight · mean_layers N·Σ_i f_i P_i + z_weight · mean_layers z

with the Switch Transformer balance loss (Fedus et al. 2021, eq. 4) and the ST-MoE router z-loss
(Zoph et al. 2022, eq. 5) of `moefy.layers.losses`, over the routed experts; averaged over layers so
the weights do not depend on depth. Everything but the routers (and, optionally, the
representatives r, whose static vectors m_e = r_e W_out[e] are refreshed afterwards) is frozen.

Load balance is measured before and after, per layer, as max load / mean load and CV² of the
routed experts' token counts. The routing of every layer is read from the forward pass itself:
each MoE layer keeps its router's latest `RouterOutput` (`MoEFFN.last_routing`); no hooks, no flags.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from moefy.conversion import moe_layers
from moefy.distill import lr_factor
from moefy.errors import InvalidArgumentError
from moefy.layers.losses import cv_squared, expert_counts, router_z_loss, switch_balance_loss
from moefy.layers.routers import RouterOutput
from moefy.moe_ffn import MoEFFN
from moefy.moe_model import MoEModel
from moefy.text import TokenBatch

log = logging.getLogger(__name__)


@dataclass
class LayerLoad:
    """Expert-load balance of one MoE layer's routed experts over some tokens."""

    layer: int  # index among the model's routed MoE layers
    tokens: int
    max_over_mean: float  # max load / mean load: 1 balanced; at most R / (K − ns), one expert in every token's set
    cv_squared: float  # variance / mean² of the expert loads: 0 when perfectly balanced


@dataclass
class FinetuneReport:
    steps: int
    lr: float
    balance_weight: float
    z_weight: float
    train_representatives: bool
    batch_size: int  # sequences per step
    tokens_per_step: float  # mean scored tokens per step
    loss: list[float] = field(default_factory=list)  # total loss per step
    lm_loss: list[float] = field(default_factory=list)  # next-token cross-entropy per step
    balance_loss: list[float] = field(default_factory=list)  # mean over layers, minimum 1
    z_loss: list[float] = field(default_factory=list)  # mean over layers
    load_before: list[LayerLoad] = field(default_factory=list)
    load_after: list[LayerLoad] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """Settings, first/last losses and the mean per-layer imbalance before and after."""

        def mean(loads: list[LayerLoad], key: str) -> float | None:
            return sum(getattr(x, key) for x in loads) / len(loads) if loads else None

        return {
            "steps": self.steps, "lr": self.lr, "balance_weight": self.balance_weight, "z_weight": self.z_weight,
            "train_representatives": self.train_representatives, "batch_size": self.batch_size,
            "tokens_per_step": self.tokens_per_step, "seconds": round(self.seconds, 1),
            "lm_loss_first": self.lm_loss[0], "lm_loss_last": self.lm_loss[-1],
            "balance_loss_first": self.balance_loss[0], "balance_loss_last": self.balance_loss[-1],
            "max_over_mean_before": mean(self.load_before, "max_over_mean"),
            "max_over_mean_after": mean(self.load_after, "max_over_mean"),
            "cv_squared_before": mean(self.load_before, "cv_squared"),
            "cv_squared_after": mean(self.load_after, "cv_squared"),
        }

    def to_json(self) -> dict:
        return asdict(self)


# ---- pure functions ---------------------------------------------------------------------------
def load_imbalance(counts: Tensor) -> tuple[float, float]:
    """(max / mean, CV²) of per-expert loads (R,). A layer that routed nothing counts as balanced."""
    counts = counts.float()
    mean = float(counts.mean())
    if mean == 0.0:
        return 1.0, 0.0
    return float(counts.max()) / mean, float(cv_squared(counts))


def next_token_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean cross-entropy of predicting token t+1 from logits at t. logits: (B, L, V); ids, mask: (B, L)."""
    pred = logits[:, :-1].float()  # (B, L-1, V)
    target = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (B, L-1)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100)


def router_losses(routing: RouterOutput) -> tuple[Tensor, Tensor]:
    """(Switch balance loss, z-loss) of one routing step, over the routed experts."""
    return switch_balance_loss(routing.probs, routing.idx), router_z_loss(routing.logits.float())


# ---- layers ------------------------------------------------------------------------------------
def routed_layers(model: nn.Module) -> list[MoEFFN]:
    """The MoE layers whose experts a router picks (selection 'router', fewer than all experts)."""
    return [
        m for m in moe_layers(model)
        if m.selection == "router" and m.router is not None and m.top_k < m.num_experts
    ]


def last_routing(m: MoEFFN) -> RouterOutput:
    assert m.last_routing is not None, "the layer has not run its router yet"
    return m.last_routing


@torch.no_grad()
def measure_load(model: nn.Module, layers: Sequence[MoEFFN], batches: Sequence[TokenBatch]) -> list[LayerLoad]:
    """Per-layer load balance of the routed experts over `batches` (model run as it is, no gradients)."""
    counts = [torch.zeros(m.num_experts - m.num_shared) for m in layers]
    tokens = [0] * len(layers)
    device = next(model.parameters()).device
    for batch in batches:
        model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
        for i, m in enumerate(layers):
            idx = last_routing(m).idx  # (T, K − ns) routed-expert ids, -1 = empty slot
            counts[i] += expert_counts(idx, m.num_experts - m.num_shared).cpu()
            tokens[i] += idx.shape[0]
    loads = []
    for i, c in enumerate(counts):
        ratio, cv2 = load_imbalance(c)
        loads.append(LayerLoad(layer=i, tokens=tokens[i], max_over_mean=ratio, cv_squared=cv2))
    return loads


# ---- training ---------------------------------------------------------------------------------
def check_finetune_args(steps: int, lr: float, balance_weight: float, z_weight: float, batch_size: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps={steps!r} must be a positive integer")
    if not lr > 0 or not math.isfinite(lr):
        raise InvalidArgumentError(f"lr={lr!r} must be a finite number > 0")
    for name, value in (("balance_weight", balance_weight), ("z_weight", z_weight)):
        if not value >= 0 or not math.isfinite(value):
            raise InvalidArgumentError(f"{name}={value!r} must be a finite number >= 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r} must be a positive integer")


def _micro_batches(batches: Sequence[TokenBatch], batch_size: int, seed: int) -> Iterator[TokenBatch]:
    """Chunks of `batch_size` sequences, endlessly, reshuffled every pass."""
    chunks = [c for b in batches for c in b.chunks(batch_size)]
    g = torch.Generator().manual_seed(seed)
    while True:
        for j in torch.randperm(len(chunks), generator=g).tolist():
            yield chunks[j]


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    return lambda step: lr_factor(step, steps)


@contextmanager
def _router_training(model: nn.Module, layers: Sequence[MoEFFN], train_representatives: bool) -> Iterator[list[nn.Parameter]]:
    """Freeze everything but the routers (and r), MoE layers in training mode with the straight-through
    gate, the rest in eval mode (no dropout); yields the trainable parameters. Restores it all after."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    params: list[nn.Parameter] = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in layers:
            m.train()  # the router's straight-through gates are on in training mode
            for p in m.router.parameters():  # type: ignore[union-attr]
                p.requires_grad_(True)
                params.append(p)
            if train_representatives:
                m.representatives.requires_grad_(True)  # static vectors now computed live
                params.append(m.representatives)
        yield params
    finally:
        for p in params:
            p.grad = None
        for m in layers:
            m.representatives.requires_grad_(False)
            m.refresh_static()
            m.reset_counters()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _step_losses(
    model: nn.Module, layers: Sequence[MoEFFN], batch: TokenBatch
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass: (next-token loss, balance loss and z-loss averaged over the layers)."""
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    for m in layers:
        m.last_routing = None
    lm = next_token_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    pairs = [router_losses(last_routing(m)) for m in layers]
    balance = torch.stack([b for b, _ in pairs]).mean()
    z = torch.stack([z for _, z in pairs]).mean()
    return lm, balance, z


def finetune_routers(
    converted: MoEModel,
    batches: Sequence[TokenBatch],
    *,
    steps: int = 100,
    lr: float = 3e-5,
    balance_weight: float = 1e-2,
    z_weight: float = 0.0,
    train_representatives: bool = False,
    batch_size: int = 8,  # sequences per step
    load_batches: Sequence[TokenBatch] | None = None,  # where to measure load balance (default: batches)
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> FinetuneReport:
    """Fine-tune the routers of a converted causal LM in place on `batches` (see the module docstring)."""
    check_finetune_args(steps, lr, balance_weight, z_weight, batch_size)
    if not batches or sum(b.num_tokens for b in batches) == 0:
        raise InvalidArgumentError("no fine-tuning text: `batches` is empty")
    if not converted.loaded.is_causal:
        raise InvalidArgumentError(
            f"router fine-tuning needs a causal LM (next-token loss); {converted.loaded.name!r} is an encoder"
        )
    model = converted.model
    layers = routed_layers(model)
    if not layers:
        raise InvalidArgumentError(
            "the model has no router-selected MoE layers to fine-tune (selection must be 'router' with top_k < num_experts)"
        )
    report = FinetuneReport(
        steps=steps, lr=lr, balance_weight=balance_weight, z_weight=z_weight,
        train_representatives=train_representatives, batch_size=batch_size, tokens_per_step=0.0,
    )
    load_batches = batches if load_batches is None else load_batches
    report.load_before = measure_load(model, layers, load_batches)
    t0 = time.perf_counter()
    data = _micro_batches(batches, batch_size, seed)
    tokens = 0
    with _router_training(model, layers, train_representatives) as params, torch.enable_grad():
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
        bar = tqdm(range(steps), desc="fine-tuning routers", disable=not progress)
        for _ in bar:
            batch = next(data)
            lm, balance, z = _step_losses(model, layers, batch)
            loss = lm + balance_weight * balance + z_weight * z
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            tokens += int(batch.attention_mask[:, 1:].sum())
            report.loss.append(loss.item())
            report.lm_loss.append(lm.item())
            report.balance_loss.append(balance.item())
            report.z_loss.append(z.item())
            bar.set_postfix_str(f"lm={report.lm_loss[-1]:.3f} balance={report.balance_loss[-1]:.3f}")
            log.debug("step %d: lm %.4f balance %.4f z %.2f", len(report.loss), lm.item(), balance.item(), z.item())
    report.seconds = time.perf_counter() - t0
    report.tokens_per_step = tokens / steps
    report.load_after = measure_load(model, layers, load_batches)
    for m in layers:
        m.reset_counters()  # the measurements are not inference
    summary = report.summary()
    log.info(
        "fine-tuned %d routers for %d steps in %.0fs: lm loss %.3f -> %.3f, balance %.3f -> %.3f, max/mean load %.2f -> %.2f",
        len(layers), steps, report.seconds, summary["lm_loss_first"], summary["lm_loss_last"],
        summary["balance_loss_first"], summary["balance_loss_last"],
        summary["max_over_mean_before"], summary["max_over_mean_after"],
    )
    return report


__all__ = [
    "FinetuneReport", "LayerLoad", "finetune_routers", "load_imbalance", "measure_load", "next_token_loss",
    "router_losses", "routed_layers",
]
