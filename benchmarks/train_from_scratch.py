"""Train a tiny byte-level causal LM from scratch: dense FFN vs Switch top-1 vs top-2 vs geometric MoE
(seed 002) at equal active FFN FLOPs; writes results.json and val_loss.png to --out.

    python benchmarks/train_from_scratch.py                       # bundled English text, all schemes
    python benchmarks/train_from_scratch.py --text FILE --steps 200 --schemes dense top2

Training text: the bundled `english_calibration` split (held-out: `english_evaluation`), or --text FILE
(last 10% held out).

Schemes compared at equal *active* FFN FLOPs per token (every token passes through d_ff expert neurons):

    dense           one FFN of width d_ff
    switch_top1     Switch Transformer: 8 experts of width d_ff, top-1, weight = p
    top2            Mixtral-style: 16 experts of width d_ff/2, top-2, renormalised softmax weights
    geometric_top2  seed 002: 16 L2-normalised experts of width d_ff/2, router predicts norms ρ (softplus),
                    output Σ_top-2 ρ_i e_i  (variants: RMS-normalised experts, sigmoid or ReLU for ρ)

All MoE schemes hold the same total expert width (8·d_ff). They train with the Switch balance loss
(coefficient 1e-2), the router z-loss (1e-3) and capacity factor 1.25 (overflow dropped); evaluation
runs without a capacity limit. Same seed, same data order, same optimiser for every scheme.

Model (nanoGPT-like): byte embeddings (vocabulary 256) + learned positions, pre-LayerNorm blocks of
causal self-attention and the FFN, final LayerNorm, tied output head.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError, TextError
from moefy.layers import (
    Experts,
    GeometricRouter,
    MoE,
    MoEOutput,
    NoisyTopKRouter,
    TopKRouter,
    expert_counts,
    router_z_loss,
    switch_balance_loss,
)
from moefy.text import bundled_text, read_text_file

log = logging.getLogger(__name__)

VOCAB = 256  # bytes


@dataclass(frozen=True)
class Scheme:
    name: str
    router: str  # "dense" | "softmax" | "noisy" | "geometric"
    num_experts: int = 1
    top_k: int = 1
    renormalize: bool = True  # softmax routers: renormalise the kept probabilities (Mixtral) or not (Switch)
    expert_norm: str | None = None  # geometric: "rms" | "l2"
    norm_activation: str = "softplus"  # geometric: activation of the predicted norm ρ


DEFAULT_SCHEMES = ("dense", "switch_top1", "top2", "geometric_top2")
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("dense", "dense"),
        Scheme("switch_top1", "softmax", num_experts=8, top_k=1, renormalize=False),
        Scheme("top2", "softmax", num_experts=16, top_k=2),
        Scheme("geometric_top2", "geometric", num_experts=16, top_k=2, expert_norm="l2"),
        # variants, not run by default
        Scheme("geometric_rms_top2", "geometric", num_experts=16, top_k=2, expert_norm="rms"),
        Scheme("geometric_sigmoid_top2", "geometric", num_experts=16, top_k=2, expert_norm="l2",
               norm_activation="sigmoid"),
        Scheme("geometric_relu_top2", "geometric", num_experts=16, top_k=2, expert_norm="l2",
               norm_activation="relu"),
        Scheme("noisy_top2", "noisy", num_experts=16, top_k=2),
    )
}


@dataclass
class DemoConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 128
    d_ff: int = 512  # dense FFN width = active expert neurons per token in every scheme
    batch_size: int = 8  # sequences per step (1024 tokens: a few minutes for 4 schemes on 2 cores)
    steps: int = 300
    lr: float = 3e-3  # AdamW peak, linear warmup then cosine to lr/10
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_sequences: int = 64  # fixed held-out windows of seq_len bytes
    balance_coef: float = 1e-2  # Switch Transformer's α
    z_coef: float = 1e-3  # ST-MoE's z-loss coefficient
    capacity_factor: float | None = 1.25  # training only; evaluation has no capacity limit
    init_std: float = 0.02
    seed: int = 0


@dataclass
class SchemeResult:
    scheme: str
    params_total: int
    params_ffn: int
    ffn_flops_per_token: int  # active FFN FLOPs per token per layer (router included), multiply-add = 2
    val_curve: list[tuple[int, float]]  # (step, validation loss in nats/byte)
    final_val_loss: float
    final_val_bits_per_byte: float
    train_seconds: float  # wall clock, evaluations included
    train_cpu_seconds: float  # CPU time of this process (all threads): robust to a busy machine
    load_per_layer: list[list[float]] = field(default_factory=list)  # (L, E) fraction of assignments, on val
    max_over_mean_load: list[float] = field(default_factory=list)  # per layer; 1.0 = perfectly balanced
    load_cv: list[float] = field(default_factory=list)  # per layer, coefficient of variation of the load
    train_drop_fraction: float = 0.0  # assignments dropped by capacity over the last quarter of training


def encode_bytes(text: str) -> Tensor:
    """UTF-8 bytes as int64 token ids (vocabulary 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, init_std: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        for lin in (self.up, self.down):
            nn.init.normal_(lin.weight, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))

    def flops_per_token(self) -> int:
        return 4 * self.up.in_features * self.up.out_features


def build_ffn(scheme: Scheme, cfg: DemoConfig) -> nn.Module:
    if scheme.router == "dense":
        return DenseFFN(cfg.d_model, cfg.d_ff, cfg.init_std)
    if cfg.d_ff % scheme.top_k:
        raise InvalidArgumentError(f"d_ff={cfg.d_ff} must be divisible by top_k={scheme.top_k} for equal active FLOPs")
    experts = Experts(
        scheme.num_experts, cfg.d_model, cfg.d_ff // scheme.top_k, normalize=scheme.expert_norm, init_std=cfg.init_std
    )
    if scheme.router == "softmax":
        router: TopKRouter | NoisyTopKRouter | GeometricRouter = TopKRouter(cfg.d_model, scheme.num_experts, scheme.top_k, renormalize=scheme.renormalize)
    elif scheme.router == "noisy":
        router = NoisyTopKRouter(cfg.d_model, scheme.num_experts, scheme.top_k)
    elif scheme.router == "geometric":
        router = GeometricRouter(cfg.d_model, scheme.num_experts, scheme.top_k, activation=scheme.norm_activation)
    else:
        raise InvalidArgumentError(f"unknown router kind {scheme.router!r}; valid: dense, softmax, noisy, geometric")
    return MoE(router=router, experts=experts, capacity_factor=cfg.capacity_factor)


class Block(nn.Module):
    def __init__(self, cfg: DemoConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ffn = ffn

    def forward(self, x: Tensor) -> tuple[Tensor, MoEOutput | None]:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)  # (B, T, C) each
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, C/H)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(att)
        out = self.ffn(self.ln2(x))
        if isinstance(out, MoEOutput):
            return x + out.y, out
        return x + out, None


class TinyLM(nn.Module):
    def __init__(self, cfg: DemoConfig, scheme: Scheme) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, build_ffn(scheme, cfg)) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=cfg.init_std)
        for blk in self.blocks:
            for lin in (blk.qkv, blk.proj):
                nn.init.normal_(lin.weight, std=cfg.init_std)  # type: ignore[arg-type]

    def forward(self, ids: Tensor) -> tuple[Tensor, list[MoEOutput]]:
        """ids (B, T) -> logits (B, T, 256) and each MoE layer's output record."""
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))  # (B, T, C)
        moe_outs = []
        for blk in self.blocks:
            x, out = blk(x)
            if out is not None:
                moe_outs.append(out)
        return self.ln_f(x) @ self.tok.weight.t(), moe_outs


def aux_losses(moe_outs: list[MoEOutput], cfg: DemoConfig) -> Tensor:
    """Mean over MoE layers of balance_coef · N Σ f_i P_i + z_coef · z-loss (0 for a dense model)."""
    if not moe_outs:
        return torch.zeros(())
    total = sum(
        cfg.balance_coef * switch_balance_loss(o.router.probs, o.router.idx) + cfg.z_coef * router_z_loss(o.router.logits)
        for o in moe_outs
    )
    return torch.as_tensor(total) / len(moe_outs)


def _windows(data: Tensor, seq_len: int, starts: Tensor) -> tuple[Tensor, Tensor]:
    offsets = starts.unsqueeze(1) + torch.arange(seq_len + 1)  # (B, L+1)
    chunk = data[offsets]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: TinyLM, val_x: Tensor, val_y: Tensor, batch_size: int) -> tuple[float, list[Tensor]]:
    """Mean validation loss (nats/byte) and, per MoE layer, the routed assignment counts (E,)."""
    model.eval()
    total, n = 0.0, 0
    counts: list[Tensor] = []
    for i in range(0, val_x.shape[0], batch_size):
        logits, outs = model(val_x[i : i + batch_size])
        y = val_y[i : i + batch_size]
        total += F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum").item()
        n += y.numel()
        batch_counts = [expert_counts(o.router.idx, o.router.num_experts) for o in outs]
        counts = batch_counts if not counts else [a + b for a, b in zip(counts, batch_counts, strict=True)]
    model.train()
    return total / n, counts


def _lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_scheme(scheme: Scheme, train: Tensor, val: Tensor, cfg: DemoConfig) -> SchemeResult:
    """Train one scheme from scratch; `train`, `val` are byte-token streams (N,)."""
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg, scheme)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    n_val = min(cfg.eval_sequences, (val.numel() - 1) // cfg.seq_len)
    val_x, val_y = _windows(val, cfg.seq_len, torch.arange(n_val) * cfg.seq_len)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # same batches for every scheme
    curve: list[tuple[int, float]] = []
    dropped = routed = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            val_loss, counts = evaluate(model, val_x, val_y, cfg.batch_size)
            curve.append((step, val_loss))
            load = " ".join(f"{float(c.max() / c.mean()):.2f}" for c in counts)
            log.info("%s step %d/%d: val loss %.4f, max/mean expert load per layer [%s]",
                     scheme.name, step, cfg.steps, val_loss, load)
        starts = torch.randint(0, train.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=data_gen)
        x, y = _windows(train, cfg.seq_len, starts)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        logits, outs = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)) + aux_losses(outs, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step >= cfg.steps * 3 // 4:
            for o in outs:
                if o.capacity is not None:
                    dropped += o.capacity.num_dropped
                    routed += int(o.capacity.routed_per_expert.sum())
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    final, counts = evaluate(model, val_x, val_y, cfg.batch_size)
    curve.append((cfg.steps, final))
    log.info("%s done in %.1f s: val loss %.4f", scheme.name, seconds, final)
    ffn = model.blocks[0].ffn
    loads = [(c / c.sum()).tolist() for c in counts]
    return SchemeResult(
        scheme=scheme.name,
        params_total=sum(p.numel() for p in model.parameters()),
        params_ffn=sum(p.numel() for b in model.blocks for p in b.ffn.parameters()),  # type: ignore[misc]
        ffn_flops_per_token=ffn.flops_per_token(),
        val_curve=curve,
        final_val_loss=final,
        final_val_bits_per_byte=final / math.log(2),
        train_seconds=seconds,
        train_cpu_seconds=cpu_seconds,
        load_per_layer=loads,
        max_over_mean_load=[max(f) * len(f) for f in loads],
        load_cv=[float(torch.tensor(f).std(correction=0) / torch.tensor(f).mean()) for f in loads],
        train_drop_fraction=dropped / routed if routed else 0.0,
    )


def run_demo(
    train_text: str, val_text: str, cfg: DemoConfig, schemes: list[str] | None = None
) -> tuple[dict, list[SchemeResult]]:
    """Train every scheme in `schemes` (default: DEFAULT_SCHEMES); returns (json-able summary, results)."""
    names = list(DEFAULT_SCHEMES) if schemes is None else schemes
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise InvalidArgumentError(f"unknown scheme(s) {unknown}; valid: {', '.join(SCHEMES)}")
    train, val = encode_bytes(train_text), encode_bytes(val_text)
    for name, data in (("training", train), ("validation", val)):
        if data.numel() < 2 * (cfg.seq_len + 1):
            raise TextError(f"{name} text has {data.numel()} bytes; at least {2 * (cfg.seq_len + 1)} are needed")
    results = [train_scheme(SCHEMES[n], train, val, cfg) for n in names]
    summary = {
        "config": asdict(cfg),
        "schemes": {n: asdict(SCHEMES[n]) for n in names},
        "train_bytes": train.numel(),
        "val_bytes": val.numel(),
        "results": [asdict(r) for r in results],
    }
    return summary, results


def plot_results(results: list[SchemeResult], path: str | Path) -> None:
    """Validation-loss curves (left) and per-layer expert load, sorted, relative to uniform (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        steps, losses = zip(*r.val_curve, strict=True)
        ax_loss.plot(steps, losses, color=color, label=f"{r.scheme} ({r.final_val_loss:.3f})")
        for layer, f in enumerate(r.load_per_layer):
            rel = sorted((x * len(f) for x in f), reverse=True)
            ax_load.plot(range(1, len(f) + 1), rel, color=color, marker="o", markersize=3,
                         linestyle=("-", "--", ":", "-.")[layer % 4], label=f"{r.scheme} layer {layer}")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("validation loss (nats / byte)")
    ax_loss.set_title("Held-out loss, equal active FFN FLOPs")
    lo = min(r.final_val_loss for r in results)
    ax_loss.set_ylim(lo - 0.1, lo + 1.5)
    ax_loss.legend()
    ax_load.axhline(1.0, color="grey", linewidth=0.8)
    ax_load.set_xlabel("expert rank (most loaded first)")
    ax_load.set_ylabel("load / uniform share (1 = balanced)")
    ax_load.set_title("Expert load on held-out text")
    ax_load.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a UTF-8 text file to train on (default: the bundled English corpus)")
    parser.add_argument("--domain", default="english", help="bundled corpus domain: english or code")
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--layers", type=int, default=DemoConfig.n_layers)
    parser.add_argument("--batch-size", type=int, default=DemoConfig.batch_size)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--out", default="runs/train_from_scratch", help="output folder")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    if args.text:
        text = read_text_file(args.text)
        cut = int(len(text) * 0.9)
        train_text, val_text = text[:cut], text[cut:]
    else:
        train_text, val_text = bundled_text(args.domain, "calibration"), bundled_text(args.domain, "evaluation")
    cfg = DemoConfig(steps=args.steps, n_layers=args.layers, batch_size=args.batch_size, seed=args.seed)
    summary, results = run_demo(train_text, val_text, cfg, args.schemes)
    summary["text"] = args.text or f"bundled {args.domain}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot_results(results, out / "val_loss.png")

    print(f"{'scheme':<24}{'val loss':>9}{'bits/B':>8}{'FFN MFLOP/tok':>14}{'params':>9}{'max/mean load':>22}"
          f"{'drop %':>8}{'wall s':>8}{'CPU s':>8}")
    for r in results:
        load = " ".join(f"{m:.2f}" for m in r.max_over_mean_load) or "-"
        print(f"{r.scheme:<24}{r.final_val_loss:>9.4f}{r.final_val_bits_per_byte:>8.3f}"
              f"{r.ffn_flops_per_token / 1e6:>14.3f}{r.params_total:>9}{load:>22}"
              f"{100 * r.train_drop_fraction:>8.2f}{r.train_seconds:>8.1f}{r.train_cpu_seconds:>8.1f}")
    print(f"wrote {out / 'results.json'} and {out / 'val_loss.png'}")


if __name__ == "__main__":
    main()
