"""A self-contained HTML report of a conversion: config, quality/cost table, every figure.

    write_report("runs/smollm2-135m-moe")   # -> runs/smollm2-135m-moe/report.html

The page has no external resources: figures are embedded as base64 PNG, styles inline, no
script. Analyses missing from FOLDER/analysis/ are computed first (`compute=True`, the default;
that loads the model); with `compute=False` the report is drawn from what is saved, so redrawing
it never reruns a model. The figures are also written as PNG files to FOLDER/analysis/figures/.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
from pathlib import Path

from moefy import __version__
from moefy.analysis.corpus import multilingual_source
from moefy.analysis.results import FIGURES, AnalysisResults, load_folder
from moefy.analysis.runner import AnalyzeOptions, analyze_conversion
from moefy.moe_model import MoEModel
from moefy.plan import read_metadata
from moefy.plots import NamedFigure, figures_from_folder, png_bytes

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
GENERATION_FILE = "generation.json"  # generation fidelity, dense vs MoE (`moefy.generation`)
COMPARE_FILE = "compare.json"  # a `moefy compare` grid (FOLDER/compare.json, or given with --compare)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#666;font-size:.9rem}table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}th{background:#f4f4f4}td.k,th.k{text-align:left}
figure{margin:1.2rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.88rem;color:#444;margin-top:.3rem}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5rem .8rem;font-size:.88rem;margin:.6rem 0}
code{background:#f4f4f4;padding:0 .2rem}
"""


def _esc(v: object) -> str:
    return html.escape(str(v))


def _fmt(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _table(header: list[str], rows: list[list[object]], key_cols: int = 1) -> str:
    head = "".join(f'<th class="{"k" if i < key_cols else ""}">{_esc(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"k" if i < key_cols else ""}">{_esc(_fmt(v))}</td>' for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _evaluation(folder: Path, meta: dict) -> dict | None:
    """The recorded evaluation of the conversion (results.json of the main job, or moefy.json)."""
    path = folder / "results.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("%s is not valid JSON; ignoring it", path)
    return meta["extra"].get("evaluation")


def _quality_rows(evaluation: dict | None, results: AnalysisResults) -> list[list[object]]:
    rows: list[list[object]] = []
    if evaluation and evaluation.get("dense") and evaluation.get("moe"):
        for d, m in zip(evaluation["dense"], evaluation["moe"], strict=False):
            for metric in ("perplexity", "embedding_fidelity", "retrieval_accuracy"):
                if metric in d and metric in m:
                    change = (m[metric] - d[metric]) / d[metric] if d[metric] else float("nan")
                    rows.append([f"{metric} ({d.get('split', '?')}, recorded evaluation)", d[metric], m[metric],
                                 f"{100 * change:+.1f}%"])
    r = results.routing
    if r is not None and not math.isnan(r.dense_loss):
        if r.quality_metric == "nll":
            d, m = math.exp(r.dense_loss), math.exp(r.full_loss)
            rows.append(["perplexity (analysis sample, English + code)", d, m, f"{100 * (m - d) / d:+.1f}%"])
        else:
            rows.append(["1 − cosine to dense embeddings (analysis sample)", r.dense_loss, r.full_loss, "-"])
    return rows


def _cost_rows(evaluation: dict | None, results: AnalysisResults) -> list[list[object]]:
    rows: list[list[object]] = []
    c = results.cost
    if c is not None:
        t = c.totals
        rows.append(["FFN MFLOPs per token, all layers", t["dense"] / 1e6, t["moe_static"] / 1e6,
                     f"{100 * t['moe_static_fraction']:.1f}% of dense"])
        rows.append(["… without static embeddings", t["dense"] / 1e6, t["moe_no_static"] / 1e6,
                     f"{100 * t['moe_no_static_fraction']:.1f}% of dense"])
        rows.append(["router MFLOPs per token, all layers", 0.0, t["router"] / 1e6, "-"])
    if evaluation and "ffn_flops_fraction" in evaluation:
        rows.append(["FFN FLOPs fraction measured during evaluation", 1.0, evaluation["ffn_flops_fraction"], "-"])
    return rows


def _routing_rows(results: AnalysisResults) -> list[list[object]]:
    r = results.routing
    if r is None:
        return []
    s = r.summary()
    rows = [
        ["mean recall of the oracle's top-k", s["mean_recall"]],
        ["mean residual mass captured (selection / oracle)", f"{s['mean_mass_captured']:.3f} / {float(r.oracle_mass_captured.mean()):.3f}"],
        ["mean relative FFN output error (selection / oracle)", f"{s['mean_relative_error']:.3f} / {float(r.oracle_relative_error.mean()):.3f}"],
        ["dead experts (all layers)", s["dead_experts"]],
        [f"overloaded experts (> {r.overload_factor:g}× mean load, all layers)", s["overloaded_experts"]],
    ]
    if not math.isnan(r.dense_loss):
        rows.append(["layer that hurts most alone", s["worst_layer"]])
    return rows


def _config_rows(meta: dict) -> list[list[object]]:
    base = meta.get("base", {})
    rows: list[list[object]] = [
        ["base model", base.get("name")], ["model type", base.get("model_type")],
        ["FFN shape (d × h)", f"{base.get('d_model')} × {base.get('d_ff')}"],
        ["converted layers", len(meta.get("layers", []))],
    ]
    rows += [[k, v] for k, v in meta.get("config", {}).items()]
    rows += [[f"runtime: {k}", v] for k, v in meta.get("runtime", {}).items()]
    rows.append(["conversion time (s)", meta.get("search_seconds")])
    return rows


def _save_generation(folder: Path, converted: MoEModel | None) -> None:
    """Measure generation fidelity (dense vs MoE greedy continuations) into FOLDER/generation.json."""
    from moefy.errors import MoefyError
    from moefy.generation import generation_fidelity

    try:
        gen = generation_fidelity(converted or MoEModel.from_pretrained(folder))
    except MoefyError as e:  # e.g. a base model that cannot be loaded here: the report goes on without samples
        log.warning("no generation samples in the report: %s", e)
        return
    (folder / GENERATION_FILE).write_text(json.dumps(gen, indent=2), encoding="utf-8")


def _causal(meta: dict) -> bool:
    from moefy.errors import MoefyError
    from moefy.specs import spec_for

    try:
        return spec_for(str(meta.get("base", {}).get("model_type"))).causal
    except MoefyError:
        return False


def _figure_html(fig: NamedFigure, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="{_esc(fig.stem)}"><h3>{_esc(fig.title)}</h3>'
        f'<img alt="{_esc(fig.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_esc(fig.caption)}</figcaption></figure>"
    )


def _compare_payload(compare: str | Path | None, folder: Path) -> dict | None:
    """A `moefy compare` result: the JSON (or the folder holding it) given, else FOLDER/compare.json."""
    path = Path(compare) if compare is not None else folder / COMPARE_FILE
    if path.is_dir():
        path = path / COMPARE_FILE
    if not path.is_file():
        if compare is not None:
            log.warning("%s: no moefy compare results there; the report has no comparison", path)
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON; ignoring it", path)
        return None


def _compare_html(payload: dict) -> str:
    """The quality-vs-FFN-FLOPs curve over the baselines and the paper's tables (moefy compare)."""
    from moefy.compare import settings_line, table_cells, tables
    from moefy.plots import fig_compare

    dense = next((r for r in payload["rows"] if r["method"] == "dense"), None)
    parts = ["<h2>Against the baselines (moefy compare)</h2>",
             f"<p class='meta'>{_esc(payload['spec']['model'])}: {_esc(settings_line(payload))}</p>"]
    fig = NamedFigure("compare", "Quality against FFN FLOPs", "Per method, over the FFN budgets: task accuracy "
                      "relative to dense, and held-out quality (dotted: dense).", fig_compare(payload))
    parts.append(_figure_html(fig, png_bytes(fig.figure)))
    for title, rows in tables(payload).items():
        head, body = table_cells(rows, dense)
        parts.append(f"<h3>{_esc(title)}</h3>" + _table(head, body))  # type: ignore[arg-type]
    return "\n".join(parts)


def _generation(folder: Path, evaluation: dict | None) -> dict | None:
    path = folder / GENERATION_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("%s is not valid JSON; ignoring it", path)
    return (evaluation or {}).get("generation")


def _generation_html(gen: dict) -> str:
    """Generation fidelity: the summary and greedy samples side by side, dense vs MoE."""
    s = gen["summary"]
    rows = [["prompts", s["prompts"]], ["greedy tokens per prompt", s["new_tokens"]],
            ["identical tokens (share)", s["identical_share"]], ["teacher-forced agreement", s["teacher_forced_agreement"]],
            ["prompts fully identical", s["fully_identical"]], ["median first divergence (token)", s["median_first_divergence"]]]
    parts = ["<h2>Sample outputs, dense vs MoE</h2>",
             f"<p class='meta'>Greedy continuations; reference: {_esc(gen['reference'])}.</p>",
             _table(["generation fidelity", "value"], rows)]
    samples = [[x["id"], x["prompt"], x["reference"], x["output"], x["first_divergence"]] for x in gen.get("samples", [])]
    if samples:
        parts.append(_table(["prompt id", "prompt", "dense", "MoE", "first divergence"], samples, key_cols=4))
    return "\n".join(parts)


def render_html(
    folder: str | Path, analysis_dir: str | Path | None = None, *, save_figures: bool = True, compare: str | Path | None = None,
) -> str:
    """The report page of a conversion folder, from saved results only; `compare`: a `moefy
    compare` folder or JSON to show against the baselines (default: FOLDER/compare.json, if any)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    analysis = Path(analysis_dir) if analysis_dir is not None else folder / "analysis"
    results = load_folder(analysis)
    evaluation = _evaluation(folder, meta)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>moefy report — {_esc(folder.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>moefy report — {_esc(folder.name)}</h1>",
        f"<p class='meta'>{_esc(meta.get('base', {}).get('name', '?'))} converted to a Mixture-of-Experts model "
        f"(Generalized MoEfication). Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by moefy {__version__}.</p>",
        "<h2>Quality and cost</h2>",
    ]
    quality = _quality_rows(evaluation, results)
    parts.append(_table(["quality", "dense", "MoE", "change"], quality) if quality else "<p>No evaluation recorded.</p>")
    cost = _cost_rows(evaluation, results)
    if cost:
        parts.append(_table(["cost", "dense", "MoE", ""], cost))
    generation = _generation(folder, evaluation)
    if generation:
        parts.append(_generation_html(generation))
    comparison = _compare_payload(compare, folder)
    if comparison:
        parts.append(_compare_html(comparison))
    routing = _routing_rows(results)
    if routing:
        parts.append("<h2>Routing</h2>" + _table(["diagnostic", "value"], routing))
    if results.sparsity:
        rows = [list(p.summary().values()) for p in results.sparsity]
        header = list(results.sparsity[0].summary().keys())
        parts.append("<h2>Sparsity (mean over layers)</h2>" + _table(header, rows))
        for p in results.sparsity:
            if p.note:
                parts.append(f"<div class='note'><b>{_esc(p.label)}</b>: {_esc(p.note)}.</div>")
    if results.specialisation is not None:
        s = results.specialisation.summary()
        parts.append("<h2>Specialisation</h2>" + _table(["score", "value"], [[k, v] for k, v in s.items()]))
        src = multilingual_source()
        parts.append(f"<div class='note'>Multilingual text: {_esc(src['source'])}; licence: {_esc(src['licence'])}. "
                     "English prose: the Jargon File (public domain); code: CPython standard library (PSF licence).</div>")
    parts.append("<h2>Configuration</h2>" + _table(["setting", "value"], _config_rows(meta)))
    parts.append("<h2>Figures</h2>")
    figures = figures_from_folder(analysis)
    if not figures:
        parts.append("<p>No analysis results found; run <code>moefy report</code> without --no-compute.</p>")
    for fig in figures:
        png = png_bytes(fig.figure)
        if save_figures:
            (analysis / FIGURES).mkdir(parents=True, exist_ok=True)
            (analysis / FIGURES / f"{fig.stem}.png").write_bytes(png)
        parts.append(_figure_html(fig, png))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    folder: str | Path,
    *,
    compute: bool = True,
    recompute: bool = False,
    options: AnalyzeOptions | None = None,
    converted: MoEModel | None = None,
    out: str | Path | None = None,
    compare: str | Path | None = None,
) -> Path:
    """Write FOLDER/report.html (or `out`) for a conversion folder; returns its path. With
    `compute`, a causal LM's generation fidelity is measured too (FOLDER/generation.json)."""
    folder = Path(folder)
    meta = read_metadata(folder)  # a clear error for a folder that is not a conversion
    if compute:
        analyze_conversion(folder, options=options, converted=converted, recompute=recompute)
        if (recompute or not (folder / GENERATION_FILE).is_file()) and _causal(meta):
            _save_generation(folder, converted)
    page = render_html(folder, compare=compare)
    target = Path(out) if out is not None else folder / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    log.info("wrote %s", target)
    return target
