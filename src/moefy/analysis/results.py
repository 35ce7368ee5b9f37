"""The layout of an analysis folder, and loading everything in it.

    sparsity-<model>.json/.safetensors   one SparsityProfile per analysed dense model
    routing.json/.safetensors            RoutingDiagnostics of the converted model
    specialisation.json/.safetensors     Specialisation of the converted model
    cost.json                            CostBreakdown of the converted model
    figures/*.png                        the figures (redrawn from the above at will)

A conversion folder keeps its analysis in CONVERSION/analysis/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .cost import CostBreakdown
from .routing import RoutingDiagnostics
from .sparsity import SparsityProfile
from .specialisation import Specialisation
from .store import load_result, result_stems

SPARSITY_PREFIX = "sparsity-"
ROUTING = "routing"
SPECIALISATION = "specialisation"
COST = "cost"
FIGURES = "figures"


def sparsity_stem(model: str, activation: str | None = None) -> str:
    """File stem of a model's sparsity profile (the activation suffix marks swapped activations)."""
    name = Path(model).name if Path(model).exists() else model
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name.lower())
    return f"{SPARSITY_PREFIX}{slug}" + (f"-{activation}" if activation else "")


@dataclass
class AnalysisResults:
    sparsity: list[SparsityProfile] = field(default_factory=list)
    routing: RoutingDiagnostics | None = None
    specialisation: Specialisation | None = None
    cost: CostBreakdown | None = None

    @property
    def empty(self) -> bool:
        return not self.sparsity and self.routing is None and self.specialisation is None and self.cost is None


def load_folder(folder: str | Path) -> AnalysisResults:
    """Every saved result in `folder` (missing ones stay empty)."""
    folder = Path(folder)
    out = AnalysisResults()
    # real models first, synthetic references (with a note) last, so colours stay stable
    profiles = [load_result(SparsityProfile, folder, s) for s in result_stems(folder, SPARSITY_PREFIX)]
    out.sparsity = sorted(profiles, key=lambda p: (bool(p.note), p.label))
    if (folder / f"{ROUTING}.json").is_file():
        out.routing = load_result(RoutingDiagnostics, folder, ROUTING)
    if (folder / f"{SPECIALISATION}.json").is_file():
        out.specialisation = load_result(Specialisation, folder, SPECIALISATION)
    if (folder / f"{COST}.json").is_file():
        out.cost = load_result(CostBreakdown, folder, COST)
    return out
