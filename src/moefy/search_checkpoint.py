"""Resumable search: every finished block's layer plan, written atomically (search → plan).

A search killed at block 30 of 32 (kill -9, out of memory, a preempted machine) restarts at block
30 and ends with the plan an uninterrupted run makes, tensor for tensor. The folder (safetensors and
JSON only, never pickle):

    search.json              format, key (what it is valid for), blocks done, per-layer metadata, seconds
    layer.{i}.safetensors    layer i's plan tensors (`LayerPlan.tensors()`, keys layers.{i}.*)
    hidden.{n}.safetensors   the hidden states entering block n, one (B, L, D) tensor per calibration batch

After block i: layer.{i}, then hidden.{i+1}, then search.json are each written to a temporary file
and moved into place (`moefy.outputs.atomic_file`), then the previous hidden file is deleted; so
whatever instant a kill hits, search.json names complete files only.

**Saved, not recomputed.** A resumed walk needs the hidden states entering its first block. They
are saved (the calibration batches' outputs of the last finished block, in the model's dtype)
rather than recomputed by running the finished blocks again: resuming then costs one file read
instead of a forward pass through every finished block (for a streamed model, a second read of
its weights), and the resumed run sees bit for bit what the uninterrupted one saw. The price is one
write per block of sequences × 256 tokens × D × the dtype's bytes. Measured for SmolLM2 at the
default 128 sequences (AMD EPYC, 1 thread): 75.5 MB written in 0.5 s (fsync included) per block,
where recomputing costs one dense block forward, 10.4 s, per finished block (5 minutes to resume
at block 30 of 30); a 7B model (D = 4096) in fp32 writes 0.5 GB per block, seconds against minutes
of search per block at that size.

**Keyed.** The checkpoint records the base model's FFN hash, the dtype, a hash of the calibration
tokens and every search setting (the distillation-only ones excepted: they do not change the
search); a checkpoint for anything else is reported (naming what differs) and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moefy.errors import CheckpointError
from moefy.outputs import atomic_file
from moefy.plan import BaseIdentity, LayerPlan, layer_from
from moefy.settings import ConvertConfig
from moefy.text import TokenBatch

log = logging.getLogger(__name__)

FORMAT = "moefy-search-checkpoint"
STATE_FILE = "search.json"
_OWN_FILE = re.compile(r"^(search\.json|layer\.\d+\.safetensors|hidden\.\d+\.safetensors|\..*\.tmp)$")
# settings that only change distillation, which runs after the search (its own checkpoint keys on them)
DISTILL_ONLY = ("distill_minutes", "distill_batch", "distill_lr", "distill_layer_weight", "distill_checkpoint_every")


def calibration_sha256(batches: list[TokenBatch]) -> str:
    """sha256 of the calibration tokens and masks, batch by batch."""
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def search_key(base: BaseIdentity, config: ConvertConfig, batches: list[TokenBatch], dtype: torch.dtype) -> dict:
    """What a search checkpoint must match to be resumed."""
    settings = {k: v for k, v in config.to_json().items() if k not in DISTILL_ONLY}
    return {"base": base.ffn_sha256, "model_type": base.model_type, "num_layers": base.num_layers,
            "dtype": str(dtype).removeprefix("torch."), "calibration": calibration_sha256(batches), "settings": settings}


def _differences(old: object, new: dict) -> str:
    if not isinstance(old, dict):
        return "an unreadable key"
    parts = [k for k in ("base", "model_type", "num_layers", "dtype", "calibration") if old.get(k) != new[k]]
    parts = ["base model" if p == "base" else p for p in parts]
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    parts += [k for k, v in new["settings"].items() if old_settings.get(k) != v]
    return ", ".join(parts) or "another format"


@dataclass
class Resumed:
    """What a checkpoint restores: the finished layers, the hidden states entering the next block
    (None when every block is done) and the search seconds spent so far."""

    layers: list[LayerPlan]
    hidden: list[Tensor] | None
    seconds: float


class SearchCheckpoint:
    """The checkpoint folder of one search (see the module docstring)."""

    def __init__(self, folder: str | Path, key: dict, base: BaseIdentity) -> None:
        self.folder = Path(folder)
        self.key = key
        self.base = base
        self.layers: list[dict] = []  # metadata of the layers written so far

    # ---- read -----------------------------------------------------------------------------------
    def load(self) -> Resumed | None:
        """The finished blocks of a checkpoint for this search; None (and a fresh folder) when there
        is none or it was written for something else."""
        state_file = self.folder / STATE_FILE
        if not state_file.is_file():
            self._start_over()
            return None
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{state_file}: the search checkpoint cannot be read ({e}); delete {self.folder} to start over") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != self.key:
            old = state.get("key") if isinstance(state, dict) else None
            log.warning("%s: a search checkpoint for another search (different: %s); starting over", self.folder, _differences(old, self.key))
            self._start_over()
            return None
        try:
            return self._restore(state)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind is reported the same way
            raise CheckpointError(f"{self.folder}: the search checkpoint is damaged ({e}); delete it to start over") from None

    def _restore(self, state: dict) -> Resumed:
        done, metas = state["done"], state["layers"]
        if not isinstance(done, int) or not isinstance(metas, list) or len(metas) != done or not 0 < done <= self.base.num_layers:
            raise CheckpointError(f"{self.folder / STATE_FILE}: inconsistent block count; delete {self.folder} to start over")
        base = {"d_model": self.base.d_model, "d_ff": self.base.d_ff}
        layers = []
        for i, meta in enumerate(metas):
            if meta.get("index") != i:
                raise CheckpointError(f"{self.folder / STATE_FILE}: layer {i} is missing; delete {self.folder} to start over")
            layers.append(layer_from(meta, load_file(str(self.folder / f"layer.{i}.safetensors")), base, self.folder))
        hidden = None
        if done < self.base.num_layers:
            saved = load_file(str(self.folder / f"hidden.{done}.safetensors"))
            hidden = [saved[f"hidden.{c}"] for c in range(len(saved))]
        self.layers = list(metas)
        log.info("search resumes at block %d of %d from %s", done, self.base.num_layers, self.folder)
        return Resumed(layers=layers, hidden=hidden, seconds=float(state["seconds"]))

    def _start_over(self) -> None:
        """An empty checkpoint folder; only files a search checkpoint writes are ever deleted."""
        if self.folder.exists():
            if not self.folder.is_dir():
                raise CheckpointError(f"search checkpoint {str(self.folder)!r} exists and is not a folder")
            foreign = sorted(p.name for p in self.folder.iterdir() if not _OWN_FILE.match(p.name))
            if foreign:
                raise CheckpointError(
                    f"{self.folder} is not a search checkpoint (it holds {', '.join(foreign[:3])}); give another checkpoint folder"
                )
            for p in self.folder.iterdir():
                p.unlink()
        self.layers = []

    # ---- write ----------------------------------------------------------------------------------
    def save_block(self, lp: LayerPlan, hidden: list[Tensor] | None, seconds: float) -> None:
        """Record finished block `lp.index` and the hidden states entering the next one (None after
        the last block)."""
        assert lp.index == len(self.layers), "blocks are checkpointed in order"
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / f"layer.{lp.index}.safetensors") as tmp:
            save_file({f"layers.{lp.index}.{k}": v for k, v in lp.tensors().items()}, str(tmp))
        done = lp.index + 1
        if hidden is not None:
            with atomic_file(self.folder / f"hidden.{done}.safetensors") as tmp:
                save_file({f"hidden.{c}": h.detach().cpu().contiguous() for c, h in enumerate(hidden)}, str(tmp))
        self.layers.append(lp.metadata())
        state = {"format": FORMAT, "key": self.key, "done": done, "layers": self.layers, "seconds": seconds}
        with atomic_file(self.folder / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(state, indent=1))
        (self.folder / f"hidden.{lp.index}.safetensors").unlink(missing_ok=True)


__all__ = ["DISTILL_ONLY", "Resumed", "SearchCheckpoint", "calibration_sha256", "search_key"]
