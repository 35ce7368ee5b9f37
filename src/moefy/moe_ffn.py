"""The MoE FFN module that replaces a dense FFN after conversion (G-MoEfication).

Legend: T tokens, D model width, E experts, S neurons per expert, K selected experts.

    y = Σ_{e∈S(x)} v_e(x) + (M − Σ_{e∈S(x)} m_e) + c + B A x + b_down   (docs/DESIGN.md)

v_e(x) = a_e(x) W_down[:, e]ᵀ is computed by an expert kernel that touches only the selected
experts' weights; m_e = r_e W_down[:, e]ᵀ are the static embeddings of the representatives,
M = Σ_e m_e. c (a vector) and B A x (a low-rank path) are optional learned compensation for what
the unselected experts add beyond their static vectors (`moefy.distill`); like the static term they
are skipped on the dense path, so every expert selected is still exactly the dense FFN. The parts are injected (expert weights, router, static vectors); the module only
selects and sums.

Selection modes: `router` (a trained scorer, top-k or dynamic-k), `oracle` (exact residual
norms ‖(a_e − r_e) W_down[:, e]ᵀ‖ — full cost, the upper bound), `static` (one fixed expert
set per layer, ranked by `importance`), `random` (k routed experts drawn uniformly per token, from
a generator reseeded whenever the selection is set: a baseline), `all` (every expert: reproduces
the dense FFN). Experts 0..num_shared-1 are shared: always selected, counted in k.

`zero_representatives` (a baseline: standard MoEfication) makes every unselected expert count as 0
instead of its static vector: r is read as 0 everywhere (static vectors, the fused kernel, the
oracle) while the trained r stays in the module, so switching back restores the model.

The router is injected: a `moefy.routers.ExpertRouter` (the `moefy.layers.Router` contract) that
returns a `RouterOutput` over the routed experts; the layer keeps the last one in `last_routing`
for the losses of fine-tuning (`moefy.finetune`). Each selected routed expert's *departure from
its static vector*, v_e − m_e, is multiplied by the router's weight: 1 at inference; in training
the straight-through gate g_e = 1 + p_e − sg(p_e), whose value is 1 and whose gradient reaches the
router. The expert kernel is injected by name from the `moefy.kernels` registry.

Inference on the CPU with the `auto`/`cpu` kernel takes one fused call for the experts and the
static term together, M + b_out + Σ_{e∈S} (a_e − r_e) W_out[e] (`moefy.kernels.dispatch.
centred_expert_ffn`, which for batches may run dense GEMMs instead when they measured faster);
M + b_out is cached with the tensors it sums. Decoding (a few tokens) with a linear router and a
fixed k goes further: router, top-k, shared experts, kernel, static term and compensation vector
are one C++ call (`moefy.kernels.cpu.cpu_routed_expert_ffn`); `last_routing` is then built from
its logits only when read. Training, other kernels and devices take the general path (kernel, then
Σ g_e m_e by embedding_bag); all give the same output up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moefy.errors import InvalidArgumentError
from moefy.flops import compensation_flops
from moefy.kernels import ExpertWeights, get_kernel
from moefy.kernels.cpu import activation_code, routed_kernel_applies
from moefy.kernels.cpu_ext import cpu_ops
from moefy.kernels.dispatch import DECODE_MAX_TOKENS, centred_expert_ffn
from moefy.layers.routers import RouterOutput
from moefy.routers import ExpertRouter, select_top
from moefy.settings import SELECTIONS

_KEEP = object()  # configure(): leave this setting as it is


class MoEFFN(nn.Module):
    def __init__(
        self,
        *,
        experts: ExpertWeights,
        representatives: Tensor,  # (E, S) r per neuron, expert-major
        b_out: Tensor | None,  # (D,)
        router: ExpertRouter | None,  # scores the routed experts (E − num_shared)
        top_k: int,
        num_shared: int = 0,
        importance: Tensor | None = None,  # (E,) for static selection
        selection: str = "router",
        tau: float | None = None,  # dynamic k: smallest set with predicted mass >= tau (cap top_k)
        kernel: str = "auto",
        compensation: Tensor | None = None,  # (D,) learned vector added on the sparse path
        lowrank: tuple[Tensor, Tensor] | None = None,  # (A (r, D), B (D, r)): learned path B A x
        zero_representatives: bool = False,  # unselected experts count as 0 (standard MoEfication)
        seed: int = 0,  # of the `random` selection's generator
    ) -> None:
        super().__init__()
        e, s, d = experts.w_out.shape
        self.w_in = nn.Parameter(experts.w_in, requires_grad=False)
        self.w_out = nn.Parameter(experts.w_out, requires_grad=False)
        self.b_in = None if experts.b_in is None else nn.Parameter(experts.b_in, requires_grad=False)
        self.b_out = None if b_out is None else nn.Parameter(b_out.clone(), requires_grad=False)
        self.representatives = nn.Parameter(representatives.clone(), requires_grad=False)
        self.compensation = None if compensation is None else nn.Parameter(compensation.clone(), requires_grad=False)
        self.lowrank_a = self.lowrank_b = None
        if lowrank is not None:
            self.lowrank_a = nn.Parameter(lowrank[0].clone(), requires_grad=False)
            self.lowrank_b = nn.Parameter(lowrank[1].clone(), requires_grad=False)
        self.act = experts.act
        self.gated = experts.gated
        self.router = router
        self.last_routing = None  # the router's output in the latest forward
        self.perm: Tensor | None = None  # (h,) the plan's neuron permutation this layer was built from
        self.register_buffer("importance", torch.zeros(e) if importance is None else importance.clone())
        self.register_buffer("static", torch.empty(0), persistent=False)  # (E, D) m_e cache
        self.refresh_static()
        self.num_experts, self.expert_size, self.d_model = e, s, d
        self.num_shared = num_shared
        self.kernel_name = kernel
        self.tau: float | None = None
        self.zero_representatives = False
        self.seed = seed
        self._rng = torch.Generator()
        self.configure(top_k=top_k, selection=selection, tau=tau, zero_representatives=zero_representatives)
        self.reset_counters()

    # ---- configuration -------------------------------------------------------------------
    def configure(
        self, *, top_k: int | None = None, selection: str | None = None, tau: object = _KEEP,
        zero_representatives: bool | None = None,
    ) -> None:
        """Change k, the selection mode, dynamic-k τ (None: fixed k) or zero representatives at run
        time (no re-conversion needed); settings not given are kept."""
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
            if selection == "random":
                self._rng.manual_seed(self.seed)
        if zero_representatives is not None and zero_representatives != self.zero_representatives:
            self.zero_representatives = bool(zero_representatives)
            self.refresh_static()
        if tau is not _KEEP:
            if tau is not None and not (isinstance(tau, int | float) and 0.0 < tau <= 1.0):
                raise InvalidArgumentError(f"tau={tau} must be in (0, 1] (or None for a fixed k)")
            self.tau = None if tau is None else float(tau)
        if self.router is not None:  # the router selects the routed part of k
            self.router.top_k = self.top_k - self.num_shared
            self.router.tau = self.tau

    @property
    def runs_dense(self) -> bool:
        """Every expert computed by the dense path: no router, no static term."""
        return self.selection == "all" or (self.top_k == self.num_experts and self.tau is None)

    def reset_counters(self) -> None:
        self.tokens_seen = 0
        self.experts_selected = 0

    @property
    def mean_selected(self) -> float:
        """Average experts computed per token since the last reset (dynamic k aware)."""
        return self.experts_selected / self.tokens_seen if self.tokens_seen else float(self.top_k)

    @property
    def lowrank_rank(self) -> int:
        return 0 if self.lowrank_a is None else self.lowrank_a.shape[0]

    def compensation_flops(self) -> int:
        """FLOPs per token of the learned compensation on the sparse path: one d-vector add for the
        vector, 2·r·d + 2·d·r + d for the low-rank path B A x and its add."""
        return compensation_flops(self.d_model, self.compensation is not None, self.lowrank_rank)

    def add_compensation(self, x: Tensor, y: Tensor) -> Tensor:
        """y + c + B A x (the terms present): what the unselected experts add beyond their static vectors."""
        if self.compensation is not None:
            y = y + self.compensation
        if self.lowrank_a is not None and self.lowrank_b is not None:
            y = y + (x @ self.lowrank_a.T) @ self.lowrank_b.T
        return y

    # ---- static embeddings ----------------------------------------------------------------
    @property
    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(w_in=self.w_in, w_out=self.w_out, act=self.act, gated=self.gated, b_in=self.b_in)

    def active_representatives(self) -> Tensor:
        """The r an unselected expert stands at: the trained r, or zeros under `zero_representatives`. (E, S)"""
        if self.__dict__.get("zero_representatives"):
            return torch.zeros_like(self.representatives)
        return self.representatives

    def static_vectors(self) -> Tensor:
        """m_e = r_e W_out[e]: (E, D). Cached; recomputed live while r is being trained."""
        if self.representatives.requires_grad and not self.zero_representatives:
            return torch.einsum("es,esd->ed", self.representatives, self.w_out)
        return self.static

    @torch.no_grad()
    def refresh_static(self) -> None:
        """Recompute the cached static embeddings (after r or the weights changed)."""
        self.static = torch.einsum("es,esd->ed", self.active_representatives(), self.w_out)

    # ---- selection ------------------------------------------------------------------------
    def oracle_scores(self, x: Tensor) -> Tensor:
        """Exact residual norms ‖(a_e(x) − r_e) W_out[e]‖ for every expert: (T, E). Full cost."""
        u = self.expert_weights.all_activations(x) - self.active_representatives()  # (T, E, S)
        gram = torch.einsum("esd,erd->esr", self.w_out, self.w_out)  # (E, S, S)
        return torch.einsum("tes,esr,ter->te", u, gram, u).clamp_min(0).sqrt()

    def with_shared(self, routed_idx: Tensor) -> Tensor:
        """Routed-expert ids (T, K − ns), -1 = empty slot -> layer expert ids (T, K), shared first."""
        return self._join_shared(routed_idx, no_empty=False)

    def _join_shared(self, routed_idx: Tensor, *, no_empty: bool) -> Tensor:
        """with_shared; `no_empty`: the caller knows routed_idx holds no -1 (fewer small ops)."""
        ns = self.num_shared
        routed = routed_idx + ns if no_empty else torch.where(routed_idx >= 0, routed_idx + ns, routed_idx)
        if ns == 0:
            return routed
        shared = self.__dict__.get("_shared_ids")  # (1, ns) cached
        if shared is None or shared.device != routed_idx.device or shared.shape[1] != ns:
            shared = self.__dict__["_shared_ids"] = torch.arange(ns, device=routed_idx.device).unsqueeze(0)
        return torch.cat([shared.expand(routed_idx.shape[0], ns), routed], dim=1)

    def _fixed_k(self) -> bool:
        """Every selection slot is used (no -1): fixed k with a top-k selection (no τ anywhere)."""
        if self.tau is not None:
            return False
        return self.selection != "router" or (isinstance(self.router, ExpertRouter) and self.router.tau is None)

    def select(self, x: Tensor) -> Tensor:
        """Selected experts per token: (T, K) int64, shared experts first, -1 = empty slot."""
        t = x.shape[0]
        if self.selection == "all" or self.top_k == self.num_experts:
            return torch.arange(self.num_experts, device=x.device).expand(t, -1)
        if self.selection == "router":
            assert self.router is not None
            return self.with_shared(self.router(x).idx)
        ns = self.num_shared
        if self.selection == "static":
            scores = self.importance.to(x.dtype).expand(t, -1)  # (T, E)
        elif self.selection == "random":
            scores = torch.rand(t, self.num_experts, generator=self._rng).to(x.device)  # (T, E)
        else:
            scores = self.oracle_scores(x)
        return self.with_shared(select_top(scores[:, ns:], self.top_k - ns, self.tau))

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
        if self.runs_dense:
            if not self.training:
                self.tokens_seen += x2.shape[0]
                self.experts_selected += x2.shape[0] * self.num_experts
            return self.dense_forward(x2).reshape(shape)
        if not self.training:
            fused = self._fused_decode(x2)
            if fused is not None:
                return fused.reshape(shape)
        scale = None  # (T, K) the router's straight-through gates while training, else none (= 1)
        fixed_k = self._fixed_k()
        if self.selection == "router":
            assert self.router is not None
            routing = self.router(x2)
            vars(self)["_routing"] = routing  # a plain attribute (skips nn.Module.__setattr__'s checks)
            idx = self._join_shared(routing.idx, no_empty=fixed_k)  # (T, K)
            if routing.weights.requires_grad:
                scale = torch.cat([routing.weights.new_ones(x2.shape[0], self.num_shared), routing.weights], dim=1)
        else:
            idx = self.select(x2)  # (T, K)
        total = self._static_total()  # (D,) M + b_out
        # inference on CPU: M + b_out + Σ_{e∈S} (v_e − m_e) in one fused kernel call (activations centred on r)
        y = None if scale is not None else self._centred_experts(x2, idx, total)  # (T, D)
        if y is None:  # general path (gradients, other kernels or devices)
            y = get_kernel(self.kernel_name)(x2, self.expert_weights, idx, scale)  # (T, D) Σ g_e v_e
            static = self.static_vectors()  # (E, D)
            valid = (idx >= 0).to(static.dtype)  # (T, K)
            weight = valid if scale is None else valid * scale.to(static.dtype)
            # Σ_{e∈S} g_e m_e: (T, D), reading k rows of m per token (no (T, K, D) intermediate)
            chosen = nn.functional.embedding_bag(idx.clamp_min(0), static, per_sample_weights=weight, mode="sum")
            y = y - chosen + total
        y = self.add_compensation(x2, y)
        if not self.training:  # count what inference computes
            counters = vars(self)  # plain ints: skip nn.Module.__setattr__ (microseconds per layer per token)
            counters["tokens_seen"] += x2.shape[0]
            counters["experts_selected"] += idx.numel() if fixed_k else int((idx >= 0).sum())
        return y.reshape(shape)

    @property
    def last_routing(self) -> RouterOutput | None:
        """The router's output in the latest forward (for the losses of fine-tuning). After the fused
        decode path it is built from that call's logits on first access."""
        raw = self.__dict__.get("_routing")
        if raw is None or isinstance(raw, RouterOutput):
            return raw
        logits32, idx = raw  # (T, R) fp32, (T, K) layer ids
        routed = idx[:, self.num_shared :] - self.num_shared
        logits = logits32.to(self.w_in.dtype)
        out = RouterOutput(idx=routed, weights=torch.ones(routed.shape, dtype=logits.dtype), logits=logits,
                           probs=torch.softmax(logits32, dim=-1))
        self.__dict__["_routing"] = out
        return out

    @last_routing.setter
    def last_routing(self, value: RouterOutput | None) -> None:
        self.__dict__["_routing"] = value

    def _fused_decode(self, x2: Tensor) -> Tensor | None:
        """Inference for a few tokens with a linear router and fixed k: y (T, D) from one C++ call
        (router, top-k, shared experts, kernel, M + b_out + compensation), plus the low-rank path;
        None where that call does not apply (the caller takes the staged path)."""
        if x2.shape[0] > DECODE_MAX_TOKENS:
            return None
        args = self._decode_args(x2)
        if args is None:
            return None
        y, idx, logits = cpu_ops().routed_expert_ffn(x2.contiguous(), *args)
        state = vars(self)  # plain attributes: skip nn.Module.__setattr__
        state["_routing"] = (logits, idx)
        if self.lowrank_a is not None and self.lowrank_b is not None:
            y = y + (x2 @ self.lowrank_a.T) @ self.lowrank_b.T
        state["tokens_seen"] += x2.shape[0]
        state["experts_selected"] += idx.numel()
        return y

    def _decode_args(self, x2: Tensor) -> tuple | None:
        """The fused decode call's arguments after x, or None where it does not apply. Cached: the
        key is every setting the call depends on and the identity, storage and version of every
        tensor it reads, so a changed k, selection, r, router or dtype rebuilds it (a few
        microseconds per call instead of tens for the checks and the M + b_out + c lookup)."""
        router = self.router
        if not isinstance(router, ExpertRouter) or not isinstance(router.scorer.net, nn.Linear):
            return None
        scorer = router.scorer
        tensors = [*self._parameters.values(), *self._buffers.values(), *scorer._buffers.values(),
                   *scorer.net._parameters.values()]
        present = [t for t in tensors if t is not None]
        key = (
            self.top_k, self.num_shared, self.selection, self.tau, self.kernel_name, self.zero_representatives,
            router.tau, router.training, scorer.hidden, x2.dtype, x2.device, x2.requires_grad, torch.is_grad_enabled(),
            *((t.data_ptr(), t._version, t.requires_grad) for t in present),
        )
        cached = self.__dict__.get("_decode_cache")  # (key, the tensors themselves, args)
        if (
            cached is not None and cached[0] == key and len(cached[1]) == len(present)
            and all(a is b for a, b in zip(cached[1], present, strict=True))
        ):
            return cached[2]
        args = self._build_decode_args(x2)
        self.__dict__["_decode_cache"] = (key, present, args)  # holding them: no id or storage is reused
        return args

    def _build_decode_args(self, x2: Tensor) -> tuple | None:
        router = self.router
        k_routed = self.top_k - self.num_shared
        if (
            self.selection != "router" or self.tau is not None or k_routed < 1
            or self.kernel_name not in ("auto", "cpu") or self.representatives.requires_grad
            or not isinstance(router, ExpertRouter) or router.tau is not None or router.training
        ):
            return None
        scorer = router.scorer
        net = scorer.net
        if scorer.hidden != 0 or not isinstance(net, nn.Linear):
            return None
        x_mean, x_scale = scorer.x_mean, scorer.x_scale
        assert isinstance(x_mean, Tensor) and isinstance(x_scale, Tensor)
        weights, centre, total = self.expert_weights, self.active_representatives(), self._total(with_compensation=True)
        if not routed_kernel_applies(x2, weights, net, x_mean, x_scale, centre, total):
            return None
        b_in = weights.b_in
        return (x_mean, x_scale, net.weight.contiguous(), net.bias, self.num_shared, k_routed,
                weights.w_in.contiguous(), None if b_in is None else b_in.contiguous(), weights.w_out.contiguous(),
                activation_code(weights.act), weights.gated, centre, total)

    def _centred_experts(self, x2: Tensor, idx: Tensor, total: Tensor) -> Tensor | None:
        """total + Σ_{e∈S} (a_e(x) − r_e) W_out[e] = total + Σ_{e∈S} (v_e − m_e) by the fused C++
        kernel, or None where it does not apply (gradients, a kernel other than auto/cpu, other
        devices or dtypes)."""
        if self.kernel_name not in ("auto", "cpu") or self.representatives.requires_grad:
            return None
        return centred_expert_ffn(x2, self.expert_weights, idx, self.active_representatives(), out_init=total)

    def _static_total(self) -> Tensor:
        """M + b_out = Σ_e m_e + b_out (D,): cached with the tensors it sums (live while r or b_out train)."""
        return self._total(with_compensation=False)

    def _total(self, *, with_compensation: bool) -> Tensor:
        """M + b_out (+ the compensation vector c): (D,), cached with the tensors it sums."""
        static, b_out = self.static_vectors(), self.b_out
        parts = [t for t in (static, b_out, self.compensation if with_compensation else None) if t is not None]

        def total() -> Tensor:
            y = static.sum(0)
            for t in parts[1:]:
                y = y + t
            return y

        if any(t.requires_grad for t in parts):
            return total()
        key: list[tuple[Tensor | None, object]] = [(t, None if t.is_inference() else t._version) for t in parts]
        key.append((None, torch.is_inference_mode_enabled()))  # an inference-mode sum serves inference only
        name = "_total_cache_c" if with_compensation else "_total_cache"
        cached = self.__dict__.get(name)
        if (
            cached is None or len(cached[0]) != len(key)
            or any(a is not b or u != v for (a, u), (b, v) in zip(cached[0], key, strict=True))
        ):
            cached = self.__dict__[name] = (key, total())
        return cached[1]
