"""Loading model folders safely: a folder's own Python never runs, only safetensors are read, and a
broken folder is a one-line error (exit 2 from the CLI), not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moefy.cli import main
from moefy.errors import MoefyError
from moefy.models import load_model
from tests.tiny_folders import save_tiny_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return save_tiny_folder(tmp_path / "tiny-llama")


def test_a_folders_custom_code_never_runs(folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    (folder / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_model.Cfg", "AutoModelForCausalLM": "custom_model.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(folder))
    assert type(loaded.model).__module__.startswith("transformers.")
    assert not marker.exists()


def test_pickled_weights_are_not_read(folder: Path) -> None:
    weights = folder / "model.safetensors"
    model = load_model(str(folder)).model
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(MoefyError, match="safetensors only"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "breakage",
    ["config_not_json", "config_no_model_type", "no_weights", "truncated_weights", "no_tokenizer"],
)
def test_a_broken_folder_is_a_one_line_error(breakage: str, folder: Path, capsys) -> None:
    if breakage == "config_not_json":
        (folder / "config.json").write_text("{not json")
    elif breakage == "config_no_model_type":
        config = json.loads((folder / "config.json").read_text())
        config.pop("model_type")
        config.pop("architectures", None)
        (folder / "config.json").write_text(json.dumps(config))
    elif breakage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "truncated_weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        for f in folder.glob("tokenizer*"):
            f.unlink()
    assert main(["eval", str(folder), "--max-sequences", "1", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moefy: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_a_seq_len_beyond_the_context_is_refused(folder: Path, capsys) -> None:
    assert main(["eval", str(folder), "--seq-len", "1024", "--max-sequences", "1"]) == 2
    assert "--seq-len 1024 exceeds the model's context of 512 tokens" in capsys.readouterr().err


def test_a_non_finite_model_is_an_error_not_a_number(folder: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in weights if "mlp.down_proj" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main(["eval", str(folder), "--seq-len", "32", "--max-sequences", "1"]) == 2
    assert "not finite" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_convert_and_eval_in_half_precision(dtype: str, folder: Path, tmp_path: Path, capsys) -> None:
    """`--dtype` loads, converts and evaluates in half precision; a plan made in half precision
    loads onto the fp32 base (the base identity is dtype-independent) and the reverse."""
    from moefy.calibrate import DEFAULT_EPS  # noqa: F401 - the package imports
    from moefy.conversion import moe_layers
    from moefy.moe_model import MoEModel
    from tests.tiny_folders import calibration_text_file

    text = calibration_text_file(tmp_path / "c.txt")
    out = tmp_path / "moe"
    assert main(["convert", str(folder), "--dtype", dtype, "--experts", "8", "--top-k", "4", "--shared", "0",
                 "--sample-size", "512", "--router-epochs", "2", "--calibration-sequences", "8",
                 "--calibration-text", str(text), "--out", str(out)]) == 0, capsys.readouterr().err
    half = MoEModel.from_pretrained(out, dtype=dtype)
    assert all(m.w_in.dtype == getattr(torch, dtype) for m in moe_layers(half.model))
    full = MoEModel.from_pretrained(out)  # the fp32 base accepts the plan made in half precision
    assert all(m.w_in.dtype == torch.float32 for m in moe_layers(full.model))
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--dtype", dtype, "--seq-len", "64", "--max-sequences", "2",
                 "--json", str(report)]) == 0, capsys.readouterr().err
    assert all(torch.isfinite(torch.tensor(s["perplexity"])) for s in json.loads(report.read_text())["splits"])


def test_a_bad_dtype_is_a_one_line_error(folder: Path, capsys) -> None:
    assert main(["eval", str(folder), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dtype" in err and "bfloat16" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device 'tpu' is not a device"),
    ("cuda:x", "--device 'cuda:x' is not a device"),
    pytest.param("cuda", "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
@pytest.mark.parametrize("command", ["eval", "convert", "run"])
def test_a_bad_device_is_a_one_line_error_before_loading(command: str, device: str, message: str, folder: Path,
                                                         tmp_path: Path, capsys) -> None:
    extra = ["--out", str(tmp_path / "o")] if command != "eval" else []
    assert main([command, str(folder), "--device", device, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["convert", "run"])
def test_an_expert_count_that_cannot_fit_fails_before_loading(command: str, folder: Path, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import moefy.models

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(moefy.models, "load_model", no_load)
    monkeypatch.setattr("moefy.api.load_model", no_load)
    monkeypatch.setattr("moefy.pipeline.load_model", no_load)
    assert main([command, str(folder), "--experts", "7", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--experts 7 does not divide the FFN width 128" in err


def test_ffn_width_is_read_without_loading(folder: Path, tmp_path: Path) -> None:
    from moefy.models import ffn_width

    assert ffn_width(str(folder)) == 128
    assert ffn_width("smollm2-135m") == 1536 and ffn_width("minilm-l6") == 1536
    assert ffn_width(str(tmp_path / "nothing")) is None  # load_model reports it
    gpt2 = save_tiny_folder(tmp_path / "g", "gpt2")
    assert ffn_width(str(gpt2)) == 128


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convert_on_cuda_matches_cpu(folder: Path, tmp_path: Path) -> None:  # pragma: no cover - GPU machines only
    from moefy.api import load
    from moefy.settings import RuntimeConfig
    from tests.tiny_models import tiny_inputs

    cpu = load(str(folder))
    inputs = tiny_inputs(cpu.model)
    ref = cpu.model(**inputs).logits
    gpu = load(str(folder), device="cuda")
    out = gpu.model(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert RuntimeConfig(kernel="auto").kernel == "auto"
