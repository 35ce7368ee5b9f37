"""A converted model, PEFT-style: a dense base model + an expert plan (docs/DESIGN.md).

    from moefy import MoEModel
    moe = MoEModel.from_pretrained("runs/smol-moe")                  # resolves the recorded base itself
    moe = MoEModel.from_pretrained("runs/smol-moe", base="my/folder")  # the base has moved
    moe.configure(top_k=96)                                          # runtime settings, no re-conversion
    moe.model.generate(...)                                          # an ordinary Hugging Face model
    moe.save("runs/other")                                           # adapter: moefy.json + plan.safetensors
    moe.export("runs/standalone")                                    # base weights + plan + tokenizer

Loading verifies the base: its FFN weights must hash to what the plan recorded, or the load is
refused with both identities named.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from moefy.conversion import apply, base_identity, moe_layers
from moefy.errors import CheckpointError, InvalidArgumentError
from moefy.models import BUNDLED, LoadedModel, load_model
from moefy.outputs import atomic_folder
from moefy.plan import ModelPlan
from moefy.settings import RuntimeConfig

log = logging.getLogger(__name__)

SELF = "."  # the base name an exported folder records: the folder itself


@dataclass
class MoEModel:
    """A dense model converted in place (its FFNs are `MoEFFN`s) and the plan that did it."""

    loaded: LoadedModel
    plan: ModelPlan

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def runtime(self) -> RuntimeConfig:
        return self.plan.runtime

    def configure(self, runtime: RuntimeConfig | None = None, **changes: Any) -> MoEModel:
        """Change runtime settings (top_k / budget / tau / selection / kernel) on every layer."""
        new = runtime if runtime is not None else self.plan.runtime.replace(**changes)  # top_k clears budget etc.
        apply(self.loaded, self.plan, new)
        return self

    # ---- save / export ------------------------------------------------------------------------
    def sync_plan(self) -> ModelPlan:
        """Copy what may have changed in place (routers, representatives, importance) back into the plan."""
        for lp, m in zip(self.plan.layers, moe_layers(self.model), strict=True):
            lp.representatives = m.representatives.detach().float().cpu().clone()
            lp.importance = m.importance.detach().float().cpu().clone()
            if m.router is not None:
                lp.router = copy.deepcopy(m.router.scorer).float().cpu().eval()
        return self.plan

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """The adapter folder: `moefy.json` + `plan.safetensors` (no base weights)."""
        return self.sync_plan().save(out_dir, overwrite=overwrite)

    def export(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """One standalone folder: the dense base's weights (safetensors), config and tokenizer, plus the
        plan; `MoEModel.from_pretrained(out_dir)` loads it on another machine."""
        dense = load_model(self.loaded.source)
        identity = base_identity(dense)
        if not identity.same_weights(self.plan.base):
            raise CheckpointError(
                f"cannot export: the base read from {self.loaded.source} is {identity.describe()}, "
                f"not the plan's {self.plan.base.describe()}"
            )
        self.sync_plan()
        with atomic_folder(out_dir, overwrite=overwrite) as tmp:
            dense.model.save_pretrained(tmp, safe_serialization=True)
            dense.tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
            replace(self.plan, base=replace(self.plan.base, name=SELF)).write_into(tmp)
        return Path(out_dir)

    # ---- load ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, base: str | LoadedModel | None = None, runtime: RuntimeConfig | None = None,
        dtype: str = "float32", device: str = "cpu",
    ) -> MoEModel:
        """Load a plan folder onto its base model: `base` (a name, folder or loaded model), else the
        base the plan records. The plan is read and checked before the base is loaded."""
        folder = Path(folder)
        plan = ModelPlan.load(folder)
        if isinstance(base, LoadedModel):
            loaded = base
        else:
            name = base or plan.base.name
            if base is None and name != SELF and name not in BUNDLED and not Path(name).is_dir():
                raise CheckpointError(
                    f"{folder} records its base as {name!r}, which is neither a bundled model nor a local folder; "
                    f"moefy does not fetch a model a file names: pass --base {name} (base=...) to confirm it, "
                    "or --base with the folder it now lives in"
                )
            loaded = load_model(str(folder) if name == SELF else name, dtype, device)
        identity = base_identity(loaded)
        if not identity.same_weights(plan.base):
            raise CheckpointError(
                f"{folder} was converted from {plan.base.describe()}, but the base model given is "
                f"{identity.describe()}; pass --base with the model it was converted from"
            )
        plan.base = replace(plan.base, name=identity.name)  # where the base really is (an export: its folder)
        if runtime is not None:
            apply(loaded, plan, runtime)
        else:
            try:
                apply(loaded, plan, plan.runtime)
            except InvalidArgumentError as e:  # the folder's own settings do not fit its base: tampered
                raise CheckpointError(f"{folder}: {e}") from None
        return cls(loaded=loaded, plan=plan)


__all__ = ["MoEModel"]
