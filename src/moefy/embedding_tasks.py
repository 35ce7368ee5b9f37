"""Labelled zero-shot tasks for sentence encoders (all-MiniLM-L6-v2 and the like), from the real
multiple-choice data moefy ships (``moefy/data/tasks``, BIG-bench, Apache-2.0).

An encoder cannot score continuations, but it can rank choices by meaning: embed the question's
*query* and every choice (mean-pooled, L2-normalised, as sentence-transformers does) and pick the
choice of highest cosine similarity. Accuracy against the task's human gold labels, with a 95%
Wilson interval and the sample count, dense vs converted:

* ``bb_phrase_relatedness``: query = the word or phrase, choices = four phrases, gold = the most
  related one (a labelled semantic-similarity task: what sentence embeddings are for);
* ``bb_movie_recommendation``: query = the four liked movies' titles, gold = the similar movie;
* ``bb_general_knowledge``: query = the question, gold = its answer (retrieval of an answer).

    from moefy.embedding_tasks import evaluate_embedding_tasks
    result = evaluate_embedding_tasks(moefy.load("minilm-l6"), EMBEDDING_TASKS)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from moefy.errors import InvalidArgumentError
from moefy.evaluate import sentence_embeddings
from moefy.tasks import MCTask, load_task, wilson_interval

EMBEDDING_TASKS = ("bb_phrase_relatedness", "bb_movie_recommendation", "bb_general_knowledge")
_QUERY = (re.compile(r"Q: (.*)\nA:\s*$", re.S), re.compile(r"^Find a movie similar to (.*?):?\s*$", re.S))


def query_of(context: str) -> str:
    """The query of a multiple-choice context: the question after the last ``Q: `` (before
    ``\\nA:``), the movie list of a movie recommendation, else the context itself."""
    for pattern in _QUERY:
        m = pattern.search(context)
        if m:
            return m.group(1).rsplit("Q: ", 1)[-1].strip()
    return context.strip()


def check_embedding_tasks(names: Sequence[str]) -> None:
    """Every name is a task an encoder can be judged on (raises naming the valid ones)."""
    bad = [n for n in names if n not in EMBEDDING_TASKS]
    if bad:
        raise InvalidArgumentError(
            f"--tasks {','.join(bad)}: not a labelled task for an encoder; valid: {', '.join(EMBEDDING_TASKS)}"
        )


@torch.no_grad()
def evaluate_embedding_task(model: torch.nn.Module, tokenizer: Any, task: MCTask, batch_size: int = 32) -> dict:
    """Accuracy (95% Wilson interval, sample count, chance) of picking the gold choice by cosine
    similarity to the query's embedding."""
    queries = [query_of(e.context) for e in task.examples]
    if any(not q for q in queries):
        raise InvalidArgumentError(f"task {task.name!r} has an example without a query; encoders need one")
    texts = sorted({c for e in task.examples for c in e.choices})
    index = {t: i for i, t in enumerate(texts)}
    q = sentence_embeddings(model, tokenizer, queries, batch_size)  # (N, D)
    c = sentence_embeddings(model, tokenizer, texts, batch_size)  # (C, D)
    correct = 0
    for i, e in enumerate(task.examples):
        sims = c[[index[t] for t in e.choices]] @ q[i]  # (choices,)
        correct += int(sims.argmax()) == e.gold
    n = len(task.examples)
    return {"task": task.name, "split": task.split, "n": n, "chance": task.chance, "acc": correct / n,
            "acc_ci95": list(wilson_interval(correct, n))}


def evaluate_embedding_tasks(target: Any, names: Sequence[str], *, limit: int | None = None) -> dict:
    """`evaluate_embedding_task` on a dense `LoadedModel` or an `MoEModel`, one row per task."""
    check_embedding_tasks(names)
    loaded = getattr(target, "loaded", target)
    rows = [evaluate_embedding_task(loaded.model, loaded.tokenizer, load_task(n, limit)) for n in names]
    return {"evaluator": "moefy embedding similarity", "tasks": rows}


__all__ = ["EMBEDDING_TASKS", "check_embedding_tasks", "evaluate_embedding_task", "evaluate_embedding_tasks", "query_of"]
