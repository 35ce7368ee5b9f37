"""Writing outputs safely (no torch here, so the CLI can check paths in milliseconds): an output
folder is built in a temporary folder beside its target and moved into place, so an interrupted or
failed write leaves nothing half-written; paths are checked for writability before long work."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moefy.errors import CheckpointError


@contextmanager
def atomic_folder(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on any error
    (or interrupt) it is removed, so nothing half-written is left."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {str(out)!r} exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write to {str(out.parent)!r}: {e.strerror}") from None
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success its file is flushed to disk and replaces
    `path` (os.replace), on any error it is removed: `path` is always the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(out_dir: str | Path, *, overwrite: bool) -> None:
    """Fail early (before a long conversion) if `out_dir` cannot be written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {str(out)!r} exists and is not a folder")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    parent = existing_parent(out)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"output folder {str(out)!r}: {str(parent)!r} is not writable")


def existing_parent(path: Path) -> Path:
    """The nearest existing folder above `path` (where writing it would first create something)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _default_permissions(folder: Path) -> None:
    """Give a finished temporary folder the permissions a plain mkdir / open would have (mkdtemp and
    some writers use owner-only modes)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
