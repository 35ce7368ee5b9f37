"""Build (at first use) and load the C++ CPU expert kernels of `expert_ffn_cpu.cpp`.

The source ships with the package and is compiled with the machine's own compiler through
`torch.utils.cpp_extension` (needs `ninja` and a C++ compiler), tuned for the host CPU
(`-march=native`), into the `kernels` folder of moefy's cache (`moefy.models.cache_dir()`:
`$MOEFY_CACHE`, else `$XDG_CACHE_HOME/moefy`, else `~/.cache/moefy`). Later processes load the
cached library in milliseconds. If the build fails, `cpu_ops()` logs one warning and returns None, and callers use
their pure-torch paths; set `MOEFY_DISABLE_CPP=1` to skip the build on purpose.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moefy.models import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("expert_ffn_cpu.cpp")
LIBRARY = "moefy_cpu"  # the torch.ops namespace the source registers

# Tried in order; the first that builds wins. Later sets drop flags some compilers lack.
_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"),
    ("-O3", "-fopenmp", "-ffp-contract=fast"),
    ("-O3",),
)

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": the loaded namespace or None once tried


def _cpu_fingerprint() -> str:
    """Host CPU identity: a `-march=native` build must not be reused on another CPU model."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    parts.append(line.strip())
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return "|".join(parts)


def _build_name(flags: tuple[str, ...]) -> str:
    key = "\n".join([SOURCE.read_text(encoding="utf-8"), torch.__version__, platform.python_version(),
                     " ".join(flags), _cpu_fingerprint()])
    return f"moefy_expert_ffn_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """Put the `ninja` of the `ninja` PyPI package on PATH while building: torch runs `ninja` by
    name, and a virtual environment's bin folder is not on PATH unless it is activated."""
    folders = [sysconfig.get_path("scripts")]
    try:
        import ninja  # type: ignore[import-not-found]

        folders.insert(0, getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    old = os.environ.get("PATH", "")
    extra = [f for f in folders if f and os.path.isdir(f) and f not in old.split(os.pathsep)]
    os.environ["PATH"] = os.pathsep.join([*extra, old]) if extra else old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _build_and_load() -> Any:
    from torch.utils import cpp_extension

    last_error: Exception | None = None
    for flags in _FLAG_SETS:
        name = _build_name(flags)
        build_dir = cache_dir() / "kernels" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
        try:
            if not (build_dir / f"{name}.so").exists():
                log.info("building the C++ expert kernels (once per machine) in %s", build_dir)
            with _ninja_on_path():
                cpp_extension.load(
                    name=name, sources=[str(SOURCE)], extra_cflags=list(flags), extra_ldflags=ldflags,
                    build_directory=str(build_dir), is_python_module=False, verbose=False,
                )
            return getattr(torch.ops, LIBRARY)
        except (RuntimeError, OSError, ImportError) as err:  # compiler/ninja missing or failing
            last_error = err
            log.debug("building the C++ expert kernels with %s failed: %s", flags, err)
    log.warning(
        "the C++ CPU expert kernels could not be built (%s); falling back to slower pure-torch kernels. "
        "Install a C++ compiler and `pip install ninja` to enable them.",
        str(last_error).splitlines()[0] if last_error else "unknown error",
    )
    return None


def cpu_ops() -> Any:
    """The `torch.ops.moefy_cpu` namespace, building the library on first use; None if unavailable."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            if os.environ.get("MOEFY_DISABLE_CPP", "") not in ("", "0"):
                _state["ops"] = None
            else:
                _state["ops"] = _build_and_load()
    return _state["ops"]


def cpu_ops_available() -> bool:
    return cpu_ops() is not None
