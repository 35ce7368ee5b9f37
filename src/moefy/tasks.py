"""Zero-shot multiple-choice evaluation of a causal LM (dense or converted), as lm-evaluation-harness
scores it, and the real task data moefy ships for it offline.

Each example is a context and a list of choices. The model scores every choice as a continuation
of the context: the sum of the log-probabilities of the continuation's tokens (``target_delimiter``
+ choice, the delimiter a space by default). As the harness (``lm_eval.api.task.ConfigurableTask
.process_results`` and ``lm_eval.api.model.TemplateLM._encode_pair``, v0.4):

* **acc** = the choice with the largest log-likelihood is the gold one;
* **acc_norm** = the same after dividing each log-likelihood by the choice's length in characters
  (``len(choice)``, without the delimiter; ties go to the first choice, as ``np.argmax``);
* tokens: trailing whitespace of the context moves to the continuation; the context is encoded
  alone and ``context + continuation`` together, the continuation's tokens being what the whole
  encoding has past the context's (so a tokenizer that adds BOS puts it once, before the context,
  and only continuation tokens are scored); an empty context is replaced by the BOS (else EOS)
  token; sequences longer than the model's context are cut from the left.

Accuracy comes with a 95% Wilson score interval and the sample count.

    from moefy.tasks import load_task, evaluate_tasks
    result = evaluate_tasks(moefy.load("smollm2-135m"), ["bb_cause_and_effect"])

The tasks shipped under ``moefy/data/tasks/`` (see its README for sources and licences) are listed
by :func:`available_tasks`; :func:`run_harness` runs the same tasks through lm-evaluation-harness's
own runner (optional extra ``moefy[eval]``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moefy.errors import EvaluationError, InvalidArgumentError, MissingDependencyError

log = logging.getLogger(__name__)

TASK_PREFIX = "moefy_"  # the harness's name for a shipped task: moefy_<name>
Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ---- data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question: the gold choice is ``choices[gold]``."""

    context: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise InvalidArgumentError(f"a multiple-choice example needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.gold < len(self.choices):
            raise InvalidArgumentError(f"gold index {self.gold} is outside the {len(self.choices)} choices")


@dataclass
class MCTask:
    """A multiple-choice task: its examples, the delimiter between context and choice, and where the
    data came from."""

    name: str
    examples: list[MCExample]
    target_delimiter: str = " "
    description: str = ""
    source: str = ""
    licence: str = ""
    split: str = ""
    path: Path | None = None  # the JSONL file it was read from (the harness reads the same file)
    meta: dict = field(default_factory=dict)

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess."""
        return sum(1 / len(e.choices) for e in self.examples) / max(1, len(self.examples))

    def head(self, limit: int | None) -> MCTask:
        """The first `limit` examples (all with None)."""
        if limit is None:
            return self
        return MCTask(**{**self.__dict__, "examples": self.examples[:limit]})


def _tasks_dir() -> Path:
    return Path(str(resources.files("moefy") / "data" / "tasks"))


def _index() -> dict[str, dict]:
    return json.loads((_tasks_dir() / "tasks.json").read_text(encoding="utf-8"))["tasks"]


def available_tasks() -> list[str]:
    """Names of the multiple-choice tasks moefy ships (usable offline)."""
    return sorted(_index())


def read_jsonl(path: str | Path) -> list[MCExample]:
    """Examples from a JSONL file of ``{"context": str, "choices": [str, ...], "gold": int}`` lines."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(MCExample(str(d["context"]), tuple(str(c) for c in d["choices"]), int(d["gold"])))
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidArgumentError(f"{path}:{n}: not a multiple-choice example ({e})") from None
    if not out:
        raise InvalidArgumentError(f"{path} holds no examples")
    return out


def load_task(name: str, limit: int | None = None) -> MCTask:
    """A shipped task by name (``moefy_`` prefix optional), or a JSONL file of examples."""
    index = _index()
    key = name[len(TASK_PREFIX):] if name.startswith(TASK_PREFIX) else name
    if key in index:
        meta = index[key]
        path = _tasks_dir() / meta["file"]
        task = MCTask(
            name=key, examples=read_jsonl(path), target_delimiter=meta.get("target_delimiter", " "),
            description=meta.get("description", ""), source=meta.get("source", ""), licence=meta.get("licence", ""),
            split=meta.get("split", ""), path=path, meta=meta,
        )
    elif name.endswith(".jsonl") and Path(name).is_file():
        task = MCTask(name=Path(name).stem, examples=read_jsonl(name), path=Path(name).resolve())
    else:
        raise InvalidArgumentError(
            f"--tasks {name!r}: not a task moefy ships ({', '.join(sorted(index))}) nor a .jsonl file of examples"
        )
    return task.head(limit)


# ---- scoring --------------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    """The tokenizer's default special tokens (BOS where it adds one), none if `text` already starts
    with the BOS string (as the harness's ``tok_encode``)."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def _prefix_token_id(tokenizer: Any) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise InvalidArgumentError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
    return int(tid)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness splits them for a causal LM."""
    if context == "":
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _max_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and 0 < v < 1_000_000:
            return v
    return 2048


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context, batched (longest first,
    right padding, so no real token sees a pad)."""
    max_len = _max_length(model)
    device = next(model.parameters()).device
    rows = []  # (index, input ids, number of scored tokens, continuation ids)
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise InvalidArgumentError(f"the continuation {continuation!r} has no tokens of its own")
        if len(cont) > max_len:
            raise InvalidArgumentError(f"a continuation of {len(cont)} tokens exceeds the model's context of {max_len}")
        inp = (ctx + cont)[-(max_len + 1):][:-1]
        rows.append((i, inp, cont))
    rows.sort(key=lambda r: -len(r[1]))
    out = [0.0] * len(rows)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc="log-likelihoods", disable=not progress, leave=False):
        width = max(len(r[1]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (_, inp, _) in enumerate(batch):
            ids[b, : len(inp)] = torch.tensor(inp)
            mask[b, : len(inp)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for b, (i, inp, cont) in enumerate(batch):
            n = len(cont)
            rows_logp = logp[b, len(inp) - n : len(inp)]  # the positions that predict the continuation
            out[i] = float(rows_logp.gather(-1, torch.tensor(cont, device=rows_logp.device).unsqueeze(-1)).sum())
    if not all(math.isfinite(x) for x in out):
        raise EvaluationError("the model's log-likelihoods are not finite (NaN or inf logits): its weights or plan are corrupt")
    return out


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best  # the first maximum, as np.argmax


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(raw prediction, length-normalised prediction) for one example: argmax of the
    log-likelihoods, and of the log-likelihoods divided by each choice's character length."""
    return _argmax(lls), _argmax([ll / max(1, len(c)) for ll, c in zip(lls, choices, strict=True)])


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (no rounding past 0 or 1)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def evaluate_task(
    model: nn.Module, tokenizer: Any, task: MCTask, *, batch_size: int = 16, progress: bool = False,
    keep_predictions: bool = False,
) -> dict:
    """acc and acc_norm (with 95% Wilson intervals), the sample count and chance, of one task."""
    requests = [(e.context, task.target_delimiter + c) for e in task.examples for c in e.choices]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    correct = correct_norm = 0
    per_example = []
    k = 0
    for e in task.examples:
        ex_lls = lls[k : k + len(e.choices)]
        k += len(e.choices)
        pred, pred_norm = predictions(ex_lls, e.choices)
        correct += pred == e.gold
        correct_norm += pred_norm == e.gold
        if keep_predictions:
            per_example.append({"lls": ex_lls, "pred": pred, "pred_norm": pred_norm, "gold": e.gold})
    n = len(task.examples)
    result: dict = {
        "task": task.name, "split": task.split, "n": n, "chance": task.chance,
        "acc": correct / n, "acc_ci95": list(wilson_interval(correct, n)),
        "acc_norm": correct_norm / n, "acc_norm_ci95": list(wilson_interval(correct_norm, n)),
    }
    if keep_predictions:
        result["examples"] = per_example
    return result


def _model_and_tokenizer(target: Any) -> tuple[nn.Module, Any]:
    loaded = getattr(target, "loaded", target)  # MoEModel -> LoadedModel
    if not getattr(loaded, "is_causal", True):
        raise InvalidArgumentError(f"{loaded.name}: multiple-choice tasks need a causal LM, not an encoder")
    return loaded.model, loaded.tokenizer


def evaluate_tasks(
    target: Any, tasks: Sequence[str | MCTask], *, limit: int | None = None, batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """The built-in evaluator on a dense `LoadedModel` or an `MoEModel`: one row per task."""
    model, tokenizer = _model_and_tokenizer(target)
    rows = []
    for t in tasks:
        task = t.head(limit) if isinstance(t, MCTask) else load_task(t, limit)
        rows.append(evaluate_task(model, tokenizer, task, batch_size=batch_size, progress=progress))
    return {"evaluator": "moefy", "tasks": rows}


# ---- lm-evaluation-harness ------------------------------------------------------------------------
HARNESS_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: {delimiter}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def harness_task_yaml(task: MCTask) -> str:
    """A local lm-evaluation-harness task definition (``moefy_<name>``) that reads the task's JSONL."""
    if task.path is None:
        raise InvalidArgumentError(f"task {task.name!r} has no file for the harness to read")
    return HARNESS_YAML.format(task=TASK_PREFIX + task.name, path=json.dumps(str(task.path)),
                               delimiter=json.dumps(task.target_delimiter))


def harness_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_harness(
    target: Any, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 16,
) -> dict:
    """lm-evaluation-harness's own runner (``lm_eval.simple_evaluate``) on the model in memory via
    ``HFLM(pretrained=model, tokenizer=tokenizer)``. moefy's shipped tasks run offline from local
    task definitions (``moefy_<name>``); any other name is one of the harness's own tasks (which
    fetch their data, so they need network access)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependencyError("lm-eval", "--harness (lm-evaluation-harness)", extra="eval") from None
    model, tokenizer = _model_and_tokenizer(target)
    shipped = set(available_tasks())
    names, local = [], []
    for t in tasks:
        key = t[len(TASK_PREFIX):] if t.startswith(TASK_PREFIX) else t
        if key in shipped:
            local.append(load_task(key))
            names.append(TASK_PREFIX + key)
        else:
            names.append(t)
    with tempfile.TemporaryDirectory(prefix="moefy-tasks-") as tmp:
        for task in local:
            (Path(tmp) / f"{TASK_PREFIX}{task.name}.yaml").write_text(harness_task_yaml(task), encoding="utf-8")
        if local:
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local JSON file: never look for a hub copy
        # only moefy's tasks: skip indexing the harness's thousands of task definitions
        manager = TaskManager(include_path=tmp, include_defaults=len(local) < len(names)) if local else TaskManager()
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise InvalidArgumentError(f"--tasks {','.join(unknown)}: unknown to lm-evaluation-harness and to moefy")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=_max_length(model))
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=0,
                                      log_samples=False, bootstrap_iters=0)
    rows = []
    for name in names:
        r = out["results"][name]
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
        row: dict = {"task": name, "n": n}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in r:
                value = float(r[f"{metric},none"])
                row[metric] = value
                if n:
                    row[f"{metric}_ci95"] = list(wilson_interval(round(value * n), n))
        rows.append(row)
    return {"evaluator": "lm-evaluation-harness", "version": getattr(lm_eval, "__version__", "?"), "tasks": rows}


# ---- the CLI's view -------------------------------------------------------------------------------
def parse_task_list(value: str | None, *, harness: bool = False) -> list[str]:
    """``--tasks a,b,c`` checked before any model loads: shipped names and .jsonl files for the
    built-in evaluator; with the harness also any task the harness knows."""
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    if not names:
        raise InvalidArgumentError(f"--tasks {value!r}: give task names separated by commas ({', '.join(available_tasks())})")
    shipped = set(available_tasks())
    for n in names:
        key = n[len(TASK_PREFIX):] if n.startswith(TASK_PREFIX) else n
        if key in shipped:
            continue
        if harness:
            if n.endswith(".jsonl"):
                raise InvalidArgumentError(f"--tasks {n!r}: a .jsonl file runs with the built-in evaluator, not --harness")
            continue  # the harness's own task names are checked once it is imported
        if not (n.endswith(".jsonl") and Path(n).is_file()):
            raise InvalidArgumentError(
                f"--tasks {n!r}: not a task moefy ships ({', '.join(sorted(shipped))}) nor a .jsonl file of examples"
            )
    return names


def table_rows(result: dict) -> list[dict]:
    """One printable row per task: accuracy with its 95% interval, sample count and chance."""

    def ci(row: dict, key: str) -> str:
        v = row.get(f"{key}_ci95")
        return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else "-"

    return [{"task": r["task"], "n": r.get("n"), "chance": r.get("chance"), "acc": r.get("acc"), "acc 95% CI": ci(r, "acc"),
             "acc_norm": r.get("acc_norm"), "acc_norm 95% CI": ci(r, "acc_norm")} for r in result["tasks"]]


# ---- BIG-bench --------------------------------------------------------------------------------------
def bigbench_examples(task_json: str | Path, *, input_prefix: str = "Q: ", output_prefix: str = "\nA:") -> list[MCExample]:
    """Multiple-choice examples from a BIG-bench ``task.json`` (``target_scores``; the gold choice is
    the highest-scoring one), formatted as a zero-shot cloze: ``task_prefix + input_prefix + input
    + output_prefix``, each choice a continuation after a space."""
    data = json.loads(Path(task_json).read_text(encoding="utf-8"))
    prefix = str(data.get("task_prefix", ""))
    out = []
    for ex in data["examples"]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        gold = _argmax([float(scores[c]) for c in choices])
        out.append(MCExample(prefix + input_prefix + ex["input"].strip() + output_prefix, tuple(choices), gold))
    return out


__all__ = [
    "MCExample", "MCTask", "available_tasks", "bigbench_examples", "encode_pair", "evaluate_task", "evaluate_tasks",
    "harness_available", "harness_task_yaml", "load_task", "loglikelihoods", "parse_task_list", "predictions",
    "read_jsonl", "run_harness", "table_rows", "wilson_interval",
]
