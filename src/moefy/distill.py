"""Distillation of a converted model against its dense base (search → **distill** → plan → apply).

Legend: T tokens, D model width, E experts, R = E − ns routed experts, S neurons per expert, K the
routed experts selected per token, V vocabulary.

After search, the expert weights are the dense model's and stay frozen; what is trained is what the
conversion *made up*: the routers, the representatives r (hence the static vectors m_e = r_e W_e),
and the learned compensation (a vector c per layer, and optionally a low-rank path B A x) that
stands in for what the unselected experts add beyond their static vectors.

**Through the real selection, with a gradient for every expert.** In training each MoE layer
computes all experts' activations a (one dense pass; inference still runs the sparse kernel) and

    y = Σ_e g_e (a_e − r_e) W_e + Σ_e r_e W_e + c + B A x,      g_e = h_e + s_e − sg(s_e)

h_e = 1 for the shared experts and the router's top-K, else 0, so the forward value is exactly the
converted model's; s_e = σ(z_e − θ) with z the router's scores and θ (no gradient) midway between
the K-th and (K+1)-th score. The gradient reaching z_e is ⟨∂L/∂y, (a_e − r_e) W_e⟩ σ'(z_e − θ):
for an unselected expert, the first-order gain of computing it instead of its static vector, so
the router learns from experts it did not pick (a straight-through gate over the selected ones
only, as `moefy.finetune`, never sees them).

**Loss** (teacher = the same model with every expert selected, which is exactly the dense model):

    causal LM: KL(p_dense ‖ p_moe) over the dense model's top-64 next tokens (renormalised), per token
    encoder:   1 − cos(h_moe, h_dense) of the last hidden state, per token
    + layer_weight · mean_layers ‖y − y_dense‖² / ‖y_dense‖²     (y_dense: the dense FFN on the same input)

The teacher's targets are computed once, before training, on the calibration text only.

**Resumable**: every `checkpoint_every` steps the trainable tensors, the optimiser state and the
step are written atomically (`moefy.outputs.atomic_folder`) to `checkpoint_dir` (safetensors +
JSON); a run started with the same settings on the same plan continues from there, and the data
order and learning rate are functions of the step, so an interrupted run that resumes equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from moefy.conversion import block_moe
from moefy.errors import CalibrationError, CheckpointError, InvalidArgumentError
from moefy.models import LoadedModel
from moefy.moe_ffn import MoEFFN
from moefy.outputs import atomic_folder
from moefy.plan import LayerPlan, ModelPlan
from moefy.settings import ConvertConfig
from moefy.specs import find_blocks
from moefy.text import TokenBatch

log = logging.getLogger(__name__)

PROBE_SEQUENCES = 16  # calibration sequences the loss is reported on before and after
TEACHER_TOP = 64  # next tokens of the dense model kept per position (they hold nearly all its mass)
CHECKPOINT_STATE = "distill.json"
CHECKPOINT_TENSORS = "distill.safetensors"


@dataclass
class DistillReport:
    steps: int  # steps run in this call (resumed ones not included)
    first_step: int  # 0, or the step a checkpoint resumed from
    total_steps: int
    batch_size: int
    lr: float
    layer_weight: float
    seconds: float = 0.0
    stopped_early: bool = False  # the time budget ran out before total_steps
    probe_before: float | None = None  # output loss of the converted model (inference path) on the probe sequences
    probe_after: float | None = None
    loss: list[float] = field(default_factory=list)
    output_loss: list[float] = field(default_factory=list)  # KL (causal) or 1 − cos (encoder)
    layer_loss: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        first = self.output_loss[0] if self.output_loss else None
        last = self.output_loss[-1] if self.output_loss else None
        return {"steps": self.first_step + self.steps, "resumed_from": self.first_step, "seconds": round(self.seconds, 1),
                "stopped_early": self.stopped_early, "probe_before": self.probe_before, "probe_after": self.probe_after,
                "output_loss_first": first, "output_loss_last": last,
                "lr": self.lr, "batch_size": self.batch_size, "layer_weight": self.layer_weight}

    def to_json(self) -> dict:
        return asdict(self)


# ---- the training forward of one MoE layer -----------------------------------------------------
def _train_forward(self: MoEFFN, x: Tensor) -> Tensor:
    """MoEFFN forward in distillation (see the module docstring): the converted layer's value, with
    a gradient for every expert's gate; records the layer-matching loss on the module."""
    shape = x.shape
    x2 = x.reshape(-1, self.d_model)  # (T, D)
    t, e, s, d, ns = x2.shape[0], self.num_experts, self.expert_size, self.d_model, self.num_shared
    a = self.expert_weights.all_activations(x2)  # (T, E, S)
    w = self.w_out.reshape(e * s, d)  # (E·S, D)
    assert self.router is not None
    z = self.router.scorer(x2).float()  # (T, R)
    k = self.top_k - ns  # routed experts per token
    top = torch.topk(z.detach(), min(k + 1, z.shape[1]), dim=1).values
    theta = 0.5 * (top[:, k - 1] + top[:, min(k, z.shape[1] - 1)])  # (T,)
    soft = torch.sigmoid(z - theta[:, None])  # (T, R)
    hard = torch.zeros_like(z).scatter_(1, torch.topk(z.detach(), k, dim=1).indices, 1.0)
    gate = hard + soft - soft.detach()
    gate = torch.cat([gate.new_ones(t, ns), gate], dim=1).to(a.dtype)  # (T, E) shared experts always on
    u = (a - self.representatives) * gate[:, :, None]  # (T, E, S)
    static = self.representatives.reshape(1, e * s) @ w  # (1, D) M = Σ_e r_e W_e
    y = u.reshape(t, e * s) @ w + static  # (T, D)
    y = self.add_compensation(x2, y)
    with torch.no_grad():
        dense = a.detach().reshape(t, e * s) @ w  # (T, D) the dense FFN on the same input
    err = (y - dense).pow(2).sum(1).mean() / dense.pow(2).sum(1).mean().clamp_min(1e-12)
    self.__dict__["_distill_layer_loss"] = err
    if self.b_out is not None:
        y = y + self.b_out
    return y.reshape(shape)


def layer_loss(m: MoEFFN) -> Tensor:
    """The layer-matching loss the latest training forward of `m` recorded."""
    value = m.__dict__.get("_distill_layer_loss")
    assert isinstance(value, Tensor), "the layer has not run its training forward"
    return value


@contextmanager
def _training(model: nn.Module, layers: Sequence[MoEFFN], trainable: dict[str, nn.Parameter]) -> Iterator[None]:
    """Everything frozen and in eval mode (no dropout) except the trainable tensors; the MoE layers
    run `_train_forward`. Restores flags, modes and forwards after, and refreshes the static vectors."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        for m in layers:
            m.forward = types.MethodType(_train_forward, m)  # type: ignore[method-assign]
        yield
    finally:
        for m in layers:
            del m.forward
            m.__dict__.pop("_distill_layer_loss", None)
        for p in trainable.values():
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m in layers:
            m.refresh_static()
            m.reset_counters()
        model.train(was_training)


# ---- teacher ------------------------------------------------------------------------------------
@contextmanager
def dense_mode(layers: Sequence[MoEFFN]) -> Iterator[None]:
    """Every layer on its dense path (every expert: exactly the dense model) for the duration."""
    saved = [(m.top_k, m.selection, m.tau) for m in layers]
    try:
        for m in layers:
            m.configure(selection="all")
        yield
    finally:
        for m, (k, sel, tau) in zip(layers, saved, strict=True):
            m.configure(top_k=k, selection=sel, tau=tau)
            m.reset_counters()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_targets(
    loaded: LoadedModel, layers: Sequence[MoEFFN], ids: Tensor, mask: Tensor, rows: Sequence[int]
) -> dict[int, tuple[Tensor, Tensor]]:
    """For each sequence `rows` of ids/mask (N, L): causal LM, (log-probabilities (L, 64), token ids
    (L, 64)) of the dense model's top next tokens; encoder, (last hidden state (L, D), empty)."""
    model, device = loaded.model, _device(loaded.model)
    out: dict[int, tuple[Tensor, Tensor]] = {}
    with dense_mode(layers):
        for i in range(0, len(rows), 8):
            chunk = list(rows[i : i + 8])
            res = model(input_ids=ids[chunk].to(device), attention_mask=mask[chunk].to(device))
            if loaded.is_causal:
                logp = torch.log_softmax(res.logits.float(), dim=-1)
                top = torch.topk(logp, min(TEACHER_TOP, logp.shape[-1]), dim=-1)
                out.update({r: (v.cpu(), j.cpu()) for r, v, j in zip(chunk, top.values, top.indices, strict=True)})
            else:
                out.update({r: (h.float().cpu(), torch.empty(0)) for r, h in zip(chunk, res.last_hidden_state, strict=True)})
    return out


@torch.no_grad()
def probe_loss(loaded: LoadedModel, ids: Tensor, mask: Tensor, targets: dict[int, tuple[Tensor, Tensor]]) -> float:
    """The output loss of the model as it runs for inference (sparse kernels), on fixed sequences."""
    device = _device(loaded.model)
    total, n = 0.0, 0
    for i in range(0, ids.shape[0], 8):
        rows = list(range(i, min(i + 8, ids.shape[0])))
        target = tuple(torch.stack([targets[r][j] for r in rows]).to(device) for j in range(2))
        res = loaded.model(input_ids=ids[rows].to(device), attention_mask=mask[rows].to(device))
        total += float(output_loss(loaded, res, target, mask[rows].to(device))) * len(rows)  # type: ignore[arg-type]
        n += len(rows)
    return total / n


def output_loss(loaded: LoadedModel, result: object, target: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
    """KL(dense ‖ MoE) on the dense model's top tokens, or 1 − cos of the last hidden state; mean
    over the sequences' real tokens. target tensors: (B, L, ·); mask: (B, L)."""
    values, idx = target
    m = mask.float()
    if loaded.is_causal:
        logq = torch.log_softmax(result.logits.float(), dim=-1).gather(-1, idx)  # type: ignore[attr-defined]
        p = torch.softmax(values, dim=-1)  # renormalised over the kept tokens
        kl = (p * (torch.log(p.clamp_min(1e-30)) - logq)).sum(-1)  # (B, L)
        return (kl * m).sum() / m.sum()
    h = result.last_hidden_state.float()  # type: ignore[attr-defined]
    cos = F.cosine_similarity(h, values, dim=-1)
    return ((1 - cos) * m).sum() / m.sum()


# ---- trainable tensors and their checkpoint -------------------------------------------------------
def trainable_tensors(layers: Sequence[MoEFFN]) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for i, m in enumerate(layers):
        assert m.router is not None
        for name, p in m.router.scorer.named_parameters():
            out[f"{i}.router.{name}"] = p
        out[f"{i}.representatives"] = m.representatives
        if m.compensation is not None:
            out[f"{i}.compensation"] = m.compensation
        if m.lowrank_a is not None and m.lowrank_b is not None:
            out[f"{i}.lowrank_a"] = m.lowrank_a
            out[f"{i}.lowrank_b"] = m.lowrank_b
    return out


def _fingerprint(plan: ModelPlan, config: ConvertConfig, num_sequences: int) -> dict:
    """What a checkpoint must match to be resumed: the base, the plan's search and the settings."""
    return {"base": plan.base.ffn_sha256, "config": config.to_json(), "sequences": num_sequences,
            "layers": [[lp.num_experts, lp.num_shared, lp.top_k] for lp in plan.layers]}


def save_checkpoint(folder: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, key: dict) -> None:
    tensors = {f"param.{n}": p.detach().float().cpu().contiguous() for n, p in params.items()}
    for n, p in params.items():
        st = opt.state.get(p, {})
        for slot in ("exp_avg", "exp_avg_sq"):
            if slot in st:
                tensors[f"{slot}.{n}"] = st[slot].detach().float().cpu().contiguous()
    with atomic_folder(folder, overwrite=True) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"step": step, "key": key}, indent=1))


def load_checkpoint(folder: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, key: dict) -> int:
    """Restore a checkpoint written for the same plan and settings; returns its step (0: none usable)."""
    state_file = folder / CHECKPOINT_STATE
    if not state_file.is_file():
        return 0
    try:
        state = json.loads(state_file.read_text())
        tensors = load_file(str(folder / CHECKPOINT_TENSORS))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise CheckpointError(f"{folder}: the distillation checkpoint cannot be read ({e}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("key") != key:
        log.warning("%s: a distillation checkpoint for other settings or another plan; starting over", folder)
        return 0
    step = state.get("step")
    expected = {f"param.{n}" for n in params}
    if not isinstance(step, int) or step < 0 or not expected <= set(tensors):
        raise CheckpointError(f"{folder}: the distillation checkpoint is incomplete; delete it to start over")
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[f"param.{n}"]
            if t.shape != p.shape or not torch.isfinite(t).all():
                raise CheckpointError(f"{folder}: {n} has shape {tuple(t.shape)} or non-finite values; delete it to start over")
            p.copy_(t.to(p.dtype))
            if f"exp_avg.{n}" in tensors:
                opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"exp_avg.{n}"].to(p),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{n}"].to(p)}
    return step


# ---- the loop -----------------------------------------------------------------------------------------
def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


def sequence_order(num_sequences: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The sequences of step `step`: consecutive slices of one seeded permutation per epoch, a pure
    function of the step (so a resumed run sees what an uninterrupted one would)."""
    per_epoch = max(1, num_sequences // batch_size)
    epoch, slot = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_sequences, generator=g)
    return perm[slot * batch_size : (slot + 1) * batch_size].tolist()


def distill(
    loaded: LoadedModel,
    plan: ModelPlan,
    batches: Sequence[TokenBatch],
    config: ConvertConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    callback: Callable[[int, DistillReport], None] | None = None,
) -> DistillReport:
    """Train the routers, representatives and compensation of `loaded.model` (already converted under
    `plan`) against its dense self on `batches`, then write them into `plan`. See the module docstring."""
    model = loaded.model
    pairs = distilled_layers(loaded, plan)
    layers = [m for _, m in pairs]
    steps = config.distill_steps
    report = DistillReport(steps=0, first_step=0, total_steps=steps, batch_size=config.distill_batch,
                           lr=config.distill_lr, layer_weight=config.distill_layer_weight)
    if not layers or steps == 0:
        return report
    ids = torch.cat([b.input_ids for b in batches])
    mask = torch.cat([b.attention_mask for b in batches])
    if ids.shape[0] == 0:
        raise InvalidArgumentError("no distillation text: the calibration batches are empty")
    t0 = time.perf_counter()
    with _in_float32(model):
        _distill_fp32(loaded, plan, pairs, ids, mask, config, report, checkpoint_dir, progress, callback)
    report.seconds = time.perf_counter() - t0
    s = report.summary()
    log.info("distilled %d layers for %d steps in %.0f s: loss on the probe sequences %.4f -> %.4f", len(layers),
             s["steps"], report.seconds, report.probe_before, report.probe_after)
    return report


@contextmanager
def _in_float32(model: nn.Module) -> Iterator[None]:
    """Train in float32 whatever the model's dtype (Adam updates of bf16/fp16 tensors underflow or
    overflow); the model returns to its dtype after, its frozen weights bit for bit."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        yield
        return
    model.float()
    try:
        yield
    finally:
        model.to(dtype)
        for m in model.modules():
            if isinstance(m, MoEFFN):
                m.refresh_static()


def _distill_fp32(
    loaded: LoadedModel, plan: ModelPlan, pairs: Sequence[tuple[LayerPlan, MoEFFN]], ids: Tensor, mask: Tensor,
    config: ConvertConfig, report: DistillReport, checkpoint_dir: str | Path | None, progress: bool,
    callback: Callable[[int, DistillReport], None] | None,
) -> None:
    model = loaded.model
    layers = [m for _, m in pairs]
    steps = config.distill_steps
    for m in layers:
        add_compensation(m, config)
    params = trainable_tensors(layers)
    groups = [{"params": [p for n, p in params.items() if ".router." in n], "lr": config.distill_lr},
              {"params": [p for n, p in params.items() if ".router." not in n], "lr": config.distill_lr}]
    opt = torch.optim.Adam(groups, lr=config.distill_lr)
    key = _fingerprint(plan, config, ids.shape[0])
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = load_checkpoint(folder, params, opt, key) if folder is not None else 0
    report.first_step = start
    if start:
        log.info("distillation resumes at step %d of %d from %s", start, steps, folder)
    probe = min(PROBE_SEQUENCES, ids.shape[0])
    # the dense model's targets, for the sequences the remaining steps (and the probe) will use only
    needed = set(range(probe)) | {r for s in range(start, steps) for r in sequence_order(ids.shape[0], s, config.distill_batch, config.seed)}
    targets = teacher_targets(loaded, layers, ids, mask, sorted(needed))
    report.probe_before = probe_loss(loaded, ids[:probe], mask[:probe], targets)
    device = _device(model)
    deadline = None if config.distill_minutes is None else time.perf_counter() + 60.0 * config.distill_minutes
    bar = tqdm(range(start, steps), desc="distilling", disable=not progress, initial=start, total=steps)
    with _training(model, layers, params), torch.enable_grad():
        for step in bar:
            rows = sequence_order(ids.shape[0], step, config.distill_batch, config.seed)
            b_ids, b_mask = ids[rows].to(device), mask[rows].to(device)
            target = tuple(torch.stack([targets[r][j] for r in rows]).to(device) for j in range(2))
            res = model(input_ids=b_ids, attention_mask=b_mask)
            out = output_loss(loaded, res, target, b_mask)  # type: ignore[arg-type]
            lay = torch.stack([layer_loss(m) for m in layers]).mean()
            loss = out + config.distill_layer_weight * lay
            if not torch.isfinite(loss):
                raise CalibrationError(
                    f"distillation diverged at step {step + 1} (the loss is not finite); rerun with a lower "
                    f"--distill-lr (now {config.distill_lr}) or skip it with --no-distill"
                )
            for g in opt.param_groups:
                g["lr"] = config.distill_lr * lr_factor(step, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            report.steps += 1
            report.loss.append(loss.item())
            report.output_loss.append(out.item())
            report.layer_loss.append(lay.item())
            bar.set_postfix_str(f"{'kl' if loaded.is_causal else '1-cos'}={out.item():.4f} layer={lay.item():.4f}")
            done = step + 1
            if folder is not None and (done % config.distill_checkpoint_every == 0 or done == steps):
                save_checkpoint(folder, done, params, opt, key)
            if callback is not None:
                callback(done, report)  # e.g. an evaluation (the model computes its converted value)
            if deadline is not None and time.perf_counter() > deadline and done < steps:
                report.stopped_early = True
                log.info("distillation stopped at step %d: --distill-minutes %s reached", done, config.distill_minutes)
                break
    bar.close()
    write_back(pairs)
    report.probe_after = probe_loss(loaded, ids[:probe], mask[:probe], targets)


def distilled_layers(loaded: LoadedModel, plan: ModelPlan) -> list[tuple[LayerPlan, MoEFFN]]:
    """(layer plan, MoE module) of every layer whose router selects fewer than all experts."""
    out = []
    for (_name, block), lp in zip(find_blocks(loaded.model, loaded.spec), plan.layers, strict=True):
        m = block_moe(block)
        if m is not None and m.router is not None and lp.router is not None and m.selection == "router" and not m.runs_dense:
            out.append((lp, m))
    return out


def add_compensation(m: MoEFFN, config: ConvertConfig) -> None:
    """Give a layer the compensation terms the settings ask for (c = 0; A small random, B = 0, so
    the layer's output is unchanged until training moves them)."""
    dtype, device, d = m.w_out.dtype, m.w_out.device, m.d_model
    if config.compensation and m.compensation is None:
        m.compensation = nn.Parameter(torch.zeros(d, dtype=dtype, device=device), requires_grad=False)
    r = config.compensation_rank
    if r and m.lowrank_a is None:
        g = torch.Generator().manual_seed(config.seed + 17)
        m.lowrank_a = nn.Parameter((torch.randn(r, d, generator=g) / d**0.5).to(device, dtype), requires_grad=False)
        m.lowrank_b = nn.Parameter(torch.zeros(d, r, dtype=dtype, device=device), requires_grad=False)


@torch.no_grad()
def write_back(pairs: Sequence[tuple[LayerPlan, MoEFFN]]) -> None:
    """Copy the trained tensors of the model's layers into their layer plans (float32, CPU)."""
    for lp, m in pairs:
        assert lp.router is not None and m.router is not None
        lp.router.load_state_dict({k: v.float().cpu() for k, v in m.router.scorer.state_dict().items()})
        lp.representatives = m.representatives.detach().float().cpu().clone()
        lp.compensation = None if m.compensation is None else m.compensation.detach().float().cpu().clone()
        lp.lowrank = None if m.lowrank_a is None or m.lowrank_b is None else (
            m.lowrank_a.detach().float().cpu().clone(), m.lowrank_b.detach().float().cpu().clone())


__all__ = ["DistillReport", "add_compensation", "dense_mode", "distilled_layers", "distill", "lr_factor", "output_loss", "sequence_order", "teacher_targets",
           "trainable_tensors", "write_back"]
