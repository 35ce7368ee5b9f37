"""Figures of moefy's analyses, as pure functions of saved results (replotting never reruns a model).

Each `fig_*` function takes result dataclasses from `moefy.analysis` and returns a matplotlib
`Figure` (object API only: no pyplot, no global state, any backend). `figures_from_folder`
loads whatever results an analysis folder holds and returns every figure it can draw, with a
caption; `save_png` / `png_bytes` write them out.

    G-MoEfication Figure 1 -> fig_sparsity, fig_sparsity_eps
    G-MoEfication Figure 3 -> fig_cost
    G-MoEfication Figure 4 -> fig_centring
    G-MoEfication Figure 5 -> fig_specialisation
    routing diagnostics    -> fig_expert_load, fig_routing_quality, fig_layer_loss
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.errors import MissingDependencyError

try:
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - the [plot] extra is not installed
    Figure = None  # type: ignore[assignment,misc]

from moefy.analysis.cost import CostBreakdown
from moefy.analysis.routing import RoutingDiagnostics
from moefy.analysis.sparsity import SparsityProfile
from moefy.analysis.specialisation import Specialisation

DPI = 110
FIG1_EPS = 0.1  # the eps drawn in Figure 1's soft-sparsity panels


def _figure(width: float, height: float) -> Figure:
    if Figure is None:
        raise MissingDependencyError("matplotlib", "drawing figures", extra="plot")
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _decorate(ax, xlabel: str, ylabel: str, title: str, *, grid: str | None = "both") -> None:
    """Axis labels, a title, a legend and a light grid (`grid`: its axis, or None for none)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    if grid is not None:
        ax.grid(alpha=0.3, axis=grid)


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig))
    return path


def _depth(n: int) -> list[float]:
    return [i / max(n - 1, 1) for i in range(n)]


# ---- Figure 1: sparsity -------------------------------------------------------------------------
def fig_sparsity(profiles: list[SparsityProfile], eps: float = FIG1_EPS) -> Figure:
    """Per layer: exact sparsity, |a| <= eps, |a - r| <= eps, one line per model."""
    fig = _figure(13, 4.2)
    axes = fig.subplots(1, 3, sharey=True)
    for p in profiles:
        i = p.eps_index(eps)
        x = _depth(p.num_layers)
        style = dict(marker="o", markersize=3, linestyle="--" if p.note else "-", label=p.label)
        axes[0].plot(x, (100 * p.exact).tolist(), **style)
        axes[1].plot(x, (100 * p.soft[:, i]).tolist(), **style)
        axes[2].plot(x, (100 * p.centred[:, i]).tolist(), **style)
    e = profiles[0].eps[profiles[0].eps_index(eps)] if profiles else eps
    titles = ["exact sparsity: a = 0", f"soft sparsity: |a| ≤ ε (ε = {e:g})", f"centred: |a − r| ≤ ε (ε = {e:g}, r = mean)"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("relative depth (layer / last layer)")
        ax.set_ylim(-2, 102)
        ax.set_ylabel("sparse (token, neuron) pairs (%)")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle("FFN activation sparsity per layer (dashed: synthetic reference)", fontsize=11)
    return fig


def fig_sparsity_eps(profiles: list[SparsityProfile]) -> Figure:
    """Layer-averaged soft sparsity against eps, around 0 (solid) and around r (dashed)."""
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    colors = _colors(len(profiles))
    for p, c in zip(profiles, colors, strict=True):
        ax.plot(p.eps, (100 * p.soft.mean(0)).tolist(), color=c, marker="o", label=f"{p.label}: |a| ≤ ε")
        ax.plot(p.eps, (100 * p.centred.mean(0)).tolist(), color=c, marker="s", linestyle="--", label=f"{p.label}: |a − r| ≤ ε")
    ax.set_xscale("log")
    ax.set_xlabel("threshold ε (activation units, log scale)")
    ax.set_ylabel("sparse (token, neuron) pairs, mean over layers (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("Soft sparsity vs ε, before and after centring on r", fontsize=10)
    return fig


# ---- Figure 4: centring ---------------------------------------------------------------------------
def _range(values: torch.Tensor) -> tuple[float, float]:
    lo, hi = torch.quantile(values.float(), torch.tensor([0.005, 0.995])).tolist()
    pad = 0.05 * (hi - lo + 1e-9)
    return lo - pad, hi + pad


def fig_centring(p: SparsityProfile, eps: float = FIG1_EPS) -> Figure:
    """Distribution of activations before (a) and after (a − r) subtracting the representative:
    the whole middle layer pooled, then sample neurons."""
    n = int(p.neuron_ids.numel())
    cols = min(n + 1, 3)
    rows = math.ceil((n + 1) / cols)
    fig = _figure(4.3 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    e = p.eps[p.eps_index(eps)]
    panels: list[tuple[str, torch.Tensor, torch.Tensor, float | None]] = [
        ("all neurons (pooled)", p.layer_values, p.layer_values - p.layer_r, None)
    ]
    for j in range(n):
        rj = float(p.neuron_r[j])
        kind = p.neuron_kinds[j] if j < len(p.neuron_kinds) else ""
        panels.append((f"neuron {int(p.neuron_ids[j])} ({kind}), r = {rj:.3g}", p.neuron_values[j], p.neuron_values[j] - rj, rj))
    for ax, (title, a, centred, r) in zip(axes, panels, strict=False):
        lo, hi = _range(torch.cat([a, centred]))
        bins = torch.linspace(lo, hi, 60).tolist()
        ax.hist(a.clamp(lo, hi).tolist(), bins=bins, density=True, alpha=0.55, label="a")
        ax.hist(centred.clamp(lo, hi).tolist(), bins=bins, density=True, alpha=0.55, label="a − r")
        ax.axvspan(-e, e, color="grey", alpha=0.2, label=f"|·| ≤ ε = {e:g}")
        if r is not None:
            ax.axvline(r, color="C0", linestyle=":", linewidth=1, label="r")
        frac_a = float((a.abs() <= e).float().mean())
        frac_c = float((centred.abs() <= e).float().mean())
        ax.set_title(f"{title}\nwithin ±ε: a {100 * frac_a:.0f}%, a − r {100 * frac_c:.0f}%", fontsize=8)
        ax.set_xlabel("activation value")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
    for ax in axes[: min(2, len(panels))]:
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{p.label}: activations of layer {p.neuron_layer} before and after subtracting r", fontsize=10)
    return fig


# ---- routing diagnostics ----------------------------------------------------------------------------
def fig_expert_load(d: RoutingDiagnostics) -> Figure:
    """Expert load per layer: sorted heatmap, histogram of relative load, dead/overloaded counts."""
    fig = _figure(14, 4.6)
    ax_map, ax_hist, ax_bar = fig.subplots(1, 3, width_ratios=[1.4, 1, 1])
    rel = d.relative_load
    sorted_rel = rel.sort(dim=1, descending=True).values
    im = ax_map.imshow(sorted_rel.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax_map, label="load / mean load")
    ax_map.set_xlabel("experts, sorted by load (rank)")
    ax_map.set_ylabel("layer")
    ax_map.set_title("relative expert load per layer", fontsize=10)
    ax_hist.hist(rel.reshape(-1).tolist(), bins=50, color="C0")
    ax_hist.axvline(1.0, color="k", linestyle=":", label="balanced (1×)")
    ax_hist.axvline(d.overload_factor, color="C3", linestyle="--", label=f"overloaded (> {d.overload_factor:g}×)")
    _decorate(ax_hist, "load / mean load", "experts (all layers)", f"load distribution ({d.tokens} tokens per layer)", grid=None)
    layers = list(range(len(d.layer_names)))
    ax_bar.bar([i - 0.2 for i in layers], d.dead.tolist(), width=0.4, label="dead (never selected)", color="C7")
    ax_bar.bar([i + 0.2 for i in layers], d.overloaded.tolist(), width=0.4, label=f"overloaded (> {d.overload_factor:g}×)", color="C3")
    _decorate(ax_bar, "layer", f"experts (of {d.num_experts})", "dead and overloaded experts", grid="y")
    fig.suptitle(f"{d.model}: expert load, {d.selection} selection, k = {d.top_k} of {d.num_experts}", fontsize=11)
    return fig


def fig_routing_quality(d: RoutingDiagnostics) -> Figure:
    """Per layer: recall of the oracle's top-k, residual mass captured, FFN output error."""
    fig = _figure(12, 4.2)
    ax_a, ax_b = fig.subplots(1, 2)
    layers = list(range(len(d.layer_names)))
    ax_a.plot(layers, (100 * d.recall).tolist(), marker="o", label="recall of oracle top-k")
    ax_a.plot(layers, (100 * d.mass_captured).tolist(), marker="s", label="residual mass captured (selection)")
    ax_a.plot(layers, (100 * d.oracle_mass_captured).tolist(), marker="^", linestyle="--", label="residual mass captured (oracle)")
    ax_a.set_ylim(0, 102)
    _decorate(ax_a, "layer", "%", "router vs oracle")
    ax_b.plot(layers, (100 * d.relative_error).tolist(), marker="o", label=f"{d.selection} selection")
    ax_b.plot(layers, (100 * d.oracle_relative_error).tolist(), marker="^", linestyle="--", label="oracle top-k")
    _decorate(ax_b, "layer", "‖ŷ − y‖ / ‖y‖ of the FFN output (%)", "relative FFN output error on held-out tokens")
    fig.suptitle(f"{d.model}: routing quality ({d.tokens} tokens per layer)", fontsize=11)
    return fig


def fig_layer_loss(d: RoutingDiagnostics) -> Figure:
    """Quality loss with only one layer converted, per layer, and its share of the sum."""
    fig = _figure(12, 4.2)
    ax = fig.subplots()
    delta = d.layer_delta
    layers = list(range(len(d.layer_names)))
    unit = "nats/token" if d.quality_metric == "nll" else "1 − cosine"
    bars = ax.bar(layers, delta.tolist(), color=["C3" if v == delta.max() else "C0" for v in delta.tolist()])
    for bar, share in zip(bars, d.loss_share.tolist(), strict=True):
        if share >= 0.03:
            ax.annotate(f"{100 * share:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("layer (the only one converted)")
    ax.set_ylabel(f"loss increase over dense ({unit})")
    full = d.full_loss - d.dense_loss
    ax.set_title(
        f"{d.model}: which layers hurt most (bar labels: share of the summed increases)\n"
        f"sum over layers {float(delta.sum()):.3f}; all layers converted together {full:.3f} {unit}", fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    return fig


# ---- Figure 5: specialisation -----------------------------------------------------------------------
def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def fig_specialisation(s: Specialisation) -> Figure:
    """Expert-usage vectors of text chunks projected to 2-D, coloured by language family, with
    category names at their centroids and the silhouette scores beside."""
    has_tsne = s.tsne.numel() > 0
    fig = _figure(17 if has_tsne else 11.5, 6)
    panels = fig.subplots(1, 3 if has_tsne else 2, width_ratios=[1, 1, 0.55] if has_tsne else [1, 0.55])
    families = list(dict.fromkeys(s.families))
    color = dict(zip(families, _colors(len(families)), strict=True))
    markers = "os^Dv<>pPh*X"
    projections = [("PCA", s.pca)] + ([("t-SNE", s.tsne)] if has_tsne else [])
    for ax, (method, xy) in zip(panels, projections, strict=False):
        for ci, cat in enumerate(s.categories):
            pts = xy[s.chunk_category == ci]
            fam = s.families[ci]
            marker = markers[[c for c in s.categories if s.families[s.categories.index(c)] == fam].index(cat) % len(markers)]
            ax.scatter(pts[:, 0].tolist(), pts[:, 1].tolist(), color=color[fam], marker=marker, s=22, alpha=0.75,
                       edgecolors="none")
            cx, cy = pts.mean(0).tolist()
            ax.annotate(cat, (cx, cy), fontsize=7, ha="center", va="center",
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=color[fam], alpha=0.8))
        if method == "PCA":
            v = s.explained_variance
            ax.set_xlabel(f"PC 1 ({100 * v[0]:.0f}% of variance)")
            ax.set_ylabel(f"PC 2 ({100 * v[1]:.0f}% of variance)")
        else:
            ax.set_xlabel("t-SNE 1 (arbitrary units)")
            ax.set_ylabel("t-SNE 2 (arbitrary units)")
        ax.set_title(f"{method} of expert-usage vectors ({s.chunk_tokens}-token chunks)", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [panels[0].scatter([], [], color=color[f], label=f) for f in families]
    panels[0].legend(handles=handles, fontsize=7, title="language family", title_fontsize=8, loc="best")
    ax_s = panels[-1]
    names = ["family\n(full space)", "family,\nlabels shuffled", "language\n(full space)", "family\n(PCA plane)"]
    scores = [s.silhouette_family, s.silhouette_family_random, s.silhouette_language, s.silhouette_family_2d]
    bars = ax_s.bar(range(4), scores, color=["C2", "C7", "C1", "C2"])
    for bar, score in zip(bars, scores, strict=True):
        ax_s.annotate(f"{score:.2f}", (bar.get_x() + bar.get_width() / 2, max(score, 0)), ha="center", va="bottom", fontsize=8)
    ax_s.set_xticks(range(4), names, fontsize=7)
    ax_s.set_xlabel("labels scored (space)")
    ax_s.axhline(0, color="k", linewidth=0.8)
    ax_s.set_ylim(min(-0.1, min(scores) - 0.05), max(0.3, max(scores) + 0.1))
    ax_s.set_ylabel("silhouette score (−1 … 1)")
    ax_s.set_title("clustering score", fontsize=10)
    fig.suptitle(f"{s.model}: expert specialisation by language and domain ({len(s.categories)} categories, "
                 f"{len(families)} families)", fontsize=11)
    return fig


# ---- Figure 3: cost ---------------------------------------------------------------------------------
def fig_cost(c: CostBreakdown) -> Figure:
    """FFN FLOPs per token: per layer, total, and against k / n, with and without static embeddings."""
    fig = _figure(15, 4.3)
    ax_l, ax_t, ax_k = fig.subplots(1, 3, width_ratios=[1.6, 0.8, 1])
    layers = list(range(len(c.layer_names)))
    mega = 1e-6
    for off, values, label, col in [
        (-0.27, c.dense, "dense FFN", "C7"),
        (0.0, c.moe_no_static, "MoE without static embeddings", "C3"),
        (0.27, c.moe_static, "MoE with static embeddings", "C2"),
    ]:
        ax_l.bar([i + off for i in layers], [v * mega for v in values], width=0.27, label=label, color=col)
    _decorate(ax_l, "layer", "FFN MFLOPs per token", "per layer (router included in MoE)", grid="y")
    t = c.totals
    names = ["dense", "MoE, no static", "MoE, static"]
    vals = [t["dense"], t["moe_no_static"], t["moe_static"]]
    bars = ax_t.bar(range(3), [v * mega for v in vals], color=["C7", "C3", "C2"])
    for bar, v in zip(bars, vals, strict=True):
        ax_t.annotate(f"{100 * v / t['dense']:.0f}%", (bar.get_x() + bar.get_width() / 2, v * mega), ha="center",
                      va="bottom", fontsize=9)
    ax_t.set_xticks(range(3), names, fontsize=8)
    ax_t.set_xlabel("FFN variant")
    ax_t.set_ylabel("FFN MFLOPs per token, all layers")
    ax_t.set_title("total (% of dense)", fontsize=10)
    ax_k.plot([100 * f for f in c.curve_k_fraction], [100 * v for v in c.curve_no_static], color="C3", marker=".",
              label="without static embeddings")
    ax_k.plot([100 * f for f in c.curve_k_fraction], [100 * v for v in c.curve_static], color="C2", marker=".",
              label="with static embeddings")
    ax_k.axhline(100, color="k", linestyle=":", label="dense")
    k0 = c.k[0] / c.num_experts[0]
    ax_k.axvline(100 * k0, color="C0", linestyle="--", label=f"this model (k = {c.k[0]:.3g} of {c.num_experts[0]})")
    _decorate(ax_k, "experts computed, k / n (%)", "FFN FLOPs (% of dense, one layer)", "cost against k")
    fig.suptitle(f"{c.model}: FFN cost, dense vs MoE (multiply-add = 2 FLOPs)", fontsize=11)
    return fig


# ---- moefy compare: quality against FFN FLOPs -----------------------------------------------------------
def fig_compare(payload: dict) -> Figure:
    """`moefy compare` results (its JSON): per method, relative task performance and the first
    held-out metric (perplexity, or embedding fidelity for encoders) against measured FFN FLOPs."""
    from moefy.compare import LABELS, relative_performance

    rows = [r for r in payload["rows"] if r.get("metrics")]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    first = next((m for r in rows for m in r["metrics"] if m["metric"] in ("perplexity", "embedding_fidelity")), None)
    fig = _figure(11, 4.2)
    ax_rel, ax_q = fig.subplots(1, 2)
    methods = [m for m in LABELS if m != "dense" and any(r["method"] == m for r in rows)]
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ffn_flops_fraction"] or 0)
        x = [100 * (r["ffn_flops_fraction"] or 0) for r in mine]
        rel = [relative_performance(r, dense) if dense else None for r in mine]
        if any(v is not None for v in rel):
            ax_rel.plot(x, [100 * v if v is not None else float("nan") for v in rel], marker="o", color=f"C{i}",
                        label=LABELS[method])
        if first is not None:
            vals = [next((m["value"] for m in r["metrics"] if (m["metric"], m["task"]) == (first["metric"], first["task"])),
                         float("nan")) for r in mine]
            ax_q.plot(x, vals, marker="o", color=f"C{i}", label=LABELS[method])
    ax_rel.axhline(100, color="k", linestyle=":", label="dense")
    _decorate(ax_rel, "FFN FLOPs (% of dense, router included)", "relative performance (% of dense accuracy)",
              "task accuracy / dense, mean over tasks")
    if first is not None:
        d = next((m["value"] for m in (dense or {}).get("metrics", [])
                  if (m["metric"], m["task"]) == (first["metric"], first["task"])), None)
        if d is not None:
            ax_q.axhline(d, color="k", linestyle=":", label="dense")
        if first["metric"] == "perplexity":
            ax_q.set_yscale("log")
        name = "perplexity" if first["metric"] == "perplexity" else "embedding fidelity"
        _decorate(ax_q, "FFN FLOPs (% of dense, router included)", f"{first['task']} {name}",
                  f"held-out {first['task']} {name} (n={first['n']} {first['unit']})")
    fig.suptitle(f"moefy compare: {payload['spec']['model']}", fontsize=11)
    return fig


# ---- a whole analysis folder -------------------------------------------------------------------------
@dataclass
class NamedFigure:
    stem: str  # file name without .png
    title: str
    caption: str
    figure: Figure


def figures_from_folder(folder: str | Path) -> list[NamedFigure]:
    """Every figure the saved results in `folder` allow, in report order."""
    from moefy.analysis.results import load_folder

    r = load_folder(folder)
    out: list[NamedFigure] = []
    if r.sparsity:
        out.append(NamedFigure("fig1_sparsity", "Figure 1 — exact vs soft sparsity per layer",
                               "Share of (token, neuron) activation pairs that are exactly zero, within ±ε of zero, and "
                               "within ±ε of the neuron's representative r (its mean), per layer.", fig_sparsity(r.sparsity)))
        out.append(NamedFigure("fig1b_sparsity_eps", "Figure 1b — soft sparsity against ε",
                               "Layer-averaged soft sparsity for each threshold ε, around 0 and around r.",
                               fig_sparsity_eps(r.sparsity)))
        for p in r.sparsity:
            out.append(NamedFigure(f"fig4_centring_{_slug(p.model, p.activation)}", f"Figure 4 — centring ({p.label})",
                                   "Histograms of activations a and of a − r for the middle layer (all neurons pooled) "
                                   "and sample neurons; the grey band is ±ε.", fig_centring(p)))
    if r.routing is not None:
        d = r.routing
        out.append(NamedFigure("routing_load", "Expert load", "How often each expert is selected on held-out text, "
                               "relative to a perfectly balanced load; dead and overloaded experts per layer.", fig_expert_load(d)))
        out.append(NamedFigure("routing_quality", "Router vs oracle", "Recall of the oracle's top-k experts, share of the "
                               "residual mass Σ‖v_e − m_e‖² captured, and the exact relative FFN output error.",
                               fig_routing_quality(d)))
        if not math.isnan(d.dense_loss):
            out.append(NamedFigure("routing_layer_loss", "Which layers hurt most", "Loss increase over the dense model "
                                   "when only one layer is converted (all others run every expert, which is exact).",
                                   fig_layer_loss(d)))
    if r.specialisation is not None:
        out.append(NamedFigure("fig5_specialisation", "Figure 5 — expert specialisation",
                               "Expert-usage vectors of text chunks per category, projected to 2-D, coloured by language "
                               "family; silhouette scores of the family labels beside.", fig_specialisation(r.specialisation)))
    if r.cost is not None:
        out.append(NamedFigure("fig3_cost", "Figure 3 — cost", "FFN FLOPs per token, dense vs MoE with and without static "
                               "embeddings, per layer and in total, and against k.", fig_cost(r.cost)))
    return out


def _slug(*parts: str) -> str:
    return "_".join("".join(ch if ch.isalnum() else "-" for ch in p.lower()).strip("-") for p in parts)
