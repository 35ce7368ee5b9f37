"""Saving analysis results: every result is a dataclass whose tensor fields go to one safetensors
file and whose other fields (numbers, strings, small lists) go to one JSON file beside it.

    save_result(profile, folder, "sparsity-smollm2-135m")  # -> .json + .safetensors
    profile = load_result(SparsityProfile, folder, "sparsity-smollm2-135m")

Plots are made from loaded results only, so replotting never reruns a model. Writes are atomic
(temporary file, then rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moefy.errors import MoefyError

T = TypeVar("T")


class AnalysisError(MoefyError):
    """A missing or unreadable analysis result, or analysis input that cannot be analysed."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_result(result: Any, folder: str | Path, stem: str) -> tuple[Path, Path | None]:
    """Write `result` (a dataclass) as FOLDER/STEM.json (+ FOLDER/STEM.safetensors if it has tensors)."""
    assert dataclasses.is_dataclass(result), "analysis results are dataclasses"
    folder = Path(folder)
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"type": type(result).__name__}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Tensor):
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            meta[f.name] = value
    json_path = folder / f"{stem}.json"
    _atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    st_path = None
    if tensors:
        st_path = folder / f"{stem}.safetensors"
        _atomic_write(st_path, lambda p: save_file(tensors, p, metadata={"format": "moefy-analysis"}))
    return json_path, st_path


def load_result(cls: type[T], folder: str | Path, stem: str) -> T:
    """Read a result written by `save_result`; raises AnalysisError if it is missing or of another type."""
    folder = Path(folder)
    json_path = folder / f"{stem}.json"
    if not json_path.is_file():
        raise AnalysisError(f"no analysis result {stem!r} in {str(folder)!r} (expected {json_path.name})")
    try:
        meta = json.loads(json_path.read_text())
    except ValueError as e:
        raise AnalysisError(f"{json_path} is not valid JSON: {e}") from None
    if meta.pop("type", None) != cls.__name__:
        raise AnalysisError(f"{json_path} does not hold a {cls.__name__}")
    st_path = folder / f"{stem}.safetensors"
    tensors = load_file(str(st_path)) if st_path.is_file() else {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in {**meta, **tensors}.items() if k in names}
    try:
        return cls(**values)
    except TypeError as e:
        raise AnalysisError(f"{json_path} is incomplete or from another moefy version: {e}") from None


def result_stems(folder: str | Path, prefix: str) -> list[str]:
    """Stems of the saved results in `folder` whose name starts with `prefix`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob(f"{prefix}*.json"))


def empty() -> Tensor:
    """Placeholder for an optional tensor field that has no value (safetensors has no None)."""
    return torch.empty(0)
