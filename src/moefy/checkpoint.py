"""Save and load converted models: `moefy.json` + `moe.safetensors` (never pickle).

Like PEFT, a checkpoint holds only what conversion changed: every MoE FFN's expert-major
weights, representatives, static-selection importance and router. Loading rebuilds the base
model (recorded by name and fingerprint; a different base is refused), swaps in MoE FFNs and
loads their tensors strictly: a missing or unexpected tensor raises.

Writes go to a temporary folder beside the target and are moved into place, so an interrupted
save leaves no partial checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moefy import __version__
from moefy.convert import ConvertConfig, ConvertedModel, moe_layers
from moefy.errors import CheckpointError
from moefy.ffn import extract_ffn, swap_ffn
from moefy.kernels import ExpertWeights
from moefy.models import LoadedModel, base_identity, load_model
from moefy.moe_ffn import MoEFFN
from moefy.routers import MLPRouter
from moefy.specs import find_blocks

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "moefy.json"
WEIGHTS_FILE = "moe.safetensors"


def _layer_config(m: MoEFFN) -> dict:
    router = None
    if m.router is not None:
        r: MLPRouter = m.router  # type: ignore[assignment]
        router = {"d_model": r.d_model, "num_experts": r.num_experts, "hidden": r.hidden}
    return {
        "num_experts": m.num_experts, "expert_size": m.expert_size, "d_model": m.d_model,
        "num_shared": m.num_shared, "top_k": m.top_k, "selection": m.selection, "tau": m.tau,
        "kernel": m.kernel_name, "router": router,
    }


def save_converted(converted: ConvertedModel, out_dir: str | Path, *, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write a converted model to `out_dir` atomically. Refuses an existing folder unless overwrite."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    model = converted.model
    spec = converted.loaded.spec
    if not converted.base_identity:
        raise CheckpointError("the converted model does not record its base model's identity")
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for name, block in find_blocks(model, spec):
        moe = _find_moe(block)
        if moe is None:
            continue
        layers.append({"block": name, **_layer_config(moe)})
        for key, t in moe.state_dict().items():
            tensors[f"{name}.{key}"] = t.detach().contiguous()
    if not layers:
        raise CheckpointError("the model has no MoE layers to save; convert it first")
    meta = {
        "format_version": FORMAT_VERSION,
        "moefy_version": __version__,
        "base": converted.base_identity,
        "config": converted.config.to_json(),
        "layers": layers,
        "conversion_seconds": converted.seconds,
        **(extra or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "moefy"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %d MoE layers to %s", len(layers), out)
    return out


def _find_moe(block: torch.nn.Module) -> MoEFFN | None:
    for m in block.modules():
        if isinstance(m, MoEFFN):
            return m
    return None


def is_converted_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_checkpoint_config(path: str | Path) -> dict:
    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a moefy checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version {meta.get('format_version')!r}; this moefy reads version {FORMAT_VERSION}"
        )
    return meta


def load_converted(path: str | Path, base: LoadedModel | None = None) -> ConvertedModel:
    """Load a converted model. `base`: an already loaded base model (else loaded by its recorded name)."""
    folder = Path(path)
    meta = read_checkpoint_config(folder)
    recorded = meta["base"]
    loaded = base if base is not None else load_model(recorded["name"])
    actual = base_identity(loaded.model, recorded["name"])
    if actual["fingerprint"] != recorded["fingerprint"] or actual["model_type"] != recorded["model_type"]:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} was converted from base {recorded['name']!r} "
            f"(fingerprint {recorded['fingerprint']}), but the given base model differs "
            f"(fingerprint {actual['fingerprint']}); refusing to load"
        )
    weights_path = folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"cannot read {weights_path}: {e}") from None
    blocks = dict(find_blocks(loaded.model, loaded.spec))
    used: set[str] = set()
    for layer in meta["layers"]:
        name = layer["block"]
        if name not in blocks:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in the base model")
        block = blocks[name]
        moe = _empty_moe(extract_ffn(block, loaded.spec), layer)
        prefix = f"{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = set(moe.state_dict()) - set(sd), set(sd) - set(moe.state_dict())
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint tensors for {name!r} do not match: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        moe.load_state_dict(sd, strict=True)
        moe.refresh_static()
        swap_ffn(block, loaded.spec, moe)
        used.update(prefix + k for k in sd)
    leftover = set(tensors) - used
    if leftover:
        raise CheckpointError(f"checkpoint has tensors for no known layer: {sorted(leftover)[:5]}")
    return ConvertedModel(
        loaded=loaded, config=ConvertConfig.from_json(meta["config"]),
        seconds=meta.get("conversion_seconds", 0.0), base_identity=recorded,
    )


def _empty_moe(ffn, layer: dict) -> MoEFFN:
    """An MoEFFN of the recorded shape (weights filled by load_state_dict)."""
    n, s, d = layer["num_experts"], layer["expert_size"], layer["d_model"]
    experts = ExpertWeights.from_ffn(ffn, torch.arange(ffn.d_ff), n)  # right shapes, bias presence, act
    router = None
    if layer["router"] is not None:
        r = layer["router"]
        router = MLPRouter(r["d_model"], r["num_experts"], r["hidden"]).to(experts.w_in.dtype)
    moe = MoEFFN(
        experts=experts, representatives=torch.zeros(n, s, dtype=experts.w_out.dtype), b_out=ffn.b_down,
        router=router, top_k=layer["top_k"], num_shared=layer["num_shared"],
        selection=layer["selection"], tau=layer["tau"], kernel=layer["kernel"],
    )
    assert moe.d_model == d
    return moe


__all__ = ["load_converted", "save_converted", "is_converted_checkpoint", "read_checkpoint_config", "moe_layers"]
