"""The expert plan: what a conversion found, as a value (search → **plan** → apply; docs/DESIGN.md).

A `LayerPlan` says how one FFN becomes an MoE: the neuron permutation that groups its neurons into
balanced experts (shared experts first), the representatives r of every neuron, the static
importance of every expert, the router's weights and the k (or τ) it was trained for. A `ModelPlan`
is every layer's plan plus the search settings and the base model's identity. The plan holds no copy
of the base weights: `moefy.conversion.apply` rebuilds the expert-major weights from the base model.

Saved as an adapter folder, like PEFT's (only what conversion created):

    moefy.json        format, base identity, search settings, runtime settings, per-layer metadata
    plan.safetensors  layers.{i}.perm (h,) int64, layers.{i}.representatives (E, S),
                      layers.{i}.importance (E,), layers.{i}.router.* (router state), and after
                      distillation layers.{i}.compensation (D,), layers.{i}.lowrank_a (r, D) / _b (D, r)

Loading is strict: every tensor must be there with the right dtype, shape and finite values, and no
other tensor may be; the JSON must have exactly the keys this version writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from moefy import __version__
from moefy.errors import CheckpointError, InvalidArgumentError
from moefy.outputs import atomic_folder
from moefy.routers import MLPRouter
from moefy.settings import ConvertConfig, RuntimeConfig

log = logging.getLogger(__name__)

FORMAT = "moefy-plan"
FORMAT_VERSION = 2
CONFIG_FILE = "moefy.json"
PLAN_FILE = "plan.safetensors"
ADAPTER_FILES = (CONFIG_FILE, PLAN_FILE)


@dataclass(frozen=True)
class BaseIdentity:
    """Which dense model a plan belongs to: where to find it, a SHA-256 of its FFN weights rounded
    to bf16 (equal for an fp32 and a bf16 copy of the same model), and a fingerprint of the same
    weights (per FFN matrix: Σw², and three fixed projections of w) that also matches an fp16 copy,
    whose double rounding can move a value across a bf16 boundary and so change the hash."""

    name: str  # bundled name, folder or hub id the conversion loaded ("." = the plan's own folder)
    model_type: str
    num_layers: int
    d_model: int
    d_ff: int
    ffn_sha256: str
    ffn_fingerprint: tuple[float, ...]  # 4 numbers per FFN weight matrix, in layer order

    def describe(self) -> str:
        return f"{self.name} ({self.model_type}, {self.num_layers} layers, FFN {self.d_model}x{self.d_ff}, sha256 {self.ffn_sha256[:12]})"

    def same_weights(self, other: BaseIdentity) -> bool:
        shape = (self.model_type, self.num_layers, self.d_model, self.d_ff)
        if shape != (other.model_type, other.num_layers, other.d_model, other.d_ff):
            return False
        return self.ffn_sha256 == other.ffn_sha256 or fingerprints_match(self.ffn_fingerprint, other.ffn_fingerprint)


def ffn_sha256(ffns: Iterable) -> str:
    """sha256 over every FFN's weights (moefy.ffn.FFNWeights), rounded to bf16, in layer order."""
    h = hashlib.sha256()
    for ffn in ffns:
        ffn_hash_update(h, ffn)
    return h.hexdigest()


def ffn_hash_update(h: Any, ffn: Any) -> None:
    """Fold one FFN into a running `ffn_sha256` (a streamed model hashes one block at a time)."""
    for t in (ffn.w_gate, ffn.w_up, ffn.w_down, ffn.b_gate, ffn.b_up, ffn.b_down):
        if t is not None:
            h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        h.update(b"|")


FINGERPRINT_CHUNK = 1 << 20  # weights per slice of the projections (bounded memory)
FINGERPRINT_TOLERANCE = 0.02  # of each projection's natural scale, √(n Σw²/n) = √Σw²; fp16 rounding moves it ~1e-3


def ffn_fingerprint(ffns: Iterable) -> tuple[float, ...]:
    """Per weight matrix w (n values, float64): Σw², and Σ w·p_j for three fixed ±1 patterns p_j
    (from a seeded generator). Rounding to bf16 or fp16 moves each projection by ~ε√Σw²; another
    model's weights move it by ~√(2Σw²)."""
    out: list[float] = []
    for ffn in ffns:
        for t in (ffn.w_gate, ffn.w_up, ffn.w_down):
            if t is None:
                continue
            w = t.detach().to("cpu", torch.float64).reshape(-1)
            g = torch.Generator().manual_seed(w.numel())
            bits = torch.randint(0, 2, (3, w.numel()), generator=g, dtype=torch.int8)  # p_j = 2 bits_j - 1
            proj = torch.zeros(3, dtype=torch.float64)
            for i in range(0, w.numel(), FINGERPRINT_CHUNK):  # in slices: float64 signs of a 7B FFN matrix are 1 GB
                proj += (bits[:, i : i + FINGERPRINT_CHUNK].to(torch.float64) * 2 - 1) @ w[i : i + FINGERPRINT_CHUNK]
            out += [float(w @ w), *(float(x) for x in proj)]
    return tuple(out)


def fingerprints_match(a: tuple[float, ...], b: tuple[float, ...], tol: float = FINGERPRINT_TOLERANCE) -> bool:
    if len(a) != len(b) or not a:
        return False
    for i in range(0, len(a), 4):
        sq_a, sq_b = a[i], b[i]
        scale = max(sq_a, sq_b, 1e-30) ** 0.5
        if abs(sq_a - sq_b) > 2 * tol * max(sq_a, sq_b) or any(
            abs(a[j] - b[j]) > tol * scale for j in range(i + 1, i + 4)
        ):
            return False
    return True


@dataclass
class LayerPlan:
    """One FFN's MoE plan. Legend: h FFN width, E experts, S = h/E neurons per expert."""

    index: int
    block: str  # module name of the transformer block
    num_experts: int
    num_shared: int  # experts 0..num_shared-1 are always on (counted in top_k)
    top_k: int  # experts per token the router was trained for
    perm: Tensor  # (h,) int64: expert e holds neurons perm[e*S:(e+1)*S]
    representatives: Tensor  # (E, S) float32: r per neuron, expert-major
    importance: Tensor  # (E,) float32: static ranking (shared experts +inf)
    router: MLPRouter | None  # scores the routed experts (E - num_shared); None: no router trained
    tau: float | None = None  # dynamic k (predicted residual mass to keep), None: fixed k
    compensation: Tensor | None = None  # (D,) float32: learned vector added on the sparse path (distillation)
    lowrank: tuple[Tensor, Tensor] | None = None  # (A (r, D), B (D, r)) float32: learned path B A x
    router_recall: float | None = None  # held-out recall of the oracle's top-k at search time
    mean_abs_centred: float | None = None  # mean |a - r| over the calibration sample
    seconds: float = 0.0

    @property
    def expert_size(self) -> int:
        return self.perm.shape[0] // self.num_experts

    def metadata(self) -> dict:
        return {
            "index": self.index, "block": self.block, "num_experts": self.num_experts, "num_shared": self.num_shared,
            "top_k": self.top_k, "tau": self.tau,
            "compensation": self.compensation is not None, "lowrank_rank": 0 if self.lowrank is None else self.lowrank[0].shape[0],
            "router_hidden": None if self.router is None else self.router.hidden,
            "router_recall": self.router_recall, "mean_abs_centred": self.mean_abs_centred, "seconds": self.seconds,
        }

    def tensors(self) -> dict[str, Tensor]:
        out = {"perm": self.perm, "representatives": self.representatives, "importance": self.importance}
        if self.compensation is not None:
            out["compensation"] = self.compensation
        if self.lowrank is not None:
            out["lowrank_a"], out["lowrank_b"] = self.lowrank
        if self.router is not None:
            out.update({f"router.{k}": v for k, v in self.router.state_dict().items()})
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


@dataclass
class ModelPlan:
    base: BaseIdentity
    config: ConvertConfig
    layers: list[LayerPlan]
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # how the model ran when saved
    seconds: float = 0.0  # search time
    extra: dict = field(default_factory=dict)  # e.g. the evaluation of the main job (JSON)

    def summary_rows(self) -> list[dict]:
        """One row per layer (for `moefy inspect`)."""
        return [
            {"layer": lp.index, "block": lp.block, "experts": lp.num_experts, "shared": lp.num_shared,
             "expert_size": lp.expert_size, "top_k": lp.top_k, "tau": lp.tau,
             "router": "-" if lp.router is None else ("linear" if lp.router.hidden == 0 else f"mlp{lp.router.hidden}"),
             "recall": lp.router_recall, "mean|a-r|": lp.mean_abs_centred}
            for lp in self.layers
        ]

    # ---- save ---------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "moefy_version": __version__,
            "base": {**self.base.__dict__, "ffn_fingerprint": list(self.base.ffn_fingerprint)},
            "config": self.config.to_json(), "runtime": self.runtime.to_json(),
            "layers": [lp.metadata() for lp in self.layers], "search_seconds": self.seconds, "extra": self.extra,
        }

    def write_into(self, folder: Path) -> None:
        """Write the adapter files into an existing (temporary) folder."""
        tensors = {f"layers.{lp.index}.{k}": v for lp in self.layers for k, v in lp.tensors().items()}
        save_file(tensors, str(folder / PLAN_FILE), metadata={"format": FORMAT})
        meta = self.metadata()
        meta["files"] = {PLAN_FILE: file_sha256(folder / PLAN_FILE), MODEL_SETTINGS: model_settings_sha256(meta)}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write the adapter folder atomically; refuses an existing folder unless `overwrite`."""
        with atomic_folder(out_dir, overwrite=overwrite) as tmp:
            self.write_into(tmp)
        return Path(out_dir)

    # ---- load ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> ModelPlan:
        folder = Path(folder)
        meta = read_metadata(folder)
        _verify_files(folder, meta)
        try:
            tensors = load_file(str(folder / PLAN_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{folder / PLAN_FILE}: cannot be read as safetensors ({e})") from None
        base = meta["base"]
        layers = [layer_from(meta_layer, tensors, base, folder) for meta_layer in meta["layers"]]
        try:
            config = ConvertConfig.from_json(_known(meta["config"], ConvertConfig, folder), source=str(folder / CONFIG_FILE),
                                             complete=True)
            runtime = RuntimeConfig.from_json(meta["runtime"], source=str(folder / CONFIG_FILE), complete=True)
        except InvalidArgumentError as e:
            raise CheckpointError(f"{folder / CONFIG_FILE}: invalid settings: {e}") from None
        used = {k for lp in layers for k in (f"layers.{lp.index}.{n}" for n in lp.tensors())}
        if leftover := sorted(set(tensors) - used):
            raise CheckpointError(f"{folder / PLAN_FILE}: tensors for no layer: {', '.join(leftover[:5])}")
        if [lp.index for lp in layers] != list(range(len(layers))) or len(layers) != base["num_layers"]:
            raise CheckpointError(f"{folder / CONFIG_FILE}: layers must be 0..{base['num_layers'] - 1} in order")
        _verify_model_settings(folder, meta)
        return cls(
            base=BaseIdentity(**{**base, "ffn_fingerprint": tuple(base["ffn_fingerprint"])}), config=config,
            runtime=runtime, layers=layers, seconds=float(meta["search_seconds"]), extra=meta["extra"],
        )


_META_KEYS = {"format", "format_version", "moefy_version", "base", "config", "runtime", "layers", "search_seconds", "extra",
              "files"}
_LAYER_KEYS = {"index", "block", "num_experts", "num_shared", "top_k", "tau", "router_hidden", "router_recall",
               "mean_abs_centred", "seconds", "compensation", "lowrank_rank"}
# keys added after format 2 was first written, with the value a plan written before them means
_LAYER_LEGACY: dict[str, object] = {"compensation": False, "lowrank_rank": 0}
_RUNTIME_LEGACY: dict[str, object] = {"zero_representatives": False}  # runtime settings added since format 2
_CONFIG_LEGACY: dict[str, object] = {"distill": False, "distill_steps": 0, "distill_minutes": None, "distill_batch": 2, "distill_lr": 1e-3,
                  "distill_layer_weight": 1.0, "distill_checkpoint_every": 25, "compensation": False, "compensation_rank": 0,
                  "calibration_mix": "english-code", "adaptive_k": False}
_BASE_KEYS = {"name", "model_type", "num_layers", "d_model", "d_ff", "ffn_sha256", "ffn_fingerprint"}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MODEL_SETTINGS = "moefy.json:runtime+layers"  # "files" key: SHA-256 of the JSON that decides how the model runs
_INFORMATIONAL = ("router_recall", "mean_abs_centred", "seconds")  # layer keys that only describe the search


def model_settings_sha256(meta: dict) -> str:
    """SHA-256 of the parts of moefy.json that change the model (runtime, and each layer's settings
    but the informational ones), canonically serialised."""
    layers = [{k: v for k, v in layer.items() if k not in _INFORMATIONAL} for layer in meta["layers"]]
    # a runtime setting at the value a plan written before it means is left out, so those plans still verify
    runtime = {k: v for k, v in meta["runtime"].items() if k not in _RUNTIME_LEGACY or v != _RUNTIME_LEGACY[k]}
    blob = json.dumps({"runtime": runtime, "layers": layers}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _verify_files(folder: Path, meta: dict) -> None:
    """Every file the plan records is there with the SHA-256 it had when it was written."""
    files = meta["files"]
    if not isinstance(files, dict) or set(files) - {MODEL_SETTINGS} != {PLAN_FILE}:
        raise CheckpointError(f"{folder / CONFIG_FILE}: \"files\" must record the SHA-256 of {PLAN_FILE}")
    path = folder / PLAN_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if file_sha256(path) != files[PLAN_FILE]:
        raise CheckpointError(
            f"{path}: its SHA-256 differs from the one recorded in {CONFIG_FILE}: the file was changed or is corrupt"
        )


def _verify_model_settings(folder: Path, meta: dict) -> None:
    """The JSON's model settings are those it was written with (a plan saved before this digest
    existed records only the file's). Checked after every value was validated, so an invalid edit
    gets its own precise message first."""
    files = meta["files"]
    if MODEL_SETTINGS in files and files[MODEL_SETTINGS] != model_settings_sha256(meta):
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: its runtime or layer settings were edited after it was saved; change how a "
            "converted model runs with flags (--top-k, --budget, --tau, --selection) or MoEModel.configure, not by editing the file"
        )


def is_plan_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_metadata(folder: str | Path) -> dict:
    """moefy.json, checked for shape (keys, types, format version) without reading any tensor."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a moefy folder: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a moefy plan (a JSON object is expected, got {type(meta).__name__})")
    if meta.get("format_version") == 1 and "format" not in meta:
        raise CheckpointError(
            f"{path}: a checkpoint of moefy 0.1 (format 1, with full expert weights); this moefy ({__version__}) "
            f"reads plan folders (format {FORMAT_VERSION}); re-convert the model"
        )
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a moefy plan (expected \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r}; this moefy ({__version__}) reads {FORMAT_VERSION}; "
            "re-convert the model with this version"
        )
    _check_keys(path, "top level", meta, _META_KEYS, unknown_ok=True)
    _check_keys(path, "base", meta["base"], _BASE_KEYS)
    base = meta["base"]
    if not all(isinstance(base[k], str) for k in ("name", "model_type", "ffn_sha256")) or not all(
        isinstance(base[k], int) and not isinstance(base[k], bool) and base[k] > 0 for k in ("num_layers", "d_model", "d_ff")
    ):
        raise CheckpointError(f"{path}: base: name, model_type and ffn_sha256 must be strings; num_layers, d_model, d_ff positive integers")
    fp = base["ffn_fingerprint"]
    if not isinstance(fp, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in fp):
        raise CheckpointError(f"{path}: base: ffn_fingerprint must be a list of numbers")
    if not isinstance(meta["extra"], dict) or not isinstance(meta["search_seconds"], int | float):
        raise CheckpointError(f"{path}: \"extra\" must be an object and \"search_seconds\" a number")
    if not isinstance(meta["layers"], list) or not meta["layers"]:
        raise CheckpointError(f"{path}: \"layers\" must be a non-empty list")
    for i, layer in enumerate(meta["layers"]):
        if isinstance(layer, dict):
            for layer_key, layer_value in _LAYER_LEGACY.items():
                layer.setdefault(layer_key, layer_value)
        _check_keys(path, f"layers[{i}]", layer, _LAYER_KEYS)
    if isinstance(meta["config"], dict):
        for key, value in _CONFIG_LEGACY.items():
            meta["config"].setdefault(key, value)
    if isinstance(meta["runtime"], dict):
        for key, value in _RUNTIME_LEGACY.items():
            meta["runtime"].setdefault(key, value)
    return meta


def _known(settings: Any, cls: type, folder: Path) -> Any:
    """The search settings without keys this moefy does not know (a newer moefy's extra search
    options): they only describe how the plan was searched, so ignoring them is safe (warned)."""
    if not isinstance(settings, dict):
        return settings
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        log.warning("%s: ignoring search settings this moefy does not know: %s", folder / CONFIG_FILE, ", ".join(unknown))
    return {k: v for k, v in settings.items() if k in known}


def _check_keys(path: Path, where: str, d: object, expected: set[str], unknown_ok: bool = False) -> None:
    """Missing keys are errors. Unknown keys are errors too, except where `unknown_ok`: at the top
    level a newer moefy may add information this one can ignore safely (warned about, then
    dropped); keys that change how a model is built or run (base, layers, runtime) stay strict."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: {where} must be a JSON object, got {type(d).__name__}")
    missing, unknown = expected - set(d), set(d) - expected
    if unknown_ok and unknown and not missing:
        log.warning("%s: ignoring %s keys this moefy does not know (written by a newer version?): %s",
                    path, where, ", ".join(sorted(unknown)))
        for key in unknown:
            del d[key]
        return
    if missing or unknown:
        raise CheckpointError(
            f"{path}: {where} has missing keys {sorted(missing)} and unknown keys {sorted(unknown)}"
        )


def layer_from(meta: dict, tensors: dict[str, Tensor], base: dict, folder: Path) -> LayerPlan:
    """Layer `meta["index"]` from its metadata and the tensors `layers.{i}.*`, strictly checked
    (`base`: the base identity's `d_model` and `d_ff`; `folder`: named in the errors)."""
    i = meta["index"]
    where = f"{folder / PLAN_FILE}: layer {i}"

    def get(name: str, shape: tuple[int, ...], floating: bool, allow_inf: bool = False) -> Tensor:
        key = f"layers.{i}.{name}"
        if key not in tensors:
            raise CheckpointError(f"{where}: tensor {key} is missing")
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")
        if t.is_floating_point() != floating:
            raise CheckpointError(f"{where}: {key} has dtype {t.dtype}, expected {'a float' if floating else 'an integer'} type")
        bad = (torch.isnan(t) | (t == float("-inf"))) if allow_inf else ~torch.isfinite(t)
        if floating and bad.any():
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values; the file is corrupt")
        return t

    n, ns, h, d = meta["num_experts"], meta["num_shared"], base["d_ff"], base["d_model"]
    if not (isinstance(n, int) and n > 0 and h % n == 0 and isinstance(ns, int) and 0 <= ns < n):
        raise CheckpointError(f"{where}: num_experts {n} / num_shared {ns} do not fit an FFN of width {h}")
    if not (isinstance(meta["top_k"], int) and max(1, ns) <= meta["top_k"] <= n):
        raise CheckpointError(f"{where}: top_k {meta['top_k']} must be in {max(1, ns)}..{n}")
    tau = meta["tau"]
    if tau is not None and not (isinstance(tau, int | float) and not isinstance(tau, bool) and 0 < tau <= 1):
        raise CheckpointError(f"{where}: tau {tau!r} must be in (0, 1] or null")
    if meta["router_hidden"] is not None and not (isinstance(meta["router_hidden"], int) and meta["router_hidden"] >= 0):
        raise CheckpointError(f"{where}: router_hidden {meta['router_hidden']!r} must be an integer >= 0 or null")
    perm = get("perm", (h,), floating=False).long()
    if not torch.equal(torch.sort(perm).values, torch.arange(h)):
        raise CheckpointError(f"{where}: perm is not a permutation of 0..{h - 1}; the file is corrupt")
    reps = get("representatives", (n, h // n), floating=True)
    importance = get("importance", (n,), floating=True, allow_inf=True)  # shared experts: +inf
    if not isinstance(meta["compensation"], bool):
        raise CheckpointError(f"{where}: compensation {meta['compensation']!r} must be true or false")
    rank = meta["lowrank_rank"]
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank <= d):
        raise CheckpointError(f"{where}: lowrank_rank {rank!r} must be an integer in 0..{d}")
    compensation = get("compensation", (d,), floating=True) if meta["compensation"] else None
    lowrank = (get("lowrank_a", (rank, d), floating=True), get("lowrank_b", (d, rank), floating=True)) if rank else None
    router = None
    if meta["router_hidden"] is not None:
        router = MLPRouter(d, n - ns, int(meta["router_hidden"]))
        expected = router.state_dict()
        sd = {k: get(f"router.{k}", tuple(v.shape), floating=True) for k, v in expected.items()}
        router.load_state_dict(sd, strict=True)
        router.to(reps.dtype).eval()
    return LayerPlan(
        index=i, block=meta["block"], num_experts=n, num_shared=ns, top_k=meta["top_k"], perm=perm,
        representatives=reps, importance=importance, router=router, tau=meta["tau"], compensation=compensation, lowrank=lowrank,
        router_recall=meta["router_recall"], mean_abs_centred=meta["mean_abs_centred"], seconds=meta["seconds"],
    )


__all__ = ["BaseIdentity", "LayerPlan", "ModelPlan", "ffn_fingerprint", "ffn_hash_update", "ffn_sha256", "is_plan_folder", "layer_from",
           "read_metadata"]
