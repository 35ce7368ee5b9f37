"""`moefy compare`: the G-MoEfication paper's tables, in kind, for one model (Tables 1–3 of "Breaking
ReLU Barrier", EMNLP 2024), as Markdown, JSON and a plot.

Methods (rows), each at several FFN FLOPs budgets (router included):

    dense         the model itself (the reference for relative performance)
    moefication   standard MoEfication: unselected experts count as 0 (zero representatives), trained router
    gmoefication  G-MoEfication: unselected experts at their mean activations (static vectors), trained router
    moefy         moefy's default: G-MoEfication + distillation against the dense model
    random        expert selection uniform at random per token (mean representatives)
    static        SNIP-style static selection: one fixed expert set per layer, ranked by importance
                  (decoders: first-order Taylor/SNIP importance on the LM loss; encoders: mean residual norm)
    oracle        exact residual norms (an upper bound: it costs a full dense FFN)
    cats          the CATS-style peer: the gate computed in full, per-neuron threshold (masked; quality only)

Tables 1/2 are dense, moefication, gmoefication, moefy and the CATS peer; Table 3 (expert selection)
is the trained router (the gmoefication row) against random, static and the oracle.

**One search serves every search-only row.** The plan is searched once, its routers trained for the
k of every budget; each row then only changes runtime settings of the same converted model
(`moefy.conversion.apply`: k from the budget, the selection, zero representatives), and the
distilled rows distil one copy of that plan per budget. The searched plan is saved in the output
folder, the distillation checkpoints too (`distill-B/`), and every finished row is written to
``compare.json`` atomically, so an interrupted grid run again with the same settings skips what it
finished, reuses the plan, and continues.

Metrics, each with its task, split, sample count and 95% interval: decoders — held-out perplexity
per split (bootstrap over the windows) and zero-shot multiple-choice accuracy (`moefy.tasks`,
acc and acc_norm, Wilson intervals); encoders — embedding fidelity (cosine to the dense model's
embeddings), self-supervised paragraph-half retrieval and labelled similarity tasks
(`moefy.embedding_tasks`). Relative performance = the mean over tasks of accuracy / dense accuracy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moefy.errors import InvalidArgumentError
from moefy.settings import ConvertConfig, RuntimeConfig

if TYPE_CHECKING:  # the CLI reads METHODS and DEFAULT_BUDGETS from here: no torch at import
    from moefy.models import LoadedModel

log = logging.getLogger(__name__)

METHODS = ("dense", "moefication", "gmoefication", "moefy", "random", "static", "oracle", "cats")
SEARCH_ONLY = ("moefication", "gmoefication", "random", "static", "oracle")  # runtime settings of one plan
TABLE_12 = ("dense", "moefication", "gmoefication", "moefy", "cats")
TABLE_3 = ("gmoefication", "random", "static", "oracle")
DEFAULT_BUDGETS = (0.75, 0.5)
RESULTS_FILE = "compare.json"
PLAN_DIR = "plan-search"
CATS_SAMPLE_SIZE = 4096  # dense-model FFN inputs per layer that calibrate the CATS thresholds
SNIP_BATCHES = 4  # calibration batches (of 8 sequences) the Taylor/SNIP importance is averaged over

LABELS = {
    "dense": "dense",
    "moefication": "MoEfication (zero r, trained router)",
    "gmoefication": "G-MoEfication (mean r, trained router)",
    "moefy": "moefy default (G-MoEfication + distillation)",
    "random": "random selection (mean r)",
    "static": "static selection (mean r)",
    "oracle": "oracle selection (upper bound, full cost)",
    "cats": "CATS-style threshold (peer)",
}


@dataclass(frozen=True)
class CompareSpec:
    """What a grid measures. `tasks` None: every shipped multiple-choice task (decoders) or every
    labelled embedding task (encoders)."""

    model: str
    config: ConvertConfig = field(default_factory=ConvertConfig)  # search (and distillation) settings
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] | None = None
    limit: int | None = None  # first N examples per task
    eval_sequences: int = 16  # 256-token windows per held-out split (encoders: 5 × as many retrieval pairs)

    def __post_init__(self) -> None:
        if not self.budgets:
            raise InvalidArgumentError("--budgets: give at least one FFN budget, e.g. 0.75,0.5")
        for b in self.budgets:
            if not 0.0 < b < 1.0:
                raise InvalidArgumentError(f"--budgets {b} must be in (0, 1) (the dense model is its own row)")
        if len(set(self.budgets)) != len(self.budgets):
            raise InvalidArgumentError(f"--budgets {','.join(map(str, self.budgets))} repeats a budget")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InvalidArgumentError(f"--methods {','.join(bad) or 'none'}: valid methods are {', '.join(METHODS)}")
        if self.limit is not None and self.limit < 1:
            raise InvalidArgumentError(f"--limit {self.limit} must be at least 1")
        if self.eval_sequences < 1:
            raise InvalidArgumentError(f"--eval-sequences {self.eval_sequences} must be at least 1")

    @property
    def distills(self) -> bool:
        return self.config.distill and self.config.distill_steps > 0

    def rows(self) -> list[tuple[str, float]]:
        """(method, budget) of every row, in grid order; dense first, always (the reference)."""
        out: list[tuple[str, float]] = [("dense", 1.0)]
        for b in self.budgets:
            for m in METHODS:
                if m in self.methods and m != "dense" and (m != "moefy" or self.distills):
                    out.append((m, b))
        return out

    def fingerprint(self) -> str:
        """Identifies the settings every row depends on (the methods may change between runs)."""
        d = {"model": self.model, "config": self.config.to_json(), "budgets": list(self.budgets),
             "tasks": None if self.tasks is None else list(self.tasks), "limit": self.limit,
             "eval_sequences": self.eval_sequences}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"model": self.model, "config": self.config.to_json(), "budgets": list(self.budgets),
                "methods": list(self.methods), "tasks": None if self.tasks is None else list(self.tasks),
                "limit": self.limit, "eval_sequences": self.eval_sequences}


def row_key(method: str, budget: float) -> str:
    return f"{method}@{budget:g}"


# ---- results on disk ----------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class Results:
    """The grid's rows, written to ``OUT/compare.json`` (and its Markdown) after every row."""

    def __init__(self, out: Path, spec: CompareSpec, environment: dict) -> None:
        self.out, self.spec = out, spec
        self.rows: dict[str, dict] = {}
        self.environment = environment
        path = out / RESULTS_FILE
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("fingerprint") != spec.fingerprint():
                raise InvalidArgumentError(
                    f"{path} holds a grid with other settings ({_describe(old.get('spec', {}))}); "
                    "use another --out, or the same settings to resume it"
                )
            self.rows = {r["key"]: r for r in old.get("rows", [])}

    def done(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.save()

    def ordered(self) -> list[dict]:
        keys = [row_key(m, b) for m, b in self.spec.rows()]
        return [self.rows[k] for k in keys if k in self.rows]

    def payload(self) -> dict:
        return {"fingerprint": self.spec.fingerprint(), "spec": self.spec.to_json(), "environment": self.environment,
                "complete": all(self.done(row_key(m, b)) for m, b in self.spec.rows()), "rows": self.ordered()}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        payload = self.payload()
        _write_atomic(self.out / RESULTS_FILE, json.dumps(payload, indent=2))
        _write_atomic(self.out / "compare.md", markdown(payload))


def _describe(spec: dict) -> str:
    return ", ".join(f"{k}={spec.get(k)}" for k in ("model", "budgets", "tasks", "limit", "eval_sequences"))


def environment() -> dict:
    import torch

    from moefy.bench import cpu_name

    return {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


# ---- metrics ------------------------------------------------------------------------------------------
def _metric(metric: str, task: str, split: str, n: int, unit: str, value: float, ci95: Sequence[float] | None,
            **extra: Any) -> dict:
    return {"metric": metric, "task": task, "split": split, "n": n, "unit": unit, "value": value,
            "ci95": None if ci95 is None else [float(ci95[0]), float(ci95[1])], **extra}


class Evaluator:
    """Every metric of one row, on a dense model, an `MoEModel` or a model with swapped FFNs."""

    def __init__(self, dense: LoadedModel, spec: CompareSpec) -> None:
        from moefy.embedding_tasks import EMBEDDING_TASKS, check_embedding_tasks
        from moefy.tasks import available_tasks

        self.dense, self.spec = dense, spec
        if dense.is_causal:
            self.tasks = list(spec.tasks) if spec.tasks is not None else available_tasks()
        else:
            self.tasks = list(spec.tasks) if spec.tasks is not None else list(EMBEDDING_TASKS)
            check_embedding_tasks(self.tasks)

    def __call__(self, target: Any) -> list[dict]:
        loaded = getattr(target, "loaded", target)
        return self._decoder(loaded) if loaded.is_causal else self._encoder(loaded)

    def _decoder(self, loaded: LoadedModel) -> list[dict]:
        from moefy.evaluate import perplexity_from, perplexity_interval, sequence_nll
        from moefy.tasks import evaluate_tasks
        from moefy.text import split_batches

        out = []
        for name, batch in split_batches(loaded.tokenizer, "evaluation", 256, self.spec.eval_sequences).items():
            nll, counts = sequence_nll(loaded.model, batch)
            out.append(_metric("perplexity", name, "held-out evaluation text", int(counts.sum()), "tokens",
                               perplexity_from(nll, counts, name), perplexity_interval(nll, counts),
                               sequences=int(nll.shape[0])))
        for r in evaluate_tasks(loaded, self.tasks, limit=self.spec.limit)["tasks"]:
            for key in ("acc", "acc_norm"):
                out.append(_metric(key, r["task"], r["split"], r["n"], "examples", r[key], r[f"{key}_ci95"],
                                   chance=r["chance"]))
        return out

    def _encoder(self, loaded: LoadedModel) -> list[dict]:
        from moefy.api import evaluate_model
        from moefy.embedding_tasks import evaluate_embedding_tasks
        from moefy.tasks import wilson_interval

        out = []
        for s in evaluate_model(loaded, max_sequences=self.spec.eval_sequences, reference=self.dense)["splits"]:
            n = s["pairs"]
            out.append(_metric("embedding_fidelity", s["split"], "held-out evaluation text", 2 * n, "texts",
                               s["embedding_fidelity"], None))
            hits = round(s["retrieval_accuracy"] * n)
            out.append(_metric("retrieval_acc", f"{s['split']} paragraph halves (self-supervised)",
                               "held-out evaluation text", n, "pairs", s["retrieval_accuracy"], wilson_interval(hits, n),
                               chance=1 / n))
        for r in evaluate_embedding_tasks(loaded, self.tasks, limit=self.spec.limit)["tasks"]:
            out.append(_metric("acc", r["task"], r["split"], r["n"], "examples", r["acc"], r["acc_ci95"], chance=r["chance"]))
        return out


def relative_performance(row: dict, dense: dict) -> float | None:
    """Mean over the tasks of accuracy / the dense model's accuracy (the paper's relative
    performance); None without task accuracies."""
    ref = {(m["task"], m["metric"]): m["value"] for m in dense.get("metrics", []) if m["metric"] == "acc"}
    ratios = [m["value"] / ref[(m["task"], "acc")] for m in row.get("metrics", [])
              if m["metric"] == "acc" and ref.get((m["task"], "acc"))]
    return sum(ratios) / len(ratios) if ratios else None


# ---- the grid -----------------------------------------------------------------------------------------
@dataclass
class _Row:
    method: str
    budget: float

    @property
    def key(self) -> str:
        return row_key(self.method, self.budget)


def run_compare(
    spec: CompareSpec, out: str | Path, *, progress: bool = False, on_row: Callable[[dict], None] | None = None
) -> dict:
    """Run (or resume) the grid of `spec`, writing ``OUT/compare.json``, ``compare.md`` and
    ``compare.png``; returns the results. `on_row(row)` is called after each new row."""
    out = Path(out)
    results = Results(out, spec, environment())
    todo = [_Row(m, b) for m, b in spec.rows() if not results.done(row_key(m, b))]
    if todo:
        log.info("compare %s: %d of %d rows to run", spec.model, len(todo), len(spec.rows()))
        _Grid(spec, out, results, progress, on_row).run(todo)
    results.save()
    payload = results.payload()
    _save_plot(payload, out / "compare.png")
    return payload


class _Grid:
    """The work of one `run_compare` call: the rows still to do, cheapest model state first."""

    def __init__(self, spec: CompareSpec, out: Path, results: Results, progress: bool,
                 on_row: Callable[[dict], None] | None) -> None:
        self.spec, self.out, self.results, self.progress, self.on_row = spec, out, results, progress, on_row
        self.dense = self.fresh_model()
        self.evaluate = Evaluator(self.dense, spec)
        self._batches: list | None = None

    def fresh_model(self) -> LoadedModel:
        """The dense model, loaded anew (conversion and the CATS peer swap its FFNs in place)."""
        from moefy.models import load_model

        return load_model(self.spec.model)

    @property
    def batches(self) -> list:
        from moefy.api import calibration_batches

        if self._batches is None:
            self._batches = calibration_batches(
                self.dense, None, self.spec.config.calibration_sequences, mix=self.spec.config.calibration_mix
            )
        return self._batches

    def record(self, row: _Row, target: Any, flops: Callable[[], float], top_k: int | None, **extra: Any) -> None:
        model = getattr(target, "model", None) or target.loaded.model
        for m in model.modules():  # FLOPs are measured over this row's evaluation only
            if callable(getattr(m, "reset_counters", None)):
                m.reset_counters()
        t0 = time.perf_counter()
        metrics = self.evaluate(target)
        entry = {"key": row.key, "method": row.method, "label": LABELS[row.method], "budget": row.budget,
                 "top_k": top_k, "ffn_flops_fraction": flops(), "metrics": metrics,
                 "eval_seconds": time.perf_counter() - t0, **extra}
        self.results.add(entry)
        log.info("compare: %s done (%.0f s)", row.key, entry["eval_seconds"])
        if self.on_row is not None:
            self.on_row(entry)

    def run(self, todo: list[_Row]) -> None:
        for row in [r for r in todo if r.method == "dense"]:
            self.record(row, self.dense, lambda: 1.0, None)
        search_rows = [r for r in todo if r.method in SEARCH_ONLY]
        if search_rows:
            self.search_rows(search_rows)
        for row in [r for r in todo if r.method == "moefy"]:
            self.distilled_row(row)
        for row in [r for r in todo if r.method == "cats"]:
            self.cats_row(row)

    # ---- one search, many runtime settings -----------------------------------------------------------
    def search_config(self) -> ConvertConfig:
        """The search settings: routers trained for the k of the largest budget and, through
        `router_k_fractions`, for the k of every other budget."""
        from moefy.conversion import check_config_for

        config = self.spec.config.replace(budget=max(self.spec.budgets))
        ks = [check_config_for(self.dense, config.replace(budget=b)) for b in self.spec.budgets]
        routed = config.num_experts - config.num_shared
        return config.replace(router_k_fractions=tuple((k - config.num_shared) / routed for k in ks))

    def searched_plan(self) -> Any:
        """The plan of the one search (read back from OUT/plan-search when an earlier run saved it)."""
        from moefy.conversion import search
        from moefy.plan import ModelPlan

        folder = self.out / PLAN_DIR
        if (folder / "moefy.json").is_file():
            log.info("compare: reusing the searched plan in %s", folder)
            return ModelPlan.load(folder)
        config = self.search_config()
        plan = search(self.fresh_model(), self.batches, config, progress=self.progress)
        plan.save(folder, overwrite=True)
        return ModelPlan.load(folder)  # what a resumed run reads: the same numbers either way

    def search_rows(self, rows: list[_Row]) -> None:
        from moefy.conversion import apply, ffn_flops_fraction, moe_layers
        from moefy.moe_model import MoEModel

        plan = self.searched_plan()
        loaded = self.fresh_model()
        apply(loaded, plan, RuntimeConfig())
        moe = MoEModel(loaded=loaded, plan=plan)
        if any(r.method == "static" for r in rows):
            self.set_static_importance(moe)
        settings = {"moefication": {"zero_representatives": True}, "gmoefication": {}, "random": {"selection": "random"},
                    "static": {"selection": "static"}, "oracle": {"selection": "oracle"}}
        for row in rows:
            moe.configure(RuntimeConfig(budget=row.budget, **settings[row.method]))  # type: ignore[arg-type]
            self.record(row, moe, lambda: ffn_flops_fraction(moe.model), moe_layers(moe.model)[0].top_k,
                        importance=self.importance_kind if row.method == "static" else None)

    @property
    def importance_kind(self) -> str:
        return "SNIP-style Taylor importance on the LM loss" if self.dense.is_causal else "mean residual norm on calibration text"

    def set_static_importance(self, moe: Any) -> None:
        """Decoders: SNIP-style Taylor importance on the LM loss; encoders keep the plan's mean residual norms."""
        if self.dense.is_causal:
            from moefy.importance import set_static_importance, taylor_importance

            set_static_importance(moe.model, taylor_importance(moe.model, self.batches[:SNIP_BATCHES]))

    # ---- distillation, one copy of the plan per budget -------------------------------------------------
    def distilled_row(self, row: _Row) -> None:
        from moefy.conversion import apply, ffn_flops_fraction, ffn_shape, moe_layers, planned_top_k
        from moefy.distill import distill
        from moefy.ffn import extract_ffn
        from moefy.moe_model import MoEModel
        from moefy.specs import find_blocks

        plan = copy.deepcopy(self.searched_plan())
        loaded = self.fresh_model()
        config = self.spec.config.replace(budget=row.budget)
        shape = ffn_shape(extract_ffn(find_blocks(loaded.model, loaded.spec)[0][1], loaded.spec))
        k = planned_top_k(shape, config)  # compensation included, as `moefy convert` plans it
        for lp in plan.layers:
            lp.top_k = k
        apply(loaded, plan, RuntimeConfig())
        report = distill(loaded, plan, self.batches, config, checkpoint_dir=self.out / f"distill-{row.budget:g}",
                         progress=self.progress)
        moe = MoEModel(loaded=loaded, plan=plan).configure(RuntimeConfig())
        moe.save(self.out / f"plan-distilled-{row.budget:g}", overwrite=True)
        self.record(row, moe, lambda: ffn_flops_fraction(moe.model), moe_layers(moe.model)[0].top_k,
                    distillation=report.summary())

    # ---- the CATS-style peer ---------------------------------------------------------------------------
    def cats_row(self, row: _Row) -> None:
        from moefy.calibrate import calibrate_blockwise
        from moefy.neuron_selection import install_neuron_selection, neuron_selection_flops_fraction

        samples = [c.sample_x for c in calibrate_blockwise(
            self.dense.model, self.dense.spec, self.batches, sample_size=CATS_SAMPLE_SIZE, sequential=False,
            seed=self.spec.config.seed)]
        peer = self.fresh_model()
        try:
            layers = install_neuron_selection(peer.model, peer.spec, samples, method="cats", budget=row.budget)
        except InvalidArgumentError as e:  # the full gate (or first projection) alone costs more than the budget
            entry = {"key": row.key, "method": row.method, "label": LABELS[row.method], "budget": row.budget,
                     "top_k": None, "ffn_flops_fraction": None, "metrics": [], "note": f"infeasible: {e}"}
            self.results.add(entry)
            if self.on_row is not None:
                self.on_row(entry)
            return
        self.record(row, peer, lambda: neuron_selection_flops_fraction(layers), None)


# ---- tables ---------------------------------------------------------------------------------------------
def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(metric, task) of every metric the rows hold, in first-seen order (acc_norm left to the JSON)."""
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        for m in r.get("metrics", []):
            if m["metric"] != "acc_norm":
                seen.setdefault((m["metric"], m["task"]), None)
    return list(seen)


def _header(metric: str, task: str, rows: list[dict]) -> str:
    m = next(m for r in rows for m in r.get("metrics", []) if (m["metric"], m["task"]) == (metric, task))
    what = {"perplexity": "ppl", "acc": "acc", "embedding_fidelity": "fidelity", "retrieval_acc": "retrieval acc"}[metric]
    return f"{task} {what} (n={m['n']} {m['unit']})"


def _cell(row: dict, dense: dict | None, metric: str, task: str) -> str:
    m = next((m for m in row.get("metrics", []) if (m["metric"], m["task"]) == (metric, task)), None)
    if m is None:
        return "n/a"
    text = f"{m['value']:.2f}" if metric == "perplexity" else f"{m['value']:.3f}"
    ref = None if dense is None or row is dense else next(
        (d for d in dense.get("metrics", []) if (d["metric"], d["task"]) == (metric, task)), None)
    if metric == "perplexity" and ref is not None:
        text += f" ({100 * (m['value'] / ref['value'] - 1):+.0f}%)"
    if m["ci95"] is not None:
        lo, hi = m["ci95"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    return text


def table_cells(rows: list[dict], dense: dict | None) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of one table: method, budget, k, FFN FLOPs, relative performance, then one
    column per metric (value, change against dense for perplexity, [95% interval])."""
    cols = _columns([dense] + rows if dense is not None and dense not in rows else rows)
    head = ["method", "budget", "k", "FFN FLOPs", "rel. perf."] + [_header(m, t, rows + ([dense] if dense else [])) for m, t in cols]
    body = []
    for r in rows:
        rel = relative_performance(r, dense) if dense is not None else None
        frac = r.get("ffn_flops_fraction")
        label = LABELS[r["method"]] + (f", {r['importance']}" if r.get("importance") else "")
        cells = [label, f"{r['budget']:.0%}", "-" if r.get("top_k") is None else str(r["top_k"]),
                 "-" if frac is None else f"{frac:.3f}", "-" if rel is None else f"{rel:.1%}"]
        if r.get("note"):
            cells += [r["note"].split(":")[0]] * len(cols)
        else:
            cells += [_cell(r, dense, m, t) for m, t in cols]
        body.append(cells)
    return head, body


def markdown_table(rows: list[dict], dense: dict | None) -> str:
    head, body = table_cells(rows, dense)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body])


def tables(payload: dict) -> dict[str, list[dict]]:
    """The rows of Tables 1/2 and of Table 3, by title."""
    rows = payload["rows"]
    return {"Tables 1/2: methods at each FFN budget": [r for r in rows if r["method"] in TABLE_12],
            "Table 3: expert selection (mean representatives, same experts)":
                [r for r in rows if r["method"] in TABLE_3 or r["method"] == "dense"]}


def settings_line(payload: dict) -> str:
    spec, env = payload["spec"], payload.get("environment", {})
    threads = env.get("torch_threads", "?")
    return (f"CPU {env.get('cpu', '?')}, {threads} torch thread{'' if threads == 1 else 's'}, torch {env.get('torch', '?')}; "
            f"{spec['eval_sequences']} windows of 256 tokens per held-out split; task limit {spec['limit'] or 'none'}; "
            f"{spec['config']['num_experts']} experts, {spec['config']['shared_fraction']:.0%} shared, "
            f"distillation {spec['config']['distill_steps'] if spec['config']['distill'] else 0} steps. "
            "Cells: value, change against dense for perplexity, [95% interval]. rel. perf. = mean over tasks of "
            "accuracy / dense accuracy.")


def markdown(payload: dict) -> str:
    """Table 1/2 (methods × budgets) and Table 3 (expert selection), with the settings they ran at."""
    dense = next((r for r in payload["rows"] if r["method"] == "dense"), None)
    parts = [f"# moefy compare: {payload['spec']['model']}", "", settings_line(payload), ""]
    for title, rows in tables(payload).items():
        parts += [f"## {title}", "", markdown_table(rows, dense), ""]
    if not payload.get("complete", True):
        parts.append("(incomplete: run the same command again to finish the grid)\n")
    return "\n".join(parts)


def _save_plot(payload: dict, path: Path) -> None:
    from moefy.errors import MissingDependencyError
    from moefy.plots import fig_compare, save_png

    try:
        save_png(fig_compare(payload), path)
    except MissingDependencyError as e:
        log.warning("no plot: %s", e)


__all__ = ["CompareSpec", "DEFAULT_BUDGETS", "LABELS", "METHODS", "markdown", "relative_performance", "row_key", "run_compare"]
