"""Expert specialisation (G-MoEfication Figure 5): do texts of related languages use related experts?

Legend: C text chunks, L MoE layers, E experts, K selected experts per token.

Each text category (a language, English prose, Python code) is cut into chunks of
`chunk_tokens` tokens. Running the converted model on a chunk, every MoE layer's selection is
counted: usage[c, l, e] = fraction of chunk c's selections in layer l that went to expert e
(special tokens such as BOS/CLS excluded). The flattened usage vectors (C, L·E) are projected to
2-D by PCA (and t-SNE when scikit-learn is installed) and scored by the silhouette of the
language-family labels in the full usage space (Euclidean), next to the silhouette of randomly
permuted labels (what no structure looks like).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moefy.conversion import moe_layers
from moefy.errors import TextError
from moefy.moe_ffn import MoEFFN
from moefy.text import TokenBatch, tokenize_text

from .corpus import TextCategory
from .store import AnalysisError, empty

log = logging.getLogger(__name__)


@dataclass
class Specialisation:
    model: str
    categories: list[str]
    families: list[str]  # family of each category
    chunk_tokens: int
    chunk_category: Tensor  # (C,) int64 index into categories
    usage: Tensor  # (C, L, E) fraction of each chunk's selections per expert, per layer
    pca: Tensor  # (C, 2)
    explained_variance: list[float]  # of the 2 PCA components (fractions)
    tsne: Tensor  # (C, 2), or empty without scikit-learn
    silhouette_family: float  # family labels, full usage space
    silhouette_family_random: float  # mean over random permutations of the same labels
    silhouette_language: float  # category labels, full usage space
    silhouette_family_2d: float  # family labels, in the PCA plane
    notes: list[str] = field(default_factory=list)

    @property
    def chunk_family(self) -> list[str]:
        return [self.families[int(i)] for i in self.chunk_category]

    def summary(self) -> dict:
        return {
            "chunks": int(self.chunk_category.numel()), "categories": len(self.categories),
            "families": len(set(self.families)), "silhouette_family": self.silhouette_family,
            "silhouette_family_random": self.silhouette_family_random,
            "silhouette_language": self.silhouette_language, "silhouette_family_2d": self.silhouette_family_2d,
        }


# ---- pure maths ---------------------------------------------------------------------------------
def silhouette_score(x: Tensor, labels: Tensor) -> float:
    """Mean silhouette (Euclidean) of points x (N, F) with integer labels (N,). A point alone in
    its cluster scores 0 (scikit-learn's convention). Needs 2 <= #clusters <= N - 1."""
    n = x.shape[0]
    uniq = labels.unique()
    if not 2 <= uniq.numel() <= n - 1:
        raise AnalysisError(f"silhouette needs 2..{n - 1} clusters, got {uniq.numel()}")
    d = torch.cdist(x.double(), x.double())  # (N, N)
    onehot = (labels.unsqueeze(1) == uniq.unsqueeze(0)).double()  # (N, K)
    sums = d @ onehot  # (N, K) summed distance to each cluster
    sizes = onehot.sum(0)  # (K,)
    own = onehot.argmax(1)
    own_size = sizes[own]
    a = sums.gather(1, own.unsqueeze(1)).squeeze(1) / (own_size - 1).clamp_min(1)
    mean_other = sums / sizes
    mean_other[torch.arange(n), own] = float("inf")
    b = mean_other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-30)
    s[own_size == 1] = 0.0
    return float(s.mean())


def pca_2d(x: Tensor) -> tuple[Tensor, list[float]]:
    """Project rows of x (N, F) on their first two principal components: ((N, 2), variance fractions)."""
    centred = x.double() - x.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, vh.shape[0])
    proj = centred @ vh[:k].t()
    if k < 2:
        proj = torch.cat([proj, torch.zeros(proj.shape[0], 2 - k, dtype=proj.dtype)], dim=1)
    var = s.pow(2)
    frac = (var[:k] / var.sum().clamp_min(1e-30)).tolist() + [0.0] * (2 - k)
    return proj.float(), frac


def tsne_2d(x: Tensor, seed: int = 0) -> Tensor:
    """t-SNE to 2-D with scikit-learn, or an empty tensor when it is not installed."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return empty()
    n = x.shape[0]
    if n < 5:
        return empty()
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.double().numpy())
    return torch.from_numpy(out).float()


def permuted_silhouette(x: Tensor, labels: Tensor, repeats: int = 20, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    return sum(silhouette_score(x, labels[torch.randperm(labels.numel(), generator=g)]) for _ in range(repeats)) / repeats


# ---- usage counting -----------------------------------------------------------------------------
@torch.no_grad()
def expert_usage(model: nn.Module, batch: TokenBatch, special_ids: list[int], batch_size: int = 8) -> Tensor:
    """Per sequence of `batch`, the fraction of selections per expert in every MoE layer: (N, L, E)."""
    layers: list[MoEFFN] = moe_layers(model)
    if not layers:
        raise AnalysisError("the model has no MoE layers: expert usage needs a converted model")
    state: dict[str, Tensor] = {}  # the current chunk's token mask (B, L)
    counts: list[Tensor] = []  # per layer (B, E), reset for every chunk

    def hook(i: int, m: MoEFFN):
        def pre(_mod: nn.Module, args: tuple) -> None:
            keep = state["keep"]
            bsz, seq = keep.shape
            idx = m.select(args[0].reshape(-1, args[0].shape[-1])).reshape(bsz, seq, -1)  # (B, L, K), -1 = empty
            valid = (idx >= 0) & keep.unsqueeze(-1)
            counts[i].scatter_add_(1, torch.where(valid, idx, 0).reshape(bsz, -1), valid.reshape(bsz, -1).float())

        return pre

    specials = torch.tensor(special_ids, dtype=torch.long)
    handles = [m.register_forward_pre_hook(hook(i, m)) for i, m in enumerate(layers)]
    out = []
    try:
        for chunk in batch.chunks(batch_size):
            state["keep"] = chunk.attention_mask.bool() & ~torch.isin(chunk.input_ids, specials)
            counts[:] = [torch.zeros(chunk.input_ids.shape[0], m.num_experts) for m in layers]
            model(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask)
            usage = torch.stack(counts, dim=1)  # (B, L, E)
            out.append(usage / usage.sum(-1, keepdim=True).clamp_min(1))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def _special_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return [int(i) for i in ids if i is not None]


def expert_specialisation(
    model: nn.Module,
    tokenizer,
    categories: list[TextCategory],
    *,
    name: str,
    chunk_tokens: int = 64,
    chunks_per_category: int = 6,
    tsne: bool = True,
    seed: int = 0,
) -> Specialisation:
    """Expert usage per text chunk of each category, projected and scored (see module docstring)."""
    usages, owners, notes = [], [], []
    kept: list[TextCategory] = []
    for cat in categories:
        try:
            batch = tokenize_text(cat.text, tokenizer, chunk_tokens, chunks_per_category, name=cat.name)
        except TextError as e:
            notes.append(f"skipped {cat.name}: {e}")
            continue
        usages.append(expert_usage(model, batch, _special_ids(tokenizer)))
        owners += [len(kept)] * batch.input_ids.shape[0]
        kept.append(cat)
        log.info("expert usage of %s: %d chunks", cat.name, batch.input_ids.shape[0])
    families = [c.family for c in kept]
    if len(set(families)) < 2:
        raise AnalysisError(f"specialisation needs text of at least 2 families; got {sorted(set(families))}")
    usage = torch.cat(usages)  # (C, L, E)
    chunk_category = torch.tensor(owners)
    flat = usage.reshape(usage.shape[0], -1)
    fam_index = {f: i for i, f in enumerate(dict.fromkeys(families))}
    fam_labels = torch.tensor([fam_index[families[i]] for i in owners])
    pca, var = pca_2d(flat)
    return Specialisation(
        model=name, categories=[c.name for c in kept], families=families, chunk_tokens=chunk_tokens,
        chunk_category=chunk_category, usage=usage, pca=pca, explained_variance=var, tsne=tsne_2d(flat, seed) if tsne else empty(),
        silhouette_family=silhouette_score(flat, fam_labels),
        silhouette_family_random=permuted_silhouette(flat, fam_labels, seed=seed),
        silhouette_language=silhouette_score(flat, chunk_category) if len(kept) < flat.shape[0] else float("nan"),
        silhouette_family_2d=silhouette_score(pca, fam_labels), notes=notes,
    )
