"""Quality of a (dense or converted) model on held-out text.

* Causal LMs: perplexity, token-weighted over every scored token, with a sliding window
  (window `seq_len`, step `stride`; each token is scored once, with up to seq_len - stride
  tokens of extra context when stride < seq_len).
* Encoders: sentence embeddings (mean pooling over the mask, L2-normalised, as
  sentence-transformers does for all-MiniLM-L6-v2); *embedding fidelity* = mean cosine to the
  dense model's embeddings of the same texts (1.0 for the dense model itself); *retrieval
  accuracy* = top-1 accuracy of finding each paragraph's second half from its first half.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moefy.errors import EvaluationError, TextError
from moefy.text import TokenBatch

log = logging.getLogger(__name__)


@torch.no_grad()
def sequence_nll(model: nn.Module, batch: TokenBatch, batch_size: int = 8, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Per sequence of `batch`: the summed negative log-likelihood of its scored tokens and their
    count, both (N,); tokens with batch.scored False (if given) are context only."""
    nlls, counts = [], []
    device = next(model.parameters()).device
    chunks = batch.chunks(batch_size)
    for chunk in tqdm(chunks, desc=f"perplexity {batch.name}", disable=not progress, leave=False):
        ids = chunk.input_ids.to(device)
        logits = model(input_ids=ids, attention_mask=chunk.attention_mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:]
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
        scored = chunk.attention_mask[:, 1:].bool() if chunk.scored is None else chunk.scored[:, 1:]
        scored = scored.to(device)
        nlls.append(torch.where(scored, nll, 0.0).double().sum(1).cpu())
        counts.append(scored.sum(1).cpu())
    return torch.cat(nlls), torch.cat(counts)


def perplexity_from(nll: Tensor, counts: Tensor, name: str) -> float:
    """Token-weighted perplexity exp(Σ nll / Σ tokens) of per-sequence sums (`sequence_nll`)."""
    total_nll, total_tokens = float(nll.sum()), int(counts.sum())
    if total_tokens == 0:
        raise TextError(f"no scored tokens in {name!r}")
    if not math.isfinite(total_nll):
        raise EvaluationError(
            f"the model's loss on {name!r} is not finite (NaN or inf logits): its weights or plan are corrupt"
        )
    return math.exp(total_nll / total_tokens)


def perplexity(model: nn.Module, batch: TokenBatch, batch_size: int = 8, progress: bool = False) -> float:
    """Token-weighted perplexity; tokens with batch.scored False (if given) are context only."""
    return perplexity_from(*sequence_nll(model, batch, batch_size, progress), batch.name)


def perplexity_interval(nll: Tensor, counts: Tensor, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the token-weighted perplexity by a bootstrap over sequences (the sequences,
    not the tokens, are the independent samples), percentile method, seeded."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nll.shape[0], (resamples, nll.shape[0]), generator=g)  # (R, N)
    values = torch.exp(nll.double()[idx].sum(1) / counts.double()[idx].sum(1).clamp_min(1))  # (R,)
    lo, hi = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype)).tolist()
    return lo, hi


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256) -> Tensor:
    """Mean-pooled, L2-normalised embeddings (N, D) of `texts`."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state  # (B, L, D)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


@dataclass
class PairedTexts:
    """Paragraph halves for retrieval: queries[i] belongs with documents[i]."""

    queries: list[str]
    documents: list[str]


def paired_texts(text: str, max_pairs: int = 200, min_chars: int = 200) -> PairedTexts:
    """Split each long paragraph of `text` at a sentence boundary near its middle."""
    queries, documents = [], []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if len(para) < min_chars:
            continue
        mid = para.find(". ", len(para) // 2 - 40)
        if mid < 0 or mid > len(para) - 40:
            mid = len(para) // 2
        queries.append(para[: mid + 1])
        documents.append(para[mid + 1 :].strip())
        if len(queries) >= max_pairs:
            break
    if len(queries) < 10:
        raise TextError(f"only {len(queries)} paragraphs of >= {min_chars} characters; retrieval needs at least 10")
    return PairedTexts(queries, documents)


def retrieval_accuracy(query_emb: Tensor, doc_emb: Tensor) -> float:
    """Top-1 accuracy: query i's nearest document (cosine) is document i."""
    sims = query_emb @ doc_emb.t()  # (N, N)
    return float((sims.argmax(dim=1) == torch.arange(sims.shape[0])).float().mean())


def embedding_fidelity(emb: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity between matching rows of two L2-normalised embedding sets."""
    return float((emb * reference).sum(-1).mean())
