"""Rebuild the bundled text corpus in src/moefy/data/ (run once by a maintainer, not at run time).

english: The Jargon File 4.4.7 (public domain), from Debian's `jargon-text` package.
code:    Python 3.11 standard-library modules (PSF License 2.0), from the local CPython.
Calibration and evaluation splits come from disjoint documents.
"""

from __future__ import annotations

import gzip
import re
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "moefy" / "data"
CODE_CALIBRATION = ["argparse", "textwrap", "heapq", "dataclasses", "functools", "shlex", "csv", "pprint", "string"]
CODE_EVALUATION = ["fractions", "statistics", "calendar", "gettext"]


def jargon_paragraphs() -> list[str]:
    raw = gzip.open("/usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8").read()
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        text = " ".join(line.strip() for line in block.splitlines()).strip()
        # prose only: long enough, mostly letters (drops headers, tables, ASCII art)
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if len(text) >= 200 and letters / len(text) > 0.85:
            paragraphs.append(text)
    return paragraphs


def main() -> None:
    paragraphs = jargon_paragraphs()
    # deterministic disjoint split: every 5th paragraph goes to evaluation
    evaluation = [p for i, p in enumerate(paragraphs) if i % 5 == 2]
    calibration = [p for i, p in enumerate(paragraphs) if i % 5 != 2]
    (OUT / "english_calibration.txt").write_text("\n\n".join(calibration[:900]) + "\n", encoding="utf-8")
    (OUT / "english_evaluation.txt").write_text("\n\n".join(evaluation[:300]) + "\n", encoding="utf-8")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name, modules in (("code_calibration", CODE_CALIBRATION), ("code_evaluation", CODE_EVALUATION)):
        docs = [(stdlib / f"{m}.py").read_text(encoding="utf-8") for m in modules]
        (OUT / f"{name}.txt").write_text("\n\n".join(docs), encoding="utf-8")
    print({p.name: p.stat().st_size for p in sorted(OUT.glob("*.txt"))}, file=sys.stderr)


if __name__ == "__main__":
    main()
