"""Rebuild the bundled multilingual prose in src/moefy/data/ (run once by a maintainer, not at run time).

Two genres, from Debian packages (fetch them with `apt-get download PKG` and unpack with
`dpkg-deb -x PKG.deb DIR`, all into one DIR):

* technical prose, the *Debian Reference* (Osamu Aoki et al., GPL-2+) in German, French, Spanish,
  Italian and Portuguese (`debian-reference-de|fr|es|it|pt`): the paragraphs of chapters 1-6
  become the calibration split `<language>_calibration.txt`, those of chapters 7-12 the held-out
  evaluation split `<language>_evaluation.txt` (disjoint documents);
* quotations and anecdotes (fortune cookies), never used for calibration: German
  (`fortunes-de`, GPL-2+), Spanish (`fortunes-es`, "presumed to be in the public domain"),
  Italian (`fortunes-it`, public domain), Brazilian Portuguese (`fortunes-br`, GPL-2+), Russian
  (`fortunes-ru`, GPL-2) and Polish (`fortunes-pl`, GPL-2+): `quotes.json`, a held-out genre (and,
  for Russian and Polish, languages) that no calibration split contains.

    python tools/build_multilingual_prose.py DIR
"""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "moefy" / "data"
LANGUAGES = {"de": "german", "fr": "french", "es": "spanish", "it": "italian", "pt": "portuguese"}
CALIBRATION_CHAPTERS = [f"ch{i:02d}" for i in range(1, 7)]
EVALUATION_CHAPTERS = [f"ch{i:02d}" for i in range(7, 13)]
QUOTES_CHARS = 16000  # per language, enough for ~16 windows of 256 tokens
# (language, package, files under usr/share/games/fortunes/): quotation / anecdote files only
QUOTE_FILES = {
    "German": ("fortunes-de", "GPL-2+", ["de/zitate", "de/anekdoten", "de/sprichworte", "de/letzteworte"]),
    "Spanish": ("fortunes-es", "public domain (as the package presumes)",
                ["es/filosofia.fortunes", "es/sabiduria.fortunes", "es/vida.fortunes", "es/ciencia.fortunes",
                 "es/arte.fortunes", "es/libertad.fortunes"]),
    "Italian": ("fortunes-it", "public domain (as the package declares)", ["it/italia", "it/leggi", "it/definizioni"]),
    "Portuguese": ("fortunes-br", "GPL-2+", ["brasil"]),
    "Russian": ("fortunes-ru", "GPL-2", ["ru/book", "ru/citates", "ru/knowledge", "ru/life", "ru/truth", "ru/time"]),
    "Polish": ("fortunes-pl", "GPL-2+", ["pl/seneka", "pl/nauka", "pl/pratchett", "pl/zen", "pl/misc"]),
}


class _Paragraphs(HTMLParser):
    """The text of every <p> element, with <pre>/<code>/<table> content left out."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.skip = 0
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "p":
            self.depth += 1
            self.buf = []
        elif tag in ("pre", "code", "table"):
            self.skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "code", "table"):
            self.skip = max(0, self.skip - 1)
        elif tag == "p" and self.depth:
            self.depth -= 1
            self.paragraphs.append(" ".join("".join(self.buf).split()))

    def handle_data(self, data: str) -> None:
        if self.depth and not self.skip:
            self.buf.append(data)


def _prose(text: str, min_chars: int, min_letters: float) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return len(text) >= min_chars and letters / len(text) >= min_letters


def reference_paragraphs(root: Path, lang: str, chapters: list[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for ch in chapters:
        parser = _Paragraphs()
        parser.feed((root / "usr/share/debian-reference" / f"{ch}.{lang}.html").read_text(encoding="utf-8"))
        for p in parser.paragraphs:
            if _prose(p, 150, 0.88) and p not in seen:
                seen.add(p)
                out.append(p)
    return out


def fortunes(root: Path, files: list[str]) -> str:
    """Round-robin over the files' cookies (prose-like ones only) up to QUOTES_CHARS characters."""
    per_file = []
    for f in files:
        raw = (root / "usr/share/games/fortunes" / f).read_text(encoding="utf-8", errors="strict")
        cookies = [c.strip("\n") for c in raw.split("\n%\n")]
        per_file.append([c for c in cookies if _prose(" ".join(c.split()), 80, 0.8)])
    picked: list[str] = []
    total = 0
    for i in range(max(map(len, per_file))):
        for cookies in per_file:
            if i < len(cookies) and total < QUOTES_CHARS:
                picked.append(cookies[i])
                total += len(cookies[i]) + 2
    return "\n\n".join(picked)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = Path(sys.argv[1])
    for code, name in LANGUAGES.items():
        cal = reference_paragraphs(root, code, CALIBRATION_CHAPTERS)
        ev = reference_paragraphs(root, code, EVALUATION_CHAPTERS)
        (OUT / f"{name}_calibration.txt").write_text("\n\n".join(cal) + "\n", encoding="utf-8")
        (OUT / f"{name}_evaluation.txt").write_text("\n\n".join(ev) + "\n", encoding="utf-8")
        print(f"{name}: {len(cal)} calibration / {len(ev)} evaluation paragraphs")
    languages = {
        lang: {"package": pkg, "licence": lic, "files": files, "text": fortunes(root, files)}
        for lang, (pkg, lic, files) in QUOTE_FILES.items()
    }
    doc = {
        "source": "Debian fortune-cookie packages (fortunes-de, -es, -it, -br, -ru, -pl); quotations and anecdotes",
        "licence": "per language, as each package's debian/copyright declares (see 'licence')",
        "languages": languages,
    }
    (OUT / "quotes.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print("quotes:", {k: len(v["text"]) for k, v in languages.items()})


if __name__ == "__main__":
    main()
