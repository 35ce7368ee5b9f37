"""What the CLI prints and writes: aligned tables, formatted numbers, atomic JSON files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from moefy.errors import InvalidArgumentError
from moefy.outputs import existing_parent


def fmt(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        if abs(v) >= 1e5:
            return f"{v:.3e}"
        return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4g}"
    return str(v)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows as an aligned text table (numbers right-aligned)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in columns]
    print("  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(columns, widths, numeric, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(row, widths, numeric, strict=True)))


def change(before: float, after: float) -> str:
    return f"{100 * (after / before - 1):+.1f}%" if before else "-"


def check_json_path(path: str | None) -> None:
    """Fail before any work if --json cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"--json {path!r} is a folder; give a file path")
    parent = existing_parent(target)
    if not os.access(parent, os.W_OK):
        raise InvalidArgumentError(f"--json {path!r}: {str(parent)!r} is not writable")


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename; the temporary file never stays)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path}")


def check_text_files(files: list[str] | None, flag: str) -> None:
    """Every text file exists, and no two share a base name (their results would collide)."""
    from moefy.errors import TextError

    for f in files or []:
        if not Path(f).is_file():
            raise TextError(f"{flag} {f!r}: no such file")
    names = [Path(f).name for f in files or []]
    if len(set(names)) != len(names):
        raise TextError(f"{flag}: two files share a base name ({', '.join(names)}); their results would collide")
