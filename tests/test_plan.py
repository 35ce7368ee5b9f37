"""Plans as artifacts (search → plan → apply): a saved plan re-applied on a fresh base reproduces the
converted model exactly, the adapter folder holds only what conversion created, loading is strict
(corrupt files and other bases are refused with a clear CheckpointError), `save_pretrained` is
refused, export makes a standalone folder, and the CLI builds the same plan as the Python API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moefy import api
from moefy.conversion import apply, base_identity, moe_layers
from moefy.errors import CheckpointError, InvalidArgumentError, MoefyError
from moefy.ffn import extract_ffn
from moefy.models import LoadedModel, load_model
from moefy.moe_model import MoEModel
from moefy.plan import ADAPTER_FILES, CONFIG_FILE, PLAN_FILE, ModelPlan, file_sha256
from moefy.settings import METHODS, RuntimeConfig, config_for
from moefy.specs import find_blocks
from tests.analysis_fixtures import convert_tiny, loaded_tiny
from tests.tiny_folders import calibration_text_file, save_tiny_folder
from tests.tiny_models import model_output, tiny_inputs

REFERENCE = RuntimeConfig(kernel="reference")


def _layer_tensors(plan: ModelPlan) -> dict[str, torch.Tensor]:
    return {f"layers.{lp.index}.{k}": v for lp in plan.layers for k, v in lp.tensors().items()}


def _assert_same_plan(a: ModelPlan, b: ModelPlan) -> None:
    assert a.base == b.base and a.config == b.config
    assert [lp.metadata() | {"seconds": 0} for lp in a.layers] == [lp.metadata() | {"seconds": 0} for lp in b.layers]
    ta, tb = _layer_tensors(a), _layer_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


# ---- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gated without biases; plain GeLU with biases
def test_saved_plan_reapplied_on_a_fresh_base_is_exact(model_type: str, tmp_path: Path) -> None:
    loaded = loaded_tiny(model_type)
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    moe = convert_tiny(loaded, shared_fraction=0.25)
    assert all(0.0 <= lp.router_recall <= 1.0 for lp in moe.plan.layers)
    converted = model_output(loaded.model, inputs)
    folder = moe.save(tmp_path / "plan")
    assert not list(tmp_path.glob(".plan*"))  # no temporary folder left behind

    back = MoEModel.from_pretrained(folder, base=loaded_tiny(model_type))
    torch.testing.assert_close(model_output(back.model, inputs), converted, rtol=0, atol=0)
    assert back.runtime == moe.runtime == REFERENCE
    _assert_same_plan(back.plan, moe.plan)

    # the low-level path: ModelPlan.load + apply on another fresh base
    fresh = loaded_tiny(model_type)
    plan = ModelPlan.load(folder)
    _assert_same_plan(plan, moe.plan)
    apply(fresh, plan, REFERENCE)
    torch.testing.assert_close(model_output(fresh.model, inputs), converted, rtol=0, atol=0)
    apply(fresh, plan, REFERENCE.replace(top_k=8))  # every expert: the dense model
    torch.testing.assert_close(model_output(fresh.model, inputs), dense, rtol=1e-4, atol=1e-5)


def test_runtime_is_saved_and_can_be_overridden(tmp_path: Path) -> None:
    loaded = loaded_tiny("llama")
    inputs = tiny_inputs(loaded.model)
    dense = model_output(loaded.model, inputs)
    moe = convert_tiny(loaded, top_k=6)
    moe.configure(top_k=3, tau=0.5)
    assert moe.runtime == REFERENCE.replace(top_k=3, tau=0.5)
    expected = model_output(loaded.model, inputs)
    folder = moe.save(tmp_path / "plan")
    assert json.loads((folder / CONFIG_FILE).read_text())["runtime"] == moe.runtime.to_json()

    back = MoEModel.from_pretrained(folder, base=loaded_tiny("llama"))
    assert back.runtime == moe.runtime
    assert all(m.top_k == 3 and m.tau == 0.5 for m in moe_layers(back.model))
    assert all(lp.top_k == 6 for lp in back.plan.layers)  # what the routers were trained for is kept
    torch.testing.assert_close(model_output(back.model, inputs), expected, rtol=0, atol=0)

    full = MoEModel.from_pretrained(folder, base=loaded_tiny("llama"), runtime=REFERENCE.replace(top_k=8))
    assert full.runtime.top_k == 8
    torch.testing.assert_close(model_output(full.model, inputs), dense, rtol=1e-4, atol=1e-5)


def test_plan_saved_before_later_settings_loads_with_their_old_values(tmp_path: Path) -> None:
    """A plan written before distillation and calibration mixes existed loads as what it was:
    undistilled, calibrated on English + code."""
    moe = convert_tiny(loaded_tiny("llama"))
    folder = moe.save(tmp_path / "plan")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    for key in ("calibration_mix", "distill", "distill_steps", "compensation"):
        del meta["config"][key]
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    old = ModelPlan.load(folder).config
    assert old.calibration_mix == "english-code" and not old.distill and old.distill_steps == 0 and not old.compensation


def test_trained_in_place_parts_are_saved(tmp_path: Path) -> None:
    """save() writes the routers and representatives as the model holds them now (e.g. after
    fine-tuning), not as search left them."""
    loaded = loaded_tiny("llama")
    moe = convert_tiny(loaded)
    inputs = tiny_inputs(loaded.model)
    with torch.no_grad():
        for m in moe_layers(loaded.model):
            m.representatives.add_(0.5)
            m.refresh_static()
            for p in m.router.parameters():
                p.mul_(-1.0)
    changed = model_output(loaded.model, inputs)
    back = MoEModel.from_pretrained(moe.save(tmp_path / "plan"), base=loaded_tiny("llama"))
    torch.testing.assert_close(model_output(back.model, inputs), changed, rtol=0, atol=0)


# ---- what the adapter folder holds ----------------------------------------------------------------
def test_adapter_folder_holds_only_the_plan(tmp_path: Path) -> None:
    loaded = loaded_tiny("llama")
    identity = base_identity(loaded)
    ffns = [extract_ffn(b, loaded.spec) for _, b in find_blocks(loaded.model, loaded.spec)]
    ffn_bytes = sum(t.numel() * t.element_size() for f in ffns for t in (f.w_gate, f.w_up, f.w_down) if t is not None)
    ffn_names = {n for n, _ in loaded.model.named_parameters() if ".mlp." in n}
    moe = convert_tiny(loaded, router_hidden=0, shared_fraction=0.25)  # the recommended linear router

    folder = moe.save(tmp_path / "plan")
    assert {p.name for p in folder.iterdir()} == set(ADAPTER_FILES) == {"moefy.json", "plan.safetensors"}
    tensors = load_file(str(folder / PLAN_FILE))
    allowed = re.compile(r"layers\.[01]\.(perm|representatives|importance|router\.(x_mean|x_scale|net\.(weight|bias)))")
    assert all(allowed.fullmatch(k) for k in tensors), sorted(tensors)
    for k in tensors:
        assert not any(part in k for part in ("w_in", "w_out", "mlp", "up_proj", "down_proj", "gate_proj")), k
        assert not any(k.endswith(n) for n in ffn_names), k
    d, h = identity.d_model, identity.d_ff
    assert all(t.numel() < d * h for t in tensors.values())  # not even one projection's worth
    assert (folder / PLAN_FILE).stat().st_size < 0.1 * ffn_bytes
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["base"] == {**identity.__dict__, "ffn_fingerprint": list(identity.ffn_fingerprint)}
    assert meta["config"] == moe.plan.config.to_json()


def test_save_refuses_an_existing_folder_and_overwrite_replaces_it(tmp_path: Path) -> None:
    moe = convert_tiny(loaded_tiny("llama"))
    folder = moe.save(tmp_path / "plan")
    (folder / "stray.txt").write_text("left over")
    with pytest.raises(CheckpointError, match="already exists"):
        moe.save(folder)
    assert (folder / "stray.txt").is_file()  # refused: untouched
    moe.save(folder, overwrite=True)
    assert {p.name for p in folder.iterdir()} == set(ADAPTER_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name != "plan"]  # no temporary or old folder left


@pytest.mark.parametrize("how", ["convert", "from_pretrained"])
def test_save_pretrained_of_a_converted_model_is_refused(how: str, tmp_path: Path) -> None:
    moe = convert_tiny(loaded_tiny("llama"))
    if how == "from_pretrained":
        moe = MoEModel.from_pretrained(moe.save(tmp_path / "plan"), base=loaded_tiny("llama"))
    out = tmp_path / "hf"
    with pytest.raises(InvalidArgumentError, match=r"save_pretrained\(\).*MoEModel\.save.*MoEModel\.export"):
        moe.model.save_pretrained(out)
    assert not out.exists()


def test_base_identity_is_dtype_independent_and_tells_models_apart() -> None:
    fp32 = loaded_tiny("llama")
    bf16 = loaded_tiny("llama")
    bf16.model.to(torch.bfloat16)
    a, b, other = base_identity(fp32), base_identity(bf16), base_identity(loaded_tiny("llama", seed=5))
    assert a.same_weights(b) and a.ffn_sha256 == b.ffn_sha256
    assert not a.same_weights(other)
    assert (a.model_type, a.num_layers, a.d_model, a.d_ff) == ("llama", 2, 32, 128)
    fp16 = loaded_tiny("llama")
    fp16.model.to(torch.float16)
    c = base_identity(fp16)  # double rounding (fp32 -> fp16 -> bf16) may change the hash, not the fingerprint
    assert a.same_weights(c) and c.same_weights(a)
    for seed in range(1, 6):  # other weights of the same shapes never match
        assert not a.same_weights(base_identity(loaded_tiny("llama", seed=seed)))
    nudged = loaded_tiny("llama")
    with torch.no_grad():  # one FFN matrix changed by 10% of its size: another model
        w = extract_ffn(find_blocks(nudged.model, nudged.spec)[1][1], nudged.spec).w_down
        w.add_(0.1 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    assert not a.same_weights(base_identity(nudged))


def test_plan_loads_onto_a_bf16_copy_of_its_base(tmp_path: Path) -> None:
    folder = convert_tiny(loaded_tiny("llama")).save(tmp_path / "plan")
    base = loaded_tiny("llama")
    base.model.to(torch.bfloat16)
    moe = MoEModel.from_pretrained(folder, base=base)
    assert all(m.w_in.dtype == torch.bfloat16 for m in moe_layers(moe.model))
    out = model_output(moe.model, tiny_inputs(moe.model))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- strict loading -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama plan with 2 shared experts and MLP routers, saved once for the corruption tests."""
    return convert_tiny(loaded_tiny("llama"), shared_fraction=0.25).save(tmp_path_factory.mktemp("saved") / "plan")


def _rehash(folder: Path) -> None:
    """Record the plan file's new SHA-256, as someone editing it on purpose would: what remains to
    catch the damage are the structural checks."""
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["files"][PLAN_FILE] = file_sha256(folder / PLAN_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        tensors = load_file(str(folder / PLAN_FILE))
        edit(tensors)
        save_file(tensors, str(folder / PLAN_FILE))
        _rehash(folder)

    return run


def _swap_layers_unhashed(folder: Path) -> None:
    """Two layers' tensors swapped (same shapes, all valid values): only the checksum can tell."""
    tensors = load_file(str(folder / PLAN_FILE))
    _swap_layers(tensors)
    save_file(tensors, str(folder / PLAN_FILE))


def _flip_byte(folder: Path) -> None:
    data = bytearray((folder / PLAN_FILE).read_bytes())
    data[-3] ^= 0x40  # inside the last tensor: still a valid file, one value changed
    (folder / PLAN_FILE).write_bytes(bytes(data))


def _swap_layers(t: dict) -> None:
    for name in ("representatives", "importance"):
        t[f"layers.0.{name}"], t[f"layers.1.{name}"] = t[f"layers.1.{name}"], t[f"layers.0.{name}"]


def _edit_json(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        replaced = edit(meta)
        (folder / CONFIG_FILE).write_text(json.dumps(meta if replaced is None else replaced))

    return run


def _set(d: dict, key: str, value: object) -> None:
    d[key] = value


def _nan(t: dict) -> None:
    t["layers.0.representatives"][0, 0] = float("nan")


def _duplicate_neuron(t: dict) -> None:
    t["layers.1.perm"][1] = t["layers.1.perm"][0]


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "nan_representative": (_edit_tensors(_nan), r"layers\.0\.representatives holds NaN"),
    "perm_not_a_permutation": (_edit_tensors(_duplicate_neuron), r"layer 1: perm is not a permutation of 0\.\.127"),
    "missing_tensor": (_edit_tensors(lambda t: t.pop("layers.1.importance")), r"layers\.1\.importance is missing"),
    "missing_router_tensor": (_edit_tensors(lambda t: t.pop("layers.0.router.x_mean")), r"layers\.0\.router\.x_mean is missing"),
    "extra_tensor": (_edit_tensors(lambda t: _set(t, "layers.0.bonus", torch.zeros(3))), r"tensors for no layer: layers\.0\.bonus"),
    "int_for_float": (
        _edit_tensors(lambda t: _set(t, "layers.0.representatives", t["layers.0.representatives"].long())),
        r"layers\.0\.representatives has dtype torch\.int64, expected a float",
    ),
    "float_perm": (_edit_tensors(lambda t: _set(t, "layers.0.perm", t["layers.0.perm"].float())), r"layers\.0\.perm has dtype"),
    "wrong_shape": (
        _edit_tensors(lambda t: _set(t, "layers.1.representatives", t["layers.1.representatives"][:, :8].clone())),
        r"layers\.1\.representatives has shape \(8, 8\), expected \(8, 16\)",
    ),
    "not_safetensors": (lambda f: (f / PLAN_FILE).write_bytes(b"not safetensors"), "SHA-256 differs"),
    "not_safetensors_rehashed": (
        lambda f: ((f / PLAN_FILE).write_bytes(b"not safetensors"), _rehash(f)), "cannot be read as safetensors"
    ),
    "byte_flip": (_flip_byte, "SHA-256 differs"),
    "layers_swapped": (_swap_layers_unhashed, "SHA-256 differs"),
    "no_plan_file": (lambda f: (f / PLAN_FILE).unlink(), r"plan\.safetensors: missing"),
    "json_files_missing": (_edit_json(lambda m: m.pop("files") and None), r"missing keys \['files'\]"),
    "no_json": (lambda f: (f / CONFIG_FILE).unlink(), "not a moefy folder: moefy.json is missing"),
    "json_syntax": (lambda f: (f / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
    "json_is_a_list": (_edit_json(lambda m: [m]), "not a moefy plan"),
    "json_unknown_key_with_a_missing_one": (
        _edit_json(lambda m: (_set(m, "surprise", 1), m.pop("runtime"))[0]), r"top level has missing keys \['runtime'\]"
    ),
    "json_missing_key": (_edit_json(lambda m: m.pop("runtime") and None), r"top level has missing keys \['runtime'\]"),
    "json_layer_unknown_key": (
        _edit_json(lambda m: _set(m["layers"][1], "colour", "red")), r"layers\[1\] has .*unknown keys \['colour'\]"
    ),
    "json_base_unknown_key": (_edit_json(lambda m: _set(m["base"], "licence", "x")), r"base has .*unknown keys \['licence'\]"),

    "json_runtime_unknown_key": (_edit_json(lambda m: _set(m["runtime"], "temperature", 1.0)), "temperature"),
    "json_config_bad_value": (_edit_json(lambda m: _set(m["config"], "method", "kmean")), "kmean"),
    "json_layer_top_k": (_edit_json(lambda m: _set(m["layers"][0], "top_k", 99)), r"top_k 99 must be in 2\.\.8"),
    "json_layer_experts": (_edit_json(lambda m: _set(m["layers"][0], "num_experts", 7)), "do not fit an FFN of width 128"),
    "json_layer_tau": (_edit_json(lambda m: _set(m["layers"][1], "tau", 5.0)), "tau"),  # layer 1: after layer 0 fits
    "json_layers_out_of_order": (_edit_json(lambda m: m["layers"].reverse()), r"layers must be 0\.\.1 in order"),
    "json_base_layers": (_edit_json(lambda m: _set(m["base"], "num_layers", 3)), r"layers must be 0\.\.2 in order"),
    "json_format_version": (_edit_json(lambda m: _set(m, "format_version", 1)), r"format_version 1; .* reads 2"),
    "json_format": (_edit_json(lambda m: _set(m, "format", "peft")), "not a moefy plan"),
    "json_v1_checkpoint": (
        _edit_json(lambda m: {"format_version": 1, "base": m["base"], "layers": []}), r"moefy 0\.1 \(format 1.*re-convert"
    ),
    "json_config_missing_key": (_edit_json(lambda m: m["config"].pop("method") and None), r"missing setting\(s\) method"),
    "json_base_type": (_edit_json(lambda m: _set(m["base"], "d_ff", "128")), "positive integers"),
    "json_layer_block": (_edit_json(lambda m: _set(m["layers"][1], "block", "model.layers.7")), "edited after it was saved"),
    # valid values, but not those the plan was saved with: the JSON's model settings are checksummed
    "json_layer_tau_valid": (_edit_json(lambda m: _set(m["layers"][0], "tau", 0.5)), "runtime or layer settings were edited"),
    "json_runtime_top_k": (_edit_json(lambda m: _set(m["runtime"], "top_k", 3)), "runtime or layer settings were edited"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_plans_are_refused(corruption: str, saved_plan: Path, tmp_path: Path) -> None:
    corrupt, match = CORRUPTIONS[corruption]
    folder = Path(shutil.copytree(saved_plan, tmp_path / "plan"))
    corrupt(folder)
    base = loaded_tiny("llama")
    with pytest.raises(CheckpointError, match=match):
        MoEModel.from_pretrained(folder, base=base)
    assert moe_layers(base.model) == []  # nothing was applied


@pytest.mark.parametrize("other", ["seed", "family"])
def test_a_plan_refuses_another_base_naming_both(other: str, saved_plan: Path) -> None:
    base = loaded_tiny("llama", seed=5) if other == "seed" else loaded_tiny("mistral")
    plan = ModelPlan.load(saved_plan)
    with pytest.raises(CheckpointError) as err:
        MoEModel.from_pretrained(saved_plan, base=base)
    message = str(err.value)
    assert plan.base.describe() in message and base_identity(base).describe() in message
    assert moe_layers(base.model) == []


# ---- folders on disk: name resolution, export, the CLI ------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a Hugging Face folder with a real tokenizer."""
    return save_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibration_text_file(tmp_path_factory.mktemp("text") / "calibration.txt")


def test_adapter_finds_its_base_by_name_and_export_is_standalone(tiny_folder: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_folder))
    assert isinstance(loaded, LoadedModel) and loaded.source == str(tiny_folder)
    inputs = tiny_inputs(loaded.model)
    moe = convert_tiny(loaded, shared_fraction=0.25)
    converted = model_output(loaded.model, inputs)
    adapter = moe.save(tmp_path / "adapter")
    assert json.loads((adapter / CONFIG_FILE).read_text())["base"]["name"] == str(tiny_folder)
    by_name = api.load(str(adapter))  # no base given: the recorded folder
    assert isinstance(by_name, MoEModel)
    torch.testing.assert_close(model_output(by_name.model, inputs), converted, rtol=0, atol=0)

    out = moe.export(tmp_path / "standalone")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", *ADAPTER_FILES} <= names
    assert json.loads((out / CONFIG_FILE).read_text())["base"]["name"] == "."
    moved = Path(shutil.move(out, tmp_path / "moved"))  # standalone: it does not need tiny_folder's path
    again = MoEModel.from_pretrained(moved)
    torch.testing.assert_close(model_output(again.model, inputs), converted, rtol=0, atol=0)
    assert again.tokenizer("abc").input_ids == loaded.tokenizer("abc").input_ids
    assert isinstance(api.load(str(tiny_folder)), LoadedModel)  # a dense folder stays dense

    # generate works on loaded checkpoints and continues as the in-memory conversion does
    prompt = torch.tensor([again.tokenizer("abcabc").input_ids])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = moe.model.generate(prompt, **kwargs)
    for reloaded in (by_name, again):
        got = reloaded.model.generate(prompt, **kwargs)
        assert got.shape == (1, prompt.shape[1] + 6) and torch.equal(got, want)


def test_export_needs_a_base_on_disk(tmp_path: Path) -> None:
    moe = convert_tiny(loaded_tiny("llama"))  # built in memory: no folder to copy the base from
    with pytest.raises(MoefyError):
        moe.export(tmp_path / "standalone")
    assert not (tmp_path / "standalone").exists()


def test_cli_convert_builds_the_plan_of_the_api(tiny_folder: Path, calibration_file: Path, tmp_path: Path, capsys) -> None:
    from moefy.cli import main

    out = tmp_path / "cli"
    argv = ["convert", str(tiny_folder), "--experts", "8", "--top-k", "4", "--sample-size", "512",
            "--router-epochs", "3", "--calibration-text", str(calibration_file), "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert {p.name for p in out.iterdir()} == set(ADAPTER_FILES)
    config = config_for(str(tiny_folder), num_experts=8, top_k=4, sample_size=512, router_epochs=3)
    moe = api.convert(load_model(str(tiny_folder)), config, calibration_text=[str(calibration_file)])
    from_cli = ModelPlan.load(out)
    _assert_same_plan(from_cli, moe.plan)
    assert from_cli.runtime == moe.runtime
    reloaded = MoEModel.from_pretrained(out)
    inputs = tiny_inputs(moe.model)
    torch.testing.assert_close(model_output(reloaded.model, inputs), model_output(moe.model, inputs), rtol=0, atol=0)


def test_a_settings_typo_fails_fast_in_one_line(tmp_path: Path) -> None:
    """A typo fails before anything heavy is imported (no torch, no transformers: the issue's
    2-second bound, asserted on what makes it fast rather than on a wall clock)."""
    out = tmp_path / "out"
    code = (
        "import sys\nfrom moefy.cli import main\ntry:\n    raise SystemExit(main(sys.argv[1:]))\nfinally:\n"
        "    print(*[m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "convert", "smollm2-135m", "--method", "kmean", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "MOEFY_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--method" in lines[0] and "kmean" in lines[0] and all(m in lines[0] for m in METHODS)
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == ""  # neither torch nor transformers was imported
    assert list(tmp_path.iterdir()) == []  # nothing written: no output folder, no cache


# ---- the contracts a review of the plan split asked for ------------------------------------------
def test_convert_config_takes_top_k_alone_and_defaults_to_the_budget() -> None:
    from moefy.settings import DEFAULT_BUDGET, ConvertConfig

    assert ConvertConfig().effective_budget == DEFAULT_BUDGET
    assert ConvertConfig(top_k=64).effective_budget is None and ConvertConfig(top_k=64).top_k == 64
    with pytest.raises(InvalidArgumentError, match="not both"):
        ConvertConfig(top_k=64, budget=0.5)
    with pytest.raises(InvalidArgumentError, match="--sample-size 8 is too small"):
        ConvertConfig(sample_size=8)


def test_runtime_top_k_and_budget_replace_each_other() -> None:
    moe = convert_tiny(loaded_tiny("llama"))
    moe.configure(budget=0.6)
    k_budget = moe_layers(moe.model)[0].top_k
    moe.configure(top_k=8)  # the saved budget does not block a new k
    assert moe.runtime.budget is None and all(m.top_k == 8 for m in moe_layers(moe.model))
    moe.configure(budget=0.6)
    assert moe.runtime.top_k is None and all(m.top_k == k_budget for m in moe_layers(moe.model))


def test_the_plan_keeps_its_own_router_and_statics_are_saved(tmp_path: Path) -> None:
    """Modules get copies of the plan's routers (a bf16 base does not cast the plan; training one
    model does not change another), and what was changed in place (importance) is saved."""
    moe = convert_tiny(loaded_tiny("llama"))
    plan = moe.plan
    scorer = plan.layers[0].router
    assert scorer is not None and moe_layers(moe.model)[0].router.scorer is not scorer
    bf16 = loaded_tiny("llama")
    bf16.model.to(torch.bfloat16)
    apply(bf16, plan, REFERENCE)
    assert scorer.net[0].weight.dtype == torch.float32
    with torch.no_grad():
        moe_layers(bf16.model)[0].router.scorer.net[0].weight.add_(1.0)
    other = loaded_tiny("llama")
    apply(other, plan, REFERENCE)
    torch.testing.assert_close(moe_layers(other.model)[0].router.scorer.net[0].weight, scorer.net[0].weight)

    m = moe_layers(moe.model)[1]
    m.importance.copy_(torch.arange(m.num_experts, dtype=torch.float32))
    again = MoEModel.from_pretrained(moe.save(tmp_path / "plan"), base=loaded_tiny("llama"))
    torch.testing.assert_close(moe_layers(again.model)[1].importance, m.importance)


def test_apply_refuses_a_model_converted_under_another_plan() -> None:
    loaded = loaded_tiny("llama")
    convert_tiny(loaded)
    other = convert_tiny(loaded_tiny("llama"), method="random")
    with pytest.raises(InvalidArgumentError, match="converted under another plan"):
        apply(loaded, other.plan, REFERENCE)
    with pytest.raises(InvalidArgumentError, match="already converted"):
        base_identity(loaded)


def test_an_export_reloaded_and_saved_as_adapter_points_at_the_export(tiny_folder: Path, tmp_path: Path) -> None:
    moe = convert_tiny(load_model(str(tiny_folder)))
    export = moe.export(tmp_path / "standalone")
    adapter = MoEModel.from_pretrained(export).save(tmp_path / "adapter")
    recorded = json.loads((adapter / CONFIG_FILE).read_text())["base"]["name"]
    assert recorded == str(export.resolve())
    assert isinstance(api.load(str(adapter)), MoEModel)


def test_cli_runtime_flags_override_the_saved_runtime_flag_by_flag(tiny_folder: Path, tmp_path: Path) -> None:
    from moefy.cli import main

    moe = convert_tiny(load_model(str(tiny_folder)))
    moe.configure(tau=0.9, selection="static")
    folder = moe.save(tmp_path / "plan")
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--kernel", "torch_decode", "--max-sequences", "2", "--seq-len", "32",
                 "--json", str(out)]) == 0
    runtime = json.loads(out.read_text())["runtime"]
    assert runtime == {"top_k": None, "budget": None, "tau": 0.9, "selection": "static", "kernel": "torch_decode",
                       "zero_representatives": False}


def test_cli_runtime_flags_on_a_dense_model_fail_before_loading(capsys) -> None:
    from moefy.cli import main

    assert main(["eval", "no-such-model", "--top-k", "4"]) == 2
    assert "converted folders only" in capsys.readouterr().err


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, moefy.cli, moefy.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_neuron_selection_refuses_save_pretrained(tmp_path: Path) -> None:
    from moefy.neuron_selection import install_neuron_selection

    loaded = loaded_tiny("llama")
    samples = [torch.randn(256, 32) for _ in find_blocks(loaded.model, loaded.spec)]
    install_neuron_selection(loaded.model, loaded.spec, samples, method="cats", kept_fraction=0.5)
    with pytest.raises(InvalidArgumentError, match="save_pretrained"):
        loaded.model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_saved_folders_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder = convert_tiny(loaded_tiny("llama")).save(tmp_path / "plan")
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in folder.iterdir())


def test_sigterm_during_a_conversion_leaves_nothing_half_written(tiny_folder: Path, calibration_file: Path,
                                                                  tmp_path: Path) -> None:
    """A CLI conversion killed with SIGTERM while it works exits 143 and leaves no output folder and
    no temporary folder behind."""
    import signal

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moefy.cli", "convert", str(tiny_folder), "--experts", "8", "--top-k", "4",
           "--shared", "0", "--calibration-text", str(calibration_file), "--router-epochs", "20000", "--out", str(out)]
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err_parts: list[str] = []
    converting = threading.Event()

    def read_stderr() -> None:  # the progress bar appears once the CLI is converting (signal handler set)
        assert proc.stderr is not None
        while chunk := proc.stderr.read(1):  # unbuffered: the bar's first line has no successor for minutes
            err_parts.append(chunk)
            if chunk == ":" and "".join(err_parts[-11:]) == "converting:":
                converting.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert converting.wait(timeout=120), "".join(err_parts)[-2000:]
        time.sleep(1)  # inside the first router's training (20000 epochs: minutes)
        assert proc.poll() is None, "the conversion ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # never leave a stray conversion running
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    err = "".join(err_parts)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_leaves_no_temporary_folder(tmp_path: Path) -> None:
    from moefy.cli import Terminated
    from moefy.outputs import atomic_folder

    with pytest.raises(Terminated), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "moefy.json").write_text("{}")
        raise Terminated
    assert list(tmp_path.iterdir()) == []


def test_a_folder_whose_tokenizer_adds_bos_itself_evaluates_converts_and_generates(tmp_path: Path) -> None:
    """Llama-3 / Mistral / Gemma tokenizers add BOS themselves: windows must still be exactly
    seq_len tokens with one BOS first (this used to end in `shape '[-1, 256]' is invalid`)."""
    from moefy.cli import main
    from moefy.text import tokenize_text

    folder = save_tiny_folder(tmp_path / "bos-llama", adds_bos=True)
    loaded = load_model(str(folder))
    assert loaded.tokenizer("ab").input_ids[0] == loaded.tokenizer.bos_token_id
    batch = tokenize_text("hello world " * 200, loaded.tokenizer, 64, 4)
    assert batch.input_ids.shape == (4, 64) and (batch.input_ids[:, 0] == loaded.tokenizer.bos_token_id).all()
    assert (batch.input_ids[:, 1:] != loaded.tokenizer.bos_token_id).all()
    assert main(["eval", str(folder), "--max-sequences", "2", "--seq-len", "64"]) == 0
    out = tmp_path / "moe"
    assert main(["convert", str(folder), "--experts", "8", "--top-k", "4", "--shared", "0", "--sample-size", "512",
                 "--router-epochs", "2", "--calibration-sequences", "8", "--out", str(out)]) == 0
    moe = MoEModel.from_pretrained(out)
    prompt = moe.tokenizer("abc", return_tensors="pt").input_ids
    assert moe.model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, prompt.shape[1] + 4)


def test_a_plan_never_fetches_a_base_it_only_names(tmp_path: Path) -> None:
    """A recorded base that is not bundled and not a local folder (a hub id, or a folder that moved)
    is loaded only when the user confirms it with --base."""
    folder = convert_tiny(loaded_tiny("llama")).save(tmp_path / "plan")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["base"]["name"] = "someone/a-model-on-the-hub"
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"pass --base someone/a-model-on-the-hub"):
        MoEModel.from_pretrained(folder)
    assert isinstance(MoEModel.from_pretrained(folder, base=loaded_tiny("llama")), MoEModel)


@pytest.mark.parametrize("where", ["top", "config"])
def test_unknown_keys_from_a_newer_moefy_are_ignored_where_safe(where: str, saved_plan: Path, tmp_path: Path,
                                                                 caplog) -> None:
    """Forward compatibility: information a newer moefy adds at the top level or as a search
    setting is warned about and ignored; the model is the same."""
    folder = tmp_path / "plan"
    shutil.copytree(saved_plan, folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    (meta if where == "top" else meta["config"])["added_by_a_newer_moefy"] = {"x": 1}
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    reference = MoEModel.from_pretrained(saved_plan, base=loaded_tiny("llama"))
    with caplog.at_level("WARNING", logger="moefy.plan"):
        again = MoEModel.from_pretrained(folder, base=loaded_tiny("llama"))
    assert "added_by_a_newer_moefy" in caplog.text
    inputs = tiny_inputs(again.model)
    torch.testing.assert_close(model_output(again.model, inputs), model_output(reference.model, inputs), rtol=0, atol=0)
