"""Text categories for expert specialisation: the bundled multilingual dialog text (21
languages, chatterbot-corpus, BSD; see data/README.md), plus English prose and Python code from
the bundled evaluation splits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from moefy.text import bundled_text

from .store import AnalysisError

CODE_FAMILY = "Code (Python)"
PROSE = "English prose"
CODE = "Python code"


@dataclass(frozen=True)
class TextCategory:
    name: str  # e.g. "French", "Python code"
    family: str  # e.g. "Romance"
    text: str


def multilingual_source() -> dict[str, str]:
    """Where the multilingual text comes from, and its licence."""
    data = _multilingual()
    return {"source": data["source"], "licence": data["licence"]}


def _multilingual() -> dict:
    raw = resources.files("moefy.data").joinpath("multilingual.json").read_text(encoding="utf-8")
    return json.loads(raw)


def text_categories(languages: list[str] | None = None, *, prose: bool = True, code: bool = True) -> list[TextCategory]:
    """The categories to compare: languages (default all bundled), English prose, Python code."""
    table = _multilingual()["languages"]
    names = list(table) if languages is None else languages
    unknown = [n for n in names if n not in table]
    if unknown:
        raise AnalysisError(f"no bundled text for language(s) {unknown}; known: {', '.join(table)}")
    cats = [TextCategory(n, table[n]["family"], table[n]["text"]) for n in names]
    if prose:
        cats.append(TextCategory(PROSE, "Germanic", bundled_text("english", "evaluation")))
    if code:
        cats.append(TextCategory(CODE, CODE_FAMILY, bundled_text("code", "evaluation")))
    return cats
