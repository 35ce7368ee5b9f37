"""Generation fidelity: does a converted model still *write* what its dense model writes?

Multiple-choice scores can stay flat while generated text degrades, so moefy also compares greedy
continuations of a fixed prompt set (``moefy/data/tasks/generation_prompts.json``: English prose,
code, questions, other languages) between a model and its dense reference:

* ``identical_share``: the share of the first N generated tokens (N=32 by default) that are the
  same token at the same position in both continuations;
* ``first_divergence``: the position (0-based) of the first differing token, None when all N agree;
* ``teacher_forced_agreement``: the share of positions at which the model's greedy next token,
  given the *reference's* continuation so far, is the reference's token (free of the compounding
  of one early divergence);
* a few samples side by side.

Decoding is plain greedy for exactly N tokens (an end-of-sequence token does not stop it), so the
two continuations are always compared over the same length. For a converted model the reference is
the same model with every expert selected (``selection="all"``), which computes exactly the dense
FFN; its runtime settings are restored afterwards.

    from moefy.generation import generation_fidelity
    report = generation_fidelity(moefy.load("runs/smol-moe"))      # a JSON-able dict
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moefy.errors import InvalidArgumentError

NEW_TOKENS = 32


def default_prompts() -> list[dict]:
    """The shipped prompt set: ``[{"id", "kind", "prompt"}, ...]``."""
    path = Path(str(resources.files("moefy") / "data" / "tasks" / "generation_prompts.json"))
    return json.loads(path.read_text(encoding="utf-8"))["prompts"]


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = list(tokenizer(prompt)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not ids or (bos is not None and ids == [bos]):
        raise InvalidArgumentError(f"the prompt {prompt!r} has no tokens")
    return ids


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompt_ids: Sequence[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """Exactly `new_tokens` greedy tokens after `prompt_ids` (KV cache; EOS does not stop it)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    # the KV cache argument is `cache` in newer transformers, `past_key_values` before
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    past = None
    step = ids
    for _ in range(new_tokens):
        res = model(input_ids=step, use_cache=True, **{key: past})
        past = getattr(res, key)
        nxt = int(res.logits[0, -1].float().argmax())
        out.append(nxt)
        step = torch.tensor([[nxt]], device=device)
    return out


@torch.no_grad()
def teacher_forced_agreement(model: nn.Module, prompt_ids: Sequence[int], reference_tokens: Sequence[int]) -> float:
    """Share of positions where the model's argmax next token, given the prompt and the reference's
    tokens so far, equals the reference's token."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(reference_tokens)], device=device)
    logits = model(input_ids=ids).logits[0].float()
    n, p = len(reference_tokens), len(prompt_ids)
    pred = logits[p - 1 : p - 1 + n].argmax(-1).cpu()
    return float((pred == torch.tensor(list(reference_tokens))).float().mean())


def compare_tokens(tokens: Sequence[int], reference: Sequence[int]) -> dict:
    """identical_share and first_divergence of two token sequences of the same length."""
    if len(tokens) != len(reference):
        raise InvalidArgumentError(f"cannot compare {len(tokens)} tokens with {len(reference)}")
    same = [a == b for a, b in zip(tokens, reference, strict=True)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return {"identical_share": sum(same) / max(1, len(same)), "first_divergence": first}


def generation_fidelity(
    target: Any, *, reference: Any = None, prompts: Sequence[dict | str] | None = None, new_tokens: int = NEW_TOKENS,
    samples: int = 4, progress: bool = False,
) -> dict:
    """Greedy continuations of `prompts` (default: the shipped set) by `target` (an `MoEModel` or a
    `LoadedModel`) against its dense reference: per prompt and on average, identical-token share,
    first divergence and teacher-forced agreement, plus `samples` prompts side by side (decoded).
    `reference` (a `LoadedModel` or model sharing the tokenizer) defaults, for a converted model, to
    itself with every expert selected; a dense model without one is its own reference (1.0)."""
    from moefy.moe_model import MoEModel

    if new_tokens < 1:
        raise InvalidArgumentError(f"--new-tokens {new_tokens} must be at least 1")
    loaded = getattr(target, "loaded", target)
    if hasattr(loaded, "is_causal") and not loaded.is_causal:
        raise InvalidArgumentError(f"{loaded.name}: generation fidelity needs a causal LM, not an encoder")
    tokenizer, model = loaded.tokenizer, loaded.model
    items = [p if isinstance(p, dict) else {"id": f"p{i}", "kind": "", "prompt": p}
             for i, p in enumerate(prompts if prompts is not None else default_prompts())]
    if not items:
        raise InvalidArgumentError("no prompts to generate from")
    if reference is not None:
        how = f"given reference ({getattr(reference, 'name', type(reference).__name__)})"
    elif isinstance(target, MoEModel):
        how = "the same model with every expert selected (the dense FFN)"
    else:
        how = "itself (a dense model)"
    rows = []
    for item in tqdm(items, desc="generation", disable=not progress, leave=False):
        ids = _prompt_ids(tokenizer, item["prompt"])
        if reference is not None:
            ref = greedy_tokens(getattr(reference, "model", reference), ids, new_tokens)
        elif isinstance(target, MoEModel):
            saved = target.runtime
            target.configure(saved.replace(selection="all"))
            try:
                ref = greedy_tokens(model, ids, new_tokens)
            finally:
                target.configure(saved)
        else:
            ref = greedy_tokens(model, ids, new_tokens)
        self_reference = reference is None and not isinstance(target, MoEModel)
        got = ref if self_reference else greedy_tokens(model, ids, new_tokens)
        forced = 1.0 if self_reference else teacher_forced_agreement(model, ids, ref)
        rows.append({"id": item.get("id"), "kind": item.get("kind", ""), **compare_tokens(got, ref),
                     "teacher_forced_agreement": forced, "prompt": item["prompt"],
                     "reference": tokenizer.decode(ref), "output": tokenizer.decode(got)})
    n = len(rows)
    divergences = [r["first_divergence"] for r in rows]
    summary = {
        "prompts": n, "new_tokens": new_tokens,
        "identical_share": sum(r["identical_share"] for r in rows) / n,
        "teacher_forced_agreement": sum(r["teacher_forced_agreement"] for r in rows) / n,
        "fully_identical": sum(d is None for d in divergences) / n,
        "median_first_divergence": _median([new_tokens if d is None else d for d in divergences]),
    }
    return {
        "model": getattr(loaded, "name", type(model).__name__),
        "reference": how,
        "summary": summary,
        "per_prompt": [{k: v for k, v in r.items() if k not in ("reference", "output")} for r in rows],
        "samples": [{k: r[k] for k in ("id", "kind", "prompt", "reference", "output", "first_divergence")}
                    for r in rows[: max(0, samples)]],
    }


def print_report(result: dict, width: int = 60) -> None:
    """The summary, one row per prompt, and the samples side by side (reference | output)."""
    from moefy.cli.output import print_table

    print(f"generation fidelity vs {result['reference']}:")
    print_table([{k: v for k, v in result["summary"].items()}])
    print()
    print_table([{"prompt": r["id"], "kind": r["kind"], "identical": r["identical_share"],
                  "first divergence": r["first_divergence"], "teacher-forced": r["teacher_forced_agreement"]}
                 for r in result["per_prompt"]])
    for s in result["samples"]:
        print()
        print(f"[{s['id']}] {_one_line(s['prompt'], width * 2)}")
        print(f"  reference: {_one_line(s['reference'], width * 2)}")
        print(f"  output:    {_one_line(s['output'], width * 2)}")


def _one_line(text: str, width: int) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _median(values: list[int]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


__all__ = [
    "compare_tokens", "default_prompts", "generation_fidelity", "greedy_tokens", "print_report", "teacher_forced_agreement",
]
