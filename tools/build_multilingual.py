"""Rebuild src/moefy/data/multilingual.json (run once by a maintainer, not at run time).

Source: the `chatterbot-corpus` package on PyPI (version 1.3.3; licence BSD, user-contributed
dialog text, (c) Gunther Cox and contributors). Install it, or unpack its wheel, and run

    pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cbc && unzip /tmp/cbc/*.whl -d /tmp/cbc/x
    python tools/build_multilingual.py /tmp/cbc/x/chatterbot_corpus/data

Needs PyYAML. For each language: every dialog line of every file (files in name order), each
distinct line once, in order, cut at MAX_CHARS characters on a line boundary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "moefy" / "data" / "multilingual.json"
MAX_CHARS = 4000

# corpus folder -> (language, family). Families follow Glottolog's top-level groupings
# (Indo-European split into its branches, as in the G-MoEfication paper's Figure 5).
LANGUAGES: dict[str, tuple[str, str]] = {
    "english": ("English", "Germanic"),
    "german": ("German", "Germanic"),
    "dutch": ("Dutch", "Germanic"),
    "swedish": ("Swedish", "Germanic"),
    "french": ("French", "Romance"),
    "spanish": ("Spanish", "Romance"),
    "italian": ("Italian", "Romance"),
    "portuguese": ("Portuguese", "Romance"),
    "russian": ("Russian", "Slavic"),
    "ukrainian": ("Ukrainian", "Slavic"),
    "hindi": ("Hindi", "Indo-Iranian"),
    "bengali": ("Bengali", "Indo-Iranian"),
    "marathi": ("Marathi", "Indo-Iranian"),
    "persian": ("Persian", "Indo-Iranian"),
    "tamil": ("Tamil", "Dravidian"),
    "turkish": ("Turkish", "Turkic"),
    "hebrew": ("Hebrew", "Semitic"),
    "chinese": ("Chinese", "Sino-Tibetan"),
    "japanese": ("Japanese", "Japonic"),
    "korean": ("Korean", "Koreanic"),
    "indonesian": ("Indonesian", "Austronesian"),
}


def _lines(node: object) -> list[str]:
    if isinstance(node, str):
        return [node.strip()]
    if isinstance(node, list):
        return [line for item in node for line in _lines(item)]
    return []


def language_text(folder: Path) -> str:
    seen: set[str] = set()
    out: list[str] = []
    size = 0
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for line in _lines(data.get("conversations", [])):
            if not line or line in seen:
                continue
            if size + len(line) + 1 > MAX_CHARS:
                return "\n".join(out)
            seen.add(line)
            out.append(line)
            size += len(line) + 1
    return "\n".join(out)


def main(root: str) -> None:
    data = Path(root)
    languages = {}
    for folder, (name, family) in LANGUAGES.items():
        text = language_text(data / folder)
        languages[name] = {"family": family, "text": text}
        print(f"{name:12s} {family:14s} {len(text):5d} chars")
    payload = {
        "source": "chatterbot-corpus 1.3.3 (PyPI), https://github.com/gunthercox/chatterbot-corpus",
        "licence": "BSD (as declared by the package); user-contributed; (c) Gunther Cox and contributors",
        "languages": languages,
    }
    OUT.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cbc/x/chatterbot_corpus/data")
