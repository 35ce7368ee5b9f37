"""Layer-streaming search: plan a model larger than memory, one block at a time.

The sequential pattern of GPTQ / llm-compressor: the model is built on the "meta" device (shapes,
no storage; `accelerate.init_empty_weights`, buffers such as rotary tables stay real), then

    embeddings loaded   → capture what the first block receives on the calibration text → freed
    for each block:       read its tensors from the safetensors shards → calibrate, plan (and with
                          sequential search, convert) it → run it for the next block's inputs → freed

so at any time one block's weights, its MoE copy while it is planned, the calibration activations
and the search's buffers are in memory, whatever the depth. It is `moefy.conversion.search` with a
`WeightSource` that reads the shards (`ShardedWeights`); the plan is the one the in-memory search
makes from the same weights, tensor for tensor. The base identity (FFN hash and fingerprint) is
read in a first pass over the FFN weights, one block at a time.

Shards are opened for each read and closed after it, so the pages of the memory-mapped files do
not stay in this process's resident set. fp32, bf16 and fp16 files and conversions between them
are supported (a tensor is read in its file's dtype, then cast to the one asked for).

Distillation is not streamed: its teacher is a forward pass of the whole dense model, and its
student one of the whole converted model, on every step. A streamed conversion is search only
(`convert_plan(..., stream=True)` logs that distillation was skipped and records distill=False in
the plan's settings, so the routers' k is the one for a model without learned compensation);
convert in memory where the model fits to distil it.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from moefy.errors import MissingDependencyError, UnknownModelError
from moefy.ffn import extract_ffn
from moefy.models import (
    LoadedModel,
    load_tokenizer,
    model_class,
    read_config,
    resolve_folder,
    torch_device,
    torch_dtype,
)
from moefy.plan import BaseIdentity, ffn_fingerprint, ffn_hash_update
from moefy.specs import ArchSpec, find_blocks, get_submodule, resolve_spec, set_submodule

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def shard_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index file, else every shard's header)."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UnknownModelError(f"{index_file}: not a safetensors index ({e})") from None
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnknownModelError(f"--stream reads safetensors weights; {folder} has no *.safetensors file")
    index: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                index.update({name: file for name in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
        except (SafetensorError, OSError) as e:
            raise UnknownModelError(f"{file}: cannot be read as safetensors ({e})") from None
    return index


class ShardedWeights:
    """A `moefy.calibrate.WeightSource` reading a meta-device model's tensors from safetensors
    shards: the embeddings, then one block at a time; each is freed (back to "meta") after use."""

    def __init__(
        self, folder: Path, index: dict[str, Path], model: nn.Module, spec: ArchSpec, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.folder, self.index, self.model, self.spec, self.dtype, self.device = folder, index, model, spec, dtype, device
        self.prefix = getattr(model, "base_model_prefix", "")
        self.blocks = find_blocks(model, spec)
        self.bytes_read = 0

    # ---- reading ----------------------------------------------------------------------------------
    def _file_key(self, key: str) -> str:
        """The file's name of a model tensor (a bare model's file lacks the base-model prefix, or the reverse)."""
        p = self.prefix + "."
        for candidate in (key, key.removeprefix(p) if key.startswith(p) else None, p + key):
            if candidate is not None and candidate in self.index:
                return candidate
        raise UnknownModelError(f"{self.folder}: no tensor {key!r} in its safetensors files")

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        """The tensors `keys` (model names) in the dtype and on the device asked for."""
        by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for key in keys:
            fk = self._file_key(key)
            by_file[self.index[fk]].append((key, fk))
        out: dict[str, Tensor] = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:  # closed after: no mapped pages stay resident
                for key, fk in names:
                    t = f.get_tensor(fk)
                    out[key] = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
                    self.bytes_read += t.numel() * t.element_size()
        return out

    def _load(self, module: nn.Module, prefix: str, keys: list[str]) -> None:
        tensors = self.read([prefix + k for k in keys])
        module.load_state_dict({k: tensors[prefix + k] for k in keys}, strict=False, assign=True)

    @staticmethod
    def _free(module: nn.Module, keys: list[str]) -> None:
        state = module.state_dict()
        module.load_state_dict({k: torch.empty_like(state[k], device="meta") for k in keys}, strict=False, assign=True)
        del state
        return_freed_memory()

    # ---- WeightSource ------------------------------------------------------------------------------
    def _outside_blocks(self) -> list[str]:
        """The model's tensors outside the blocks but for the output head: what the first block's
        inputs depend on (the search stops there)."""
        skip = tuple(n + "." for n, _ in self.blocks)
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        if head is not None:
            skip += tuple(n + "." for n, m in self.model.named_modules() if m is head)
        return [k for k in self.model.state_dict() if not k.startswith(skip)]

    @contextmanager
    def embeddings(self) -> Iterator[None]:
        keys = self._outside_blocks()
        self._load(self.model, "", keys)
        try:
            yield
        finally:
            self._free(self.model, keys)

    @contextmanager
    def block(self, index: int, name: str, block: nn.Module) -> Iterator[None]:
        swappable = (self.spec.ffn,) if self.spec.ffn is not None else (self.spec.down, *self.spec.identity)
        # meta copies of the dense FFN modules, put back after: the loaded ones are freed as soon as a
        # sequential search swaps them for the MoE FFN
        originals = {path: copy.deepcopy(get_submodule(block, path)) for path in swappable}
        keys = list(block.state_dict())
        self._load(block, name + ".", keys)
        try:
            yield
        finally:
            for path, module in originals.items():  # drop the MoE FFN a sequential search swapped in
                set_submodule(block, path, module)
            self._free(block, keys)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20  # bytes: every larger allocation is its own mapping, unmapped when freed


@functools.cache
def _glibc() -> Any:
    """glibc's malloc controls, or None elsewhere (macOS, musl)."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the heap freed with a block back to the system (glibc's malloc_trim): without it the
    resident memory of a streamed search grew by about a block per block (measured)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_heap() -> None:
    """For a process that streams a model: every allocation over 1 MB gets its own mapping, given
    back when freed (glibc mallopt, process-wide; `moefy convert --stream` calls it). glibc's
    default keeps freed tensors of up to 32 MB in a heap that fragments, so a streamed search's
    peak crept up with depth even with `return_freed_memory` after each block."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def skeleton(name: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> tuple[LoadedModel, ShardedWeights]:
    """The dense model `name` on the "meta" device (no weight read) with its tokenizer and spec, and
    the `ShardedWeights` that loads its tensors as a streamed search needs them."""
    dt, dev = torch_dtype(dtype), torch_device(device)
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise MissingDependencyError("accelerate", "--stream (building the model without its weights)", extra="models") from None
    folder = resolve_folder(name)
    config = read_config(folder)
    index = shard_index(folder)  # before anything else is read
    with init_empty_weights(include_buffers=False):
        model = model_class(config).from_config(config, dtype=dt, trust_remote_code=False)
    model.eval()
    for module in model.modules():  # buffers (rotary tables) are real: put them where the blocks will run
        for key, buf in list(module._buffers.items()):
            if buf is not None and not buf.is_meta:
                module._buffers[key] = buf.to(dev)
    spec = resolve_spec(model)
    loaded = LoadedModel(model=model, tokenizer=load_tokenizer(folder, name), spec=spec, name=name, source=str(folder))
    return loaded, ShardedWeights(folder, index, model, spec, dt, dev)


def streamed_identity(loaded: LoadedModel, weights: ShardedWeights) -> BaseIdentity:
    """`moefy.conversion.base_identity` of a streamed model: its FFN weights read one block at a time."""
    h = hashlib.sha256()
    fingerprint: list[float] = []
    d_model = d_ff = 0
    for i, (name, block) in enumerate(weights.blocks):
        with weights.block(i, name, block):
            ffn = extract_ffn(block, loaded.spec)
            ffn_hash_update(h, ffn)
            fingerprint += ffn_fingerprint([ffn])
            d_model, d_ff = ffn.d_model, ffn.d_ff
            del ffn
    folder = Path(loaded.name)
    return BaseIdentity(
        name=str(folder.resolve()) if folder.is_dir() else loaded.name, model_type=str(loaded.model.config.model_type),
        num_layers=len(weights.blocks), d_model=d_model, d_ff=d_ff, ffn_sha256=h.hexdigest(), ffn_fingerprint=tuple(fingerprint),
    )


__all__ = ["ShardedWeights", "bound_heap", "return_freed_memory", "shard_index", "skeleton", "streamed_identity"]
