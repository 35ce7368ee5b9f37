"""Property-based fuzzing (hypothesis) of what users and files feed moefy: CLI flags, settings, and
saved plans (JSON mutations, truncations, byte flips). Every case ends in a clear MoefyError (exit
code 2 from the CLI) or an identical model — never a traceback, never a silently different model.

Budget: 60 + 60 + 80 + 40 examples, a few seconds on 2 cores (`max_examples` below)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moefy.cli import main
from moefy.errors import MoefyError
from moefy.moe_model import MoEModel
from moefy.plan import CONFIG_FILE, PLAN_FILE
from moefy.settings import ConvertConfig, RuntimeConfig
from tests.analysis_fixtures import convert_tiny, loaded_tiny
from tests.tiny_models import model_output, tiny_inputs

FAST = settings(
    deadline=None, database=None, derandomize=True,  # reproducible in CI, nothing written to the repo
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
)
CONFIG_FIELDS = [
    "num_experts", "budget", "top_k", "method", "shared_fraction", "representatives", "router_target", "router_hidden",
    "router_epochs", "static_ranking", "sequential", "calibration_sequences", "sample_size", "seed", "eps",
]


@settings(FAST, max_examples=60)
@given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), values, max_size=4))
def test_convert_config_is_built_or_refused_clearly(kwargs: dict) -> None:
    try:
        ConvertConfig(**kwargs)
    except MoefyError:
        pass  # a clear error naming the setting
    except TypeError:
        pytest.fail(f"a TypeError escaped for {kwargs}")  # would be a traceback


@settings(FAST, max_examples=60)
@given(st.dictionaries(st.sampled_from(["top_k", "budget", "tau", "selection", "kernel"]), values, max_size=3))
def test_runtime_config_is_built_or_refused_clearly(kwargs: dict) -> None:
    try:
        RuntimeConfig(**kwargs)
    except MoefyError:
        pass


FLAGS = ["--experts", "--budget", "--top-k", "--method", "--shared", "--representatives", "--router-hidden",
         "--router-epochs", "--calibration-sequences", "--sample-size", "--seed", "--no-sequential", "--overwrite"]
flag_values = st.one_of(st.integers(-5, 10**5).map(str), st.floats(allow_nan=True).map(str), st.text(max_size=8))


@settings(FAST, max_examples=80)
@given(st.lists(st.tuples(st.sampled_from(FLAGS), flag_values), max_size=4))
def test_cli_flags_end_in_exit_2_and_one_line(tmp_path: Path, capsys, flags: list) -> None:
    """A model path that does not exist: whatever the flags, the run ends with exit 2 and one line on
    stderr, before anything loads or is written."""
    argv = ["convert", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")]
    for flag, value in flags:
        argv += [flag] if flag in ("--no-sequential", "--overwrite") else [flag, value]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (one line, see moefy.cli.flags.Parser)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def plan_and_logits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    loaded = loaded_tiny("llama")
    moe = convert_tiny(loaded, shared_fraction=0.25)
    folder = moe.save(tmp_path_factory.mktemp("fuzz") / "plan")
    return folder, model_output(loaded.model, tiny_inputs(loaded.model))


def _load_or_refuse(folder: Path, reference: torch.Tensor) -> None:
    """The folder loads to exactly the reference model, or is refused with a MoefyError."""
    try:
        again = MoEModel.from_pretrained(folder, base=loaded_tiny("llama"))
    except MoefyError:
        return
    torch.testing.assert_close(model_output(again.model, tiny_inputs(again.model)), reference, rtol=0, atol=0)


def _fresh_copy(plan_and_logits: tuple[Path, torch.Tensor], factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A copy of the saved plan for one example to damage, and the reference logits."""
    source, reference = plan_and_logits
    folder = factory.mktemp("case") / "plan"
    shutil.copytree(source, folder)
    return folder, reference


def _paths(d: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


@settings(FAST, max_examples=80)
@given(st.data())
def test_mutated_plan_json_loads_identically_or_is_refused(plan_and_logits, tmp_path_factory, data) -> None:
    folder, reference = _fresh_copy(plan_and_logits, tmp_path_factory)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    path = data.draw(st.sampled_from(_paths(meta)))
    mutated = copy.deepcopy(meta)
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(values)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    (folder / CONFIG_FILE).write_text(json.dumps(mutated))
    _load_or_refuse(folder, reference)


@settings(FAST, max_examples=40)
@given(st.data())
def test_damaged_plan_file_is_refused(plan_and_logits, tmp_path_factory, data) -> None:
    folder, _ = _fresh_copy(plan_and_logits, tmp_path_factory)
    raw = bytearray((folder / PLAN_FILE).read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]  # truncated
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))  # one byte changed
    (folder / PLAN_FILE).write_bytes(bytes(raw))
    with pytest.raises(MoefyError):
        MoEModel.from_pretrained(folder, base=loaded_tiny("llama"))
