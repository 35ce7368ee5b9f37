"""Router fine-tuning (`moefy.finetune`) on tiny random converted models: the straight-through gate
leaves the forward value alone and its gradient matches an eager reference, only the routers (and
optionally r) change, the balance loss goes down, bad arguments are refused, and the CLI runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moefy.conversion import configure, moe_layers
from moefy.errors import InvalidArgumentError
from moefy.finetune import finetune_routers, load_imbalance, next_token_loss
from moefy.kernels import KERNELS, reference_expert_ffn
from moefy.models import load_model
from moefy.moe_model import MoEModel
from moefy.plan import CONFIG_FILE, ModelPlan
from tests.analysis_fixtures import convert_tiny, loaded_tiny, random_batches
from tests.tiny_folders import calibration_text_file, save_tiny_folder
from tests.tiny_models import model_output, tiny_inputs

KERNEL = "auto" if "auto" in KERNELS else "reference"


def _converted(model_type: str = "llama", **kw) -> MoEModel:
    settings = dict(kernel=KERNEL, shared_fraction=0.25)  # 8 experts, k=4, MLP routers (tiny_settings)
    settings.update(kw)
    converted = convert_tiny(loaded_tiny(model_type), **settings)
    converted.model.zero_grad(set_to_none=True)  # router fitting leaves its last gradients behind
    return converted


def _frozen_state(converted: MoEModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in converted.model.state_dict().items() if ".router." not in k}


def test_straight_through_gate_keeps_forward_value() -> None:
    converted = _converted()
    model = converted.model
    inputs = tiny_inputs(model)
    expected = model_output(model, inputs)
    for m in moe_layers(model):
        m.train()  # in training mode with gradients on, the router weights are the straight-through gates
    with torch.enable_grad():
        logits = model(**inputs).logits
        assert all(m.last_routing is not None and m.last_routing.weights.requires_grad for m in moe_layers(model))
        torch.testing.assert_close(logits.detach(), expected)
        logits.square().mean().backward()
    for m in moe_layers(model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.router.parameters())
        assert m.w_in.grad is None and m.w_out.grad is None


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gated without biases; GeLU with both biases
def test_gate_gradient_matches_eager_reference(model_type: str) -> None:
    """y = M + Σ_{e∈S} g_e (v_e − m_e) + b, g_e = 1 + p_e − sg(p_e): module vs a naive rebuild."""
    m = moe_layers(_converted(model_type).model)[0]
    x = torch.randn(10, m.d_model)
    w = torch.randn(10, m.d_model)
    m.train()
    (m(x) * w).sum().backward()
    module_grads = [p.grad.clone() for p in m.router.parameters()]
    m.router.zero_grad()

    m.eval()
    logits = m.router.scorer(x)  # (T, R) the routed experts' scores
    idx = m.select(x)  # (T, K) shared first
    ns = m.num_shared
    p = torch.softmax(logits, dim=-1).gather(1, idx[:, ns:] - ns)  # (T, K − ns)
    gate = torch.cat([torch.ones(10, ns), 1 + p - p.detach()], dim=1)  # (T, K)
    y = m.static.sum(0) + (0 if m.b_out is None else m.b_out)
    for j in range(idx.shape[1]):
        v = reference_expert_ffn(x, m.expert_weights, idx[:, j : j + 1])  # (T, D)
        y = y + gate[:, j : j + 1] * (v - m.static[idx[:, j]])
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-5)
    (y * w).sum().backward()
    for got, want in zip(module_grads, (q.grad for q in m.router.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_only_routers_change_and_state_is_restored() -> None:
    converted = _converted()
    model = converted.model
    frozen = _frozen_state(converted)
    routers = {k: v.clone() for k, v in model.state_dict().items() if ".router." in k}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = finetune_routers(converted, random_batches(), steps=4, lr=1e-2, balance_weight=0.1, z_weight=1e-3, batch_size=4)
    after = model.state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"{k} changed")
    changed = [k for k, v in routers.items() if v.is_floating_point() and not torch.equal(after[k], v)]
    assert any(".net." in k for k in changed)
    assert all(".net." in k for k in changed)  # input standardisation buffers untouched
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training and all(not m.training for m in moe_layers(model))
    assert len(report.loss) == len(report.lm_loss) == len(report.balance_loss) == len(report.z_loss) == 4
    assert all(math.isfinite(v) for v in report.loss)
    assert len(report.load_before) == len(report.load_after) == 2
    assert report.tokens_per_step == 4 * 31


def test_representatives_train_and_static_vectors_follow() -> None:
    converted = _converted()
    model = converted.model
    reps = [m.representatives.detach().clone() for m in moe_layers(model)]
    finetune_routers(converted, random_batches(), steps=3, lr=1e-2, train_representatives=True, batch_size=8)
    for m, r in zip(moe_layers(model), reps, strict=True):
        assert not torch.equal(m.representatives, r)
        assert not m.representatives.requires_grad
        torch.testing.assert_close(m.static, torch.einsum("es,esd->ed", m.representatives, m.w_out))
        assert m.w_in.grad is None


def test_balance_loss_decreases() -> None:
    converted = _converted(shared_fraction=0.0, top_k=2)
    batch = random_batches(8, 32)
    report = finetune_routers(converted, batch, steps=25, lr=3e-2, balance_weight=1.0, batch_size=8)
    assert report.balance_loss[-1] < report.balance_loss[0] - 0.02
    before = sum(x.cv_squared for x in report.load_before)
    after = sum(x.cv_squared for x in report.load_after)
    assert after < before


def test_load_imbalance_and_loss_hand_computed() -> None:
    assert load_imbalance(torch.tensor([3.0, 3.0, 3.0])) == (1.0, 0.0)
    ratio, cv2 = load_imbalance(torch.tensor([4.0, 0.0, 0.0, 0.0]))  # mean 1, variance (9 + 1 + 1 + 1) / 4
    assert ratio == 4.0 and cv2 == pytest.approx(3.0)
    assert load_imbalance(torch.zeros(4)) == (1.0, 0.0)
    logits = torch.zeros(1, 3, 4)  # uniform prediction: log 4 per scored token
    ids = torch.tensor([[0, 1, 2]])
    assert float(next_token_loss(logits, ids, torch.ones_like(ids))) == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(steps=0), "steps=0"),
        (dict(lr=0.0), "lr=0.0"),
        (dict(lr=float("nan")), "lr=nan"),
        (dict(balance_weight=-1.0), "balance_weight=-1.0"),
        (dict(z_weight=float("inf")), "z_weight=inf"),
        (dict(batch_size=0), "batch_size=0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    converted = _converted()
    with pytest.raises(InvalidArgumentError, match=match):
        finetune_routers(converted, random_batches(), **kwargs)


def test_nothing_to_finetune_raises() -> None:
    converted = _converted()
    with pytest.raises(InvalidArgumentError, match="empty"):
        finetune_routers(converted, [], steps=1)
    configure(converted.model, selection="oracle")
    with pytest.raises(InvalidArgumentError, match="no router-selected"):
        finetune_routers(converted, random_batches(), steps=1)
    encoder = _converted("bert")
    with pytest.raises(InvalidArgumentError, match="causal LM"):
        finetune_routers(encoder, random_batches(), steps=1)


def test_cli_finetune_saves_a_plan(tmp_path: Path, capsys) -> None:
    from moefy.cli import main

    folder = save_tiny_folder(tmp_path / "tiny-llama")
    text = calibration_text_file(tmp_path / "text.txt", chars=4000)
    ckpt = convert_tiny(load_model(str(folder)), kernel=KERNEL, shared_fraction=0.25).save(tmp_path / "ckpt")
    before = ModelPlan.load(ckpt)
    out = tmp_path / "tuned"
    argv = ["finetune", str(ckpt), "--out", str(out), "--steps", "2", "--calibration-text", str(text),
            "--calibration-sequences", "4", "--batch-size", "2"]
    assert main(argv) == 0
    assert "max/mean before" in capsys.readouterr().out
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["extra"]["router_finetune"]["steps"] == 2
    tuned = MoEModel.from_pretrained(out)  # loads strictly, onto the base it records
    for a, b in zip(before.layers, tuned.plan.layers, strict=True):
        assert torch.equal(a.perm, b.perm) and torch.equal(a.representatives, b.representatives)
        assert torch.equal(a.importance, b.importance)
        changed = [k for k, v in a.router.state_dict().items() if not torch.equal(v, b.router.state_dict()[k])]
        assert changed and all(k.startswith("net.") for k in changed)  # only the routers' weights trained
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["finetune", str(ckpt), "--out", str(tmp_path / "x"), "--steps", "0", "--calibration-text", str(text)]) == 2
    assert "steps=0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "is not a converted folder" in capsys.readouterr().err
