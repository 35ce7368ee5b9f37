"""Exact and soft sparsity of FFN activations, before and after centring on r (G-MoEfication
Figures 1 and 4).

Per layer, over calibration tokens t and neurons j of activations a (T, h):

* exact sparsity:        fraction of (t, j) with a = 0          (high for ReLU, ~0 for GeLU/SiLU)
* soft sparsity:         fraction with |a| <= eps
* centred soft sparsity: fraction with |a - r| <= eps, r_j = E[a_j] (the representative)

and, for Figure 4, the activation values of a few sample neurons (and of the whole layer, pooled)
so their distribution can be drawn before and after subtracting r.

Exact and soft sparsity come from the streaming statistics over every calibration token; the
centred fraction needs r first, so it is measured on the calibration token sample (all tokens
when `sample_size` >= the token count, as by default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moefy.calibrate import DEFAULT_EPS, LayerCalibration, calibrate_blockwise
from moefy.errors import InvalidArgumentError
from moefy.ffn import extract_ffn
from moefy.models import LoadedModel
from moefy.specs import find_blocks, set_submodule
from moefy.text import TokenBatch

log = logging.getLogger(__name__)

# activation name -> module factory, for `swap_activation`
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class SparsityProfile:
    """Per-layer sparsity of one model's FFN activations, and Figure 4's sample values."""

    model: str  # what was analysed (bundled name, folder)
    label: str  # legend label, e.g. "smollm2-135m (SiLU, gated)"
    activation: str  # the activation, e.g. 'GeLU', 'SiLU', 'ReLU'
    gated: bool
    note: str  # caveats (e.g. a swapped activation); "" if none
    eps: list[float]
    tokens: int  # tokens behind `exact` and `soft`
    sample_tokens: int  # tokens behind `centred` and the Figure 4 values
    layer_names: list[str]
    exact: Tensor  # (L,) fraction of (token, neuron) pairs with a == 0
    soft: Tensor  # (L, len(eps)) fraction with |a| <= eps
    centred: Tensor  # (L, len(eps)) fraction with |a - r| <= eps
    mean_abs: Tensor  # (L,) mean |a|
    mean_abs_centred: Tensor  # (L,) mean |a - r|
    neuron_layer: int  # the layer whose neurons Figure 4 shows
    neuron_ids: Tensor  # (n,) neuron indices in that layer
    neuron_r: Tensor  # (n,) their representatives r_j
    neuron_values: Tensor  # (n, N) their activations on N sampled tokens
    layer_values: Tensor  # (M,) activations of random (token, neuron) pairs of that layer
    layer_r: Tensor  # (M,) r of each pair's neuron (centred value = layer_values - layer_r)
    neuron_kinds: list[str] = field(default_factory=list)  # why each neuron was picked

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def eps_index(self, eps: float) -> int:
        """Index of the eps in this profile's grid closest to `eps` (log scale)."""
        grid = torch.tensor(self.eps).log()
        return int((grid - torch.tensor(eps).log()).abs().argmin())

    def summary(self) -> dict:
        """Layer-averaged fractions, for tables."""
        row: dict = {"model": self.label, "exact": float(self.exact.mean())}
        for i, e in enumerate(self.eps):
            row[f"|a|<={e:g}"] = float(self.soft[:, i].mean())
            row[f"|a-r|<={e:g}"] = float(self.centred[:, i].mean())
        return row


def pretty_activation(class_name: str) -> str:
    """'GELUActivation' -> 'GeLU', 'SiLU' -> 'SiLU', 'ReLU' -> 'ReLU' (else the class name)."""
    low = class_name.lower()
    for key, pretty in (("gelu", "GeLU"), ("silu", "SiLU"), ("swish", "SiLU"), ("relu", "ReLU")):
        if key in low:
            return pretty
    return class_name


def activation_name(loaded: LoadedModel) -> tuple[str, bool]:
    """(name of the FFN activation, gated?) of the first block, e.g. ('SiLU', True)."""
    block = find_blocks(loaded.model, loaded.spec)[0][1]
    ffn = extract_ffn(block, loaded.spec)
    return pretty_activation(type(ffn.act).__name__), ffn.gated


def swap_activation(loaded: LoadedModel, activation: str) -> None:
    """Replace the FFN activation of every block by `activation` (in place). The weights stay
    those trained with the original activation, so the result is a *synthetic* model."""
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    for _, block in find_blocks(loaded.model, loaded.spec):
        set_submodule(block, loaded.spec.act, ACTIVATIONS[activation]())


@torch.no_grad()
def final_hidden(loaded: LoadedModel, batches: list[TokenBatch]) -> Tensor:
    """Last hidden states of every token: (tokens, D)."""
    out = []
    for b in batches:
        o = loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
        out.append(o.hidden_states[-1].reshape(-1, o.hidden_states[-1].shape[-1]).float())
    return torch.cat(out)


def _pick_neurons(r: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
    """Half the neurons with the largest |r| (where centring matters most), half at random."""
    top = torch.topk(r.abs(), max(1, count // 2)).indices
    rest = torch.tensor([j for j in torch.randperm(r.numel(), generator=generator).tolist() if j not in set(top.tolist())])
    chosen = torch.cat([top, rest[: count - top.numel()]])
    return chosen, ["largest |r|"] * top.numel() + ["random"] * (chosen.numel() - top.numel())


def sparsity_profile(
    loaded: LoadedModel,
    batches: list[TokenBatch],
    *,
    eps: tuple[float, ...] = DEFAULT_EPS,
    sample_size: int = 4096,
    neurons: int = 4,
    pooled: int = 20000,
    label: str | None = None,
    note: str = "",
    seed: int = 0,
) -> SparsityProfile:
    """Calibrate `loaded` on `batches` (dense model, block by block) and measure its sparsity."""
    if not eps or any(e <= 0 for e in eps):
        raise InvalidArgumentError(f"eps values must be > 0, got {eps}")
    spec = loaded.spec
    act, gated = activation_name(loaded)
    num_layers = len(find_blocks(loaded.model, spec))
    middle = num_layers // 2
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {k: [] for k in ("names", "exact", "soft", "centred", "abs", "abs_c")}
    fig4: dict[str, Tensor] = {}
    counts = {"tokens": 0, "sample": 0}

    def on_block(i: int, name: str, block: nn.Module, calib: LayerCalibration) -> None:
        st = calib.stats
        ffn = extract_ffn(block, spec)
        a = ffn.activation(calib.sample_x.to(ffn.w_up.dtype)).float()  # (N, h)
        r = st.mean  # (h,)
        centred = a - r
        abs_c = centred.abs()
        rows["names"].append(name)
        rows["exact"].append(float(st.exact_sparsity().mean()))
        rows["soft"].append(st.soft_sparsity().mean(1))
        rows["centred"].append(torch.stack([(abs_c <= e).float().mean() for e in eps]))
        rows["abs"].append(float(st.total_abs.sum() / max(st.count, 1) / st.d_ff))
        rows["abs_c"].append(float(abs_c.mean()))
        counts["tokens"], counts["sample"] = st.count, a.shape[0]
        if i == middle:
            ids, kinds = _pick_neurons(r, neurons, g)
            n_pairs = min(pooled, a.numel())
            flat = torch.randint(0, a.numel(), (n_pairs,), generator=g)
            fig4.update(
                ids=ids, r=r[ids], values=a[:, ids].t().contiguous(),
                layer_values=a.reshape(-1)[flat], layer_r=r[flat % a.shape[1]],
            )
            fig4["kinds"] = kinds  # type: ignore[assignment]
        log.info("sparsity %s: exact %.3f, |a-r|<=%g %.3f", name, rows["exact"][-1], eps[-1], float(rows["centred"][-1][-1]))

    calibrate_blockwise(
        loaded.model, spec, batches, sample_size=sample_size, eps=tuple(eps), on_block=on_block,
        sequential=False, keep=False, seed=seed,
    )
    return SparsityProfile(
        model=loaded.name, label=label or f"{loaded.name} ({act}{', gated' if gated else ''})", activation=act,
        gated=gated, note=note, eps=[float(e) for e in eps], tokens=counts["tokens"], sample_tokens=counts["sample"],
        layer_names=rows["names"], exact=torch.tensor(rows["exact"]), soft=torch.stack(rows["soft"]).float(),
        centred=torch.stack(rows["centred"]).float(), mean_abs=torch.tensor(rows["abs"]),
        mean_abs_centred=torch.tensor(rows["abs_c"]), neuron_layer=middle, neuron_ids=fig4["ids"],
        neuron_r=fig4["r"], neuron_values=fig4["values"], layer_values=fig4["layer_values"],
        layer_r=fig4["layer_r"], neuron_kinds=list(fig4["kinds"]),  # type: ignore[arg-type]
    )
