"""The MoE FFN module that replaces a dense FFN after conversion (G-MoEfication).

Legend: T tokens, D model width, E experts, S neurons per expert, K selected experts.

    y = Σ_{e∈S(x)} v_e(x) + (M − Σ_{e∈S(x)} m_e) + b_down            (DESIGN.md)

v_e(x) = a_e(x) W_down[:, e]ᵀ is computed by an expert kernel that touches only the selected
experts' weights; m_e = r_e W_down[:, e]ᵀ are the static embeddings of the representatives,
M = Σ_e m_e. The parts are injected (expert weights, router, static vectors); the module only
selects and sums.

Selection modes: `router` (a trained scorer, top-k or dynamic-k), `oracle` (exact residual
norms ‖(a_e − r_e) W_down[:, e]ᵀ‖ — full cost, the upper bound), `static` (one fixed expert
set per layer, ranked by `importance`), `all` (every expert: reproduces the dense FFN).
Experts 0..num_shared-1 are shared: always selected, counted in k.

Router fine-tuning (`moefy.finetune`): with `train_router_scale` set, a layer in training mode
multiplies each selected routed expert's *departure from its static vector*, v_e − m_e, by the
straight-through gate g_e = 1 + p_e − sg(p_e), p = softmax of the router logits over the routed
experts. Its value is 1, so the output is unchanged; its gradient reaches the router.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError
from moefy.kernels import ExpertWeights, get_kernel
from moefy.settings import SELECTIONS

_KEEP = object()  # configure(): leave this setting as it is


class MoEFFN(nn.Module):
    def __init__(
        self,
        *,
        experts: ExpertWeights,
        representatives: Tensor,  # (E, S) r per neuron, expert-major
        b_out: Tensor | None,  # (D,)
        router: nn.Module | None,
        top_k: int,
        num_shared: int = 0,
        importance: Tensor | None = None,  # (E,) for static selection
        selection: str = "router",
        tau: float | None = None,  # dynamic k: smallest set with predicted mass >= tau (cap top_k)
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        e, s, d = experts.w_out.shape
        self.w_in = nn.Parameter(experts.w_in, requires_grad=False)
        self.w_out = nn.Parameter(experts.w_out, requires_grad=False)
        self.b_in = None if experts.b_in is None else nn.Parameter(experts.b_in, requires_grad=False)
        self.b_out = None if b_out is None else nn.Parameter(b_out.clone(), requires_grad=False)
        self.representatives = nn.Parameter(representatives.clone(), requires_grad=False)
        self.act = experts.act
        self.gated = experts.gated
        self.router = router
        self.register_buffer("importance", torch.zeros(e) if importance is None else importance.clone())
        self.register_buffer("static", torch.empty(0), persistent=False)  # (E, D) m_e cache
        self.refresh_static()
        self.num_experts, self.expert_size, self.d_model = e, s, d
        self.num_shared = num_shared
        self.kernel_name = kernel
        self.train_router_scale = False  # straight-through router gate in training mode (moefy.finetune)
        self.tau: float | None = None
        self.configure(top_k=top_k, selection=selection, tau=tau)
        self.reset_counters()

    # ---- configuration -------------------------------------------------------------------
    def configure(self, *, top_k: int | None = None, selection: str | None = None, tau: object = _KEEP) -> None:
        """Change k, the selection mode or dynamic-k τ (None: fixed k) at run time (no re-conversion
        needed); settings not given are kept."""
        if top_k is not None:
            if not self.num_shared <= top_k <= self.num_experts or top_k < 1:
                raise InvalidArgumentError(
                    f"top_k={top_k} must be between max(1, num_shared={self.num_shared}) and num_experts={self.num_experts}"
                )
            self.top_k = top_k
        if selection is not None:
            if selection not in SELECTIONS:
                raise InvalidArgumentError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}")
            if selection == "router" and self.router is None:
                raise InvalidArgumentError("selection 'router' needs a trained router; this layer has none")
            self.selection = selection
        if tau is _KEEP:
            return
        if tau is not None and not (isinstance(tau, int | float) and 0.0 < tau <= 1.0):
            raise InvalidArgumentError(f"tau={tau} must be in (0, 1] (or None for a fixed k)")
        self.tau = None if tau is None else float(tau)

    def reset_counters(self) -> None:
        self.tokens_seen = 0
        self.experts_selected = 0

    @property
    def mean_selected(self) -> float:
        """Average experts computed per token since the last reset (dynamic k aware)."""
        return self.experts_selected / self.tokens_seen if self.tokens_seen else float(self.top_k)

    # ---- static embeddings ----------------------------------------------------------------
    @property
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(w_in=self.w_in, w_out=self.w_out, act=self.act, gated=self.gated, b_in=self.b_in)

    def static_vectors(self) -> Tensor:
        """m_e = r_e W_out[e]: (E, D). Cached; recomputed live while r is being trained."""
        if self.representatives.requires_grad:
            return torch.einsum("es,esd->ed", self.representatives, self.w_out)
        return self.static

    @torch.no_grad()
    def refresh_static(self) -> None:
        """Recompute the cached static embeddings (after r or the weights changed)."""
        self.static = torch.einsum("es,esd->ed", self.representatives, self.w_out)

    # ---- selection ------------------------------------------------------------------------
    def oracle_scores(self, x: Tensor) -> Tensor:
        """Exact residual norms ‖(a_e(x) − r_e) W_out[e]‖ for every expert: (T, E). Full cost."""
        u = self.expert_weights.all_activations(x) - self.representatives  # (T, E, S)
        gram = torch.einsum("esd,erd->esr", self.w_out, self.w_out)  # (E, S, S)
        return torch.einsum("tes,esr,ter->te", u, gram, u).clamp_min(0).sqrt()

    def _top_k(self, scores: Tensor, k: int) -> Tensor:
        """Top-k routed experts (shared ones always in) from scores over all E experts: (T, k)."""
        t = scores.shape[0]
        ns = self.num_shared
        shared = torch.arange(ns, device=scores.device).expand(t, ns)
        routed = torch.topk(scores[:, ns:], k - ns, dim=-1).indices + ns
        return torch.cat([shared, routed], dim=1)

    def _dynamic_k(self, scores: Tensor) -> Tensor:
        """Smallest prefix (by score) whose score mass reaches τ of the total, capped at top_k;
        unused slots are -1."""
        idx = self._top_k(scores, self.top_k)  # (T, K), shared first then routed by score
        ns = self.num_shared
        routed_scores = scores[:, ns:].clamp_min(0)
        top = scores.gather(1, idx[:, ns:]).clamp_min(0)  # (T, K - ns) descending
        mass = top.cumsum(1) / routed_scores.sum(1, keepdim=True).clamp_min(1e-12)
        # keep slot j if the mass before it is still below tau (the first routed slot always kept)
        before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)
        assert self.tau is not None
        keep = before < self.tau
        routed = torch.where(keep, idx[:, ns:], torch.full_like(idx[:, ns:], -1))
        return torch.cat([idx[:, :ns], routed], dim=1)

    def select(self, x: Tensor) -> Tensor:
        """Selected experts per token: (T, K) int64, -1 = empty slot."""
        t = x.shape[0]
        if self.selection == "all" or self.top_k == self.num_experts:
            return torch.arange(self.num_experts, device=x.device).expand(t, -1)
        if self.selection == "static":
            scores = self.importance.to(x.dtype).expand(t, -1)
        elif self.selection == "oracle":
            scores = self.oracle_scores(x)
        else:
            return self.select_routed(self.router_logits(x))
        return self._select_from_scores(scores)

    def router_logits(self, x: Tensor) -> Tensor:
        """The router's scores of the routed experts: (T, E − num_shared)."""
        assert self.router is not None
        scores = self.router(x).to(x.dtype)
        if scores.shape[-1] == self.num_experts:  # a router that also scores the shared experts
            scores = scores[:, self.num_shared :]
        return scores

    def select_routed(self, logits: Tensor) -> Tensor:
        """Selection from router logits over the routed experts (T, E − num_shared): (T, K)."""
        scores = torch.cat([logits.new_zeros(logits.shape[0], self.num_shared), logits], dim=1)  # (T, E)
        return self._select_from_scores(scores)

    def _select_from_scores(self, scores: Tensor) -> Tensor:
        if self.tau is not None:
            return self._dynamic_k(scores)
        return self._top_k(scores, self.top_k)

    def _straight_through_route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Selection (T, K) and straight-through gates (T, K): 1 + p_e − sg(p_e) on routed slots,
        p = softmax over the routed experts' logits; 1 on shared and empty slots."""
        logits = self.router_logits(x)  # (T, E − ns)
        idx = self.select_routed(logits.detach())  # (T, K)
        ns = self.num_shared
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E − ns)
        p = probs.gather(1, (idx[:, ns:] - ns).clamp_min(0))  # (T, K − ns)
        gate = 1.0 + p - p.detach()
        return idx, torch.cat([gate.new_ones(x.shape[0], ns), gate], dim=1).to(x.dtype)

    # ---- forward --------------------------------------------------------------------------
    def dense_forward(self, x: Tensor) -> Tensor:
        """Every expert selected: two dense products over the expert-major weights (exactly the
        dense FFN, neurons permuted); used when nothing is skipped, differentiable."""
        e, s, d = self.num_experts, self.expert_size, self.d_model
        a = self.expert_weights.all_activations(x)  # (T, E, S)
        y = a.reshape(x.shape[0], e * s) @ self.w_out.reshape(e * s, d)  # (T, D)
        return y if self.b_out is None else y + self.b_out

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.d_model)  # (T, D)
        if self.selection == "all" or (self.top_k == self.num_experts and self.tau is None):
            if not self.training:
                self.tokens_seen += x2.shape[0]
                self.experts_selected += x2.shape[0] * self.num_experts
            return self.dense_forward(x2).reshape(shape)
        scale = None  # (T, K) straight-through gates while fine-tuning the router, else none (= 1)
        if self.training and self.train_router_scale and self.selection == "router" and self.router is not None:
            idx, scale = self._straight_through_route(x2)
        else:
            idx = self.select(x2)  # (T, K)
        y = get_kernel(self.kernel_name)(x2, self.expert_weights, idx, scale)  # (T, D) Σ g_e v_e
        static = self.static_vectors()  # (E, D)
        valid = (idx >= 0).to(static.dtype)  # (T, K)
        weight = valid if scale is None else valid * scale.to(static.dtype)
        # Σ_{e∈S} g_e m_e: (T, D), reading k rows of m per token (no (T, K, D) intermediate)
        chosen = nn.functional.embedding_bag(idx.clamp_min(0), static, per_sample_weights=weight, mode="sum")
        y = y + (static.sum(0) - chosen)
        if self.b_out is not None:
            y = y + self.b_out
        if not self.training:  # count what inference computes
            self.tokens_seen += x2.shape[0]
            self.experts_selected += int(valid.sum())
        return y.reshape(shape)
