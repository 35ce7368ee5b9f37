"""Build (at first use) and load the C++ CPU expert kernels of `expert_ffn_cpu.cpp`.

The source ships with the package and is compiled with the machine's own compiler through
`torch.utils.cpp_extension` (needs `ninja` and a C++ compiler), tuned for the host CPU
(`-march=native`), into the `kernels` folder of moefy's cache (`moefy.models.cache_dir()`:
`$MOEFY_CACHE`, else `$XDG_CACHE_HOME/moefy`, else `~/.cache/moefy`). Later processes load the
cached library in milliseconds. If the build fails, `cpu_ops()` logs one warning and returns None, and callers use
their pure-torch paths; set `MOEFY_DISABLE_CPP=1` to skip the build on purpose.

The same source also builds as instruction-set variants (`ISA_VARIANTS`: AVX-512 without BF16,
AVX2, the baseline), each under its own op namespace, so tests and benchmarks can force every
vector path on one machine (`forced_isa("avx2")`, or `MOEFY_CPU_ISA=avx2` for a whole process).
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

from moefy.errors import InvalidArgumentError
from moefy.models import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("expert_ffn_cpu.cpp")
LIBRARY = "moefy_cpu"  # the torch.ops namespace of the default (native) build

_BASE_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno")
# Tried in order; the first that builds wins. Later sets drop flags some compilers lack.
_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    (*_BASE_FLAGS[:1], "-march=native", *_BASE_FLAGS[1:]),
    ("-O3", "-fopenmp", "-ffp-contract=fast"),
    ("-O3",),
)

# Instruction-set variants of the same source, each its own library (namespace moefy_cpu_<isa>),
# so that every code path can be run and tested on one machine: `native` is what users get (the
# host's best: AVX-512 with BF16 dot products on recent x86); the others are built on request
# (`forced_isa`, tests, `MOEFY_CPU_ISA`), only where the host can run them. Each entry: the
# compiler flags and the /proc/cpuinfo flags the host needs.
ISA_VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (("-march=skylake-avx512",), ("avx512f", "avx512bw", "avx512vl", "avx512dq")),  # no BF16 dot
    "avx2": (("-march=haswell",), ("avx2", "fma")),  # 16-lane vectors as two 8-lane halves
    "generic": (("-mno-avx",), ()),  # the compiler's baseline (SSE2 on x86-64)
}

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": the loaded native namespace or None once tried; "ops:<isa>" likewise
_forced: list[str] = []  # stack of forced_isa() variants


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


def _build_name(flags: tuple[str, ...], library: str = LIBRARY) -> str:
    key = "\n".join([SOURCE.read_text(encoding="utf-8"), torch.__version__, platform.python_version(),
                     " ".join(flags), library, _cpu_fingerprint()])
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


def _build(flags: tuple[str, ...], library: str) -> Any:
    from torch.utils import cpp_extension

    name = _build_name(flags, library)
    build_dir = cache_dir() / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
    cflags = [*flags] if library == LIBRARY else [*flags, f"-DMOEFY_LIB={library}"]
    if not (build_dir / f"{name}.so").exists():
        log.info("building the C++ expert kernels (%s, once per machine) in %s", library, build_dir)
    with _ninja_on_path():
        cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
    return getattr(torch.ops, library)


def _build_and_load() -> Any:
    last_error: Exception | None = None
    for flags in _FLAG_SETS:
        try:
            return _build(flags, LIBRARY)
        except (RuntimeError, OSError, ImportError) as err:  # compiler/ninja missing or failing
            last_error = err
            log.debug("building the C++ expert kernels with %s failed: %s", flags, err)
    log.warning(
        "the C++ CPU expert kernels could not be built (%s); falling back to slower pure-torch kernels. "
        "Install a C++ compiler and `pip install ninja` to enable them.",
        str(last_error).splitlines()[0] if last_error else "unknown error",
    )
    return None


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def available_isas() -> list[str]:
    """The instruction-set variants this host can build and run: "native" first, then those of
    ISA_VARIANTS whose CPU flags the host has (x86-64 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["native"]
    host = _host_flags()
    return ["native", *(isa for isa, (_, needs) in ISA_VARIANTS.items() if set(needs) <= host)]


def _variant_ops(isa: str) -> Any:
    key = f"ops:{isa}"
    if key not in _state:
        with _lock:
            if os.environ.get("MOEFY_DISABLE_CPP", "") not in ("", "0"):
                _state[key] = None
            elif key not in _state:
                flags = (*_BASE_FLAGS[:1], *ISA_VARIANTS[isa][0], *_BASE_FLAGS[1:])
                try:
                    _state[key] = _build(flags, f"{LIBRARY}_{isa}")
                except (RuntimeError, OSError, ImportError) as err:
                    log.warning("the %s variant of the C++ expert kernels could not be built: %s", isa,
                                str(err).splitlines()[0])
                    _state[key] = None
    return _state[key]


def cpu_ops() -> Any:
    """The `torch.ops.moefy_cpu` namespace (or the variant `forced_isa` / `MOEFY_CPU_ISA` picks),
    building the library on first use; None if unavailable."""
    if not _forced and "ops" in _state and _state.get("isa") == "native":  # the common case, fast
        return _state["ops"]
    if "isa" not in _state:  # MOEFY_CPU_ISA is read once per process
        _state["isa"] = os.environ.get("MOEFY_CPU_ISA", "native") or "native"
    isa = _forced[-1] if _forced else _state["isa"]
    if isa != "native":
        if isa not in ISA_VARIANTS:
            raise InvalidArgumentError(f"unknown CPU ISA variant {isa!r}; valid: native, {', '.join(ISA_VARIANTS)}")
        return _variant_ops(isa)
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            if os.environ.get("MOEFY_DISABLE_CPP", "") not in ("", "0"):
                _state["ops"] = None
            else:
                _state["ops"] = _build_and_load()
    return _state["ops"]


@contextlib.contextmanager
def forced_isa(isa: str) -> Iterator[None]:
    """Run the C++ kernels of one instruction-set variant inside the block (tests, benchmarks)."""
    if isa != "native" and isa not in ISA_VARIANTS:
        raise InvalidArgumentError(f"unknown CPU ISA variant {isa!r}; valid: native, {', '.join(ISA_VARIANTS)}")
    _forced.append(isa)
    try:
        yield
    finally:
        _forced.pop()


def cpu_ops_available() -> bool:
    return cpu_ops() is not None
