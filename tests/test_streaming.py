"""Layer-streaming search (`moefy.streaming`): a model read block by block from its safetensors
shards gets the plan the in-memory search makes, tensor for tensor (fp32, bf16, fp16; gated, Conv1D
with biases, an encoder with the split FFN layout); only one block is ever materialised; the CLI's
`convert --stream` saves a plan that loads onto the base; a folder without safetensors is a
one-line error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from moefy import api, streaming
from moefy.cli import main
from moefy.conversion import search
from moefy.errors import UnknownModelError
from moefy.models import load_model
from moefy.moe_ffn import MoEFFN
from moefy.moe_model import MoEModel
from moefy.plan import ModelPlan
from moefy.streaming import ShardedWeights, skeleton, streamed_identity
from tests.analysis_fixtures import random_batches, tiny_settings
from tests.tiny_folders import MAX_POSITIONS, calibration_text_file, char_tokenizer
from tests.tiny_models import tiny_model

LAYERS = 3


def sharded_folder(folder: Path, model_type: str = "llama") -> Path:
    """A tiny model of 3 blocks saved as several safetensors shards (with an index) + tokenizer."""
    key = "n_positions" if model_type == "gpt2" else "max_position_embeddings"
    layers = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    model = tiny_model(model_type, **{key: MAX_POSITIONS, layers: LAYERS})
    model.save_pretrained(folder, max_shard_size="60KB")
    char_tokenizer(wraps=model_type == "bert").save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def assert_same_plan(a: ModelPlan, b: ModelPlan) -> None:
    assert a.base == b.base
    assert len(a.layers) == len(b.layers) == LAYERS
    for la, lb in zip(a.layers, b.layers, strict=True):
        ta, tb = la.tensors(), lb.tensors()
        assert ta.keys() == tb.keys()
        for k, v in ta.items():  # integers (permutations) exactly; floats to the last bits: the blocks a
            # sequential search has converted run the multi-threaded C++ kernel, whose sums may round differently
            torch.testing.assert_close(v, tb[k], rtol=1e-5, atol=1e-6, msg=f"layer {la.index}: {k}")


@pytest.mark.parametrize(("model_type", "dtype"), [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "float16"),
                                                   ("bert", "float32")])
def test_streamed_plan_equals_the_in_memory_plan(model_type: str, dtype: str, tmp_path: Path) -> None:
    folder = str(sharded_folder(tmp_path / model_type, model_type))
    config, _ = tiny_settings(sequential=True)
    batches = random_batches(24, 48)
    in_memory = search(load_model(folder, dtype), batches, config)
    streamed = api.convert_plan(folder, config, stream=True, calibration=batches, dtype=dtype)
    assert_same_plan(in_memory, streamed)


class OneBlockAtATime(ShardedWeights):
    """Checks, whenever a block is loaded, that no other block holds real weights, and after the
    walk that every block is back on "meta" without its MoE FFN."""

    def block(self, index: int, name: str, block: nn.Module) -> AbstractContextManager[None]:
        @contextmanager
        def checked() -> Iterator[None]:
            with super(OneBlockAtATime, self).block(index, name, block):
                for n, other in self.blocks:
                    real = [p for p in other.parameters() if not p.is_meta]
                    assert bool(real) == (n == name), f"{n} is materialised while {name} is"
                yield

        return checked()


def test_only_one_block_is_in_memory(tmp_path: Path) -> None:
    folder = str(sharded_folder(tmp_path / "llama"))
    loaded, weights = skeleton(folder)
    assert all(p.is_meta for p in loaded.model.parameters())
    checked = OneBlockAtATime(weights.folder, weights.index, weights.model, weights.spec, weights.dtype, weights.device)
    config, _ = tiny_settings(sequential=True)
    plan = search(loaded, random_batches(24, 48), config, base=streamed_identity(loaded, checked), weights=checked)
    assert len(plan.layers) == LAYERS
    assert all(p.is_meta for p in loaded.model.parameters())
    assert not any(isinstance(m, MoEFFN) for m in loaded.model.modules())


def test_cli_convert_stream_saves_a_plan_that_loads_onto_the_base(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "bound_heap", lambda: None)  # process-wide malloc settings: not in the test process
    folder = str(sharded_folder(tmp_path / "llama"))
    out = tmp_path / "moe"
    text = calibration_text_file(tmp_path / "calib.txt")
    flags = ["--experts", "8", "--top-k", "4", "--shared", "0", "--sample-size", "512", "--router-epochs", "2",
             "--router-hidden", "16", "--calibration-sequences", "8", "--calibration-text", str(text)]
    assert main(["convert", folder, "--stream", "--out", str(out), *flags]) == 0  # distillation asked for, skipped
    assert "distillation is skipped" in caplog.text
    assert not (tmp_path / "moe.search").exists()
    plan = ModelPlan.load(out)
    assert plan.config.distill is False
    moe = MoEModel.from_pretrained(str(out))  # the recorded base, hash verified
    assert sum(isinstance(m, MoEFFN) for m in moe.model.modules()) == LAYERS


def test_stream_needs_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    tiny_model("llama").config.save_pretrained(folder)
    with pytest.raises(UnknownModelError, match="has no \\*.safetensors"):
        skeleton(str(folder))


def test_stream_skips_what_needs_the_whole_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = str(sharded_folder(tmp_path / "llama"))
    config, _ = tiny_settings(budget=0.9, adaptive_k=True, distill=True)
    plan = api.convert_plan(folder, config, stream=True, calibration=random_batches(24, 48))
    assert "distillation is skipped" in caplog.text and "--adaptive-k is skipped" in caplog.text
    assert plan.config.distill is False and plan.config.adaptive_k is False
