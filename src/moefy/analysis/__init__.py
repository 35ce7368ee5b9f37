"""What happened inside a model: the analyses of G-MoEfication and the diagnostics of a conversion.

Pure functions compute result dataclasses from models and statistics; results are saved as
JSON + safetensors (`store`) and drawn by `moefy.plots` without rerunning any model.

* `sparsity`        exact / soft / centred sparsity per layer, activation samples (Figures 1, 4)
* `routing`         expert load, recall of the oracle, residual mass, per-layer loss (diagnostics)
* `specialisation`  expert usage per language / domain, PCA / t-SNE, silhouette (Figure 5)
* `cost`            FFN FLOPs dense vs MoE, with and without static embeddings (Figure 3)
* `corpus`          the text categories (bundled multilingual dialogs, prose, code)
* `results`         the layout of an analysis folder; `runner` runs everything on real models
"""

from .cost import CostBreakdown, cost_breakdown
from .routing import RoutingDiagnostics, routing_diagnostics
from .sparsity import SparsityProfile, sparsity_profile
from .specialisation import Specialisation, expert_specialisation, silhouette_score
from .store import AnalysisError, load_result, save_result

__all__ = [
    "AnalysisError", "CostBreakdown", "RoutingDiagnostics", "Specialisation", "SparsityProfile",
    "cost_breakdown", "expert_specialisation", "load_result", "routing_diagnostics", "save_result",
    "silhouette_score", "sparsity_profile",
]
