"""Data-parallel calibration (`moefy.distributed`): a search run by 2 processes under torchrun
(gloo) makes the single-process plan, up to float64 summation order in the statistics: equal
permutations, other tensors within rtol 1e-5."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def assert_plans_close(a: Path, b: Path, rtol: float, atol: float) -> None:
    """The plan tensors of two adapter folders: the same names, equal permutations, the rest close."""
    ta, tb = load_file(str(a / "plan.safetensors")), load_file(str(b / "plan.safetensors"))
    assert ta.keys() == tb.keys()
    for k, v in tb.items():
        if k.endswith(".perm"):
            assert torch.equal(ta[k], v), k
        else:
            torch.testing.assert_close(ta[k], v, rtol=rtol, atol=atol, msg=k)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_make_the_single_process_plan(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "distributed_search.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_plans_close(tmp_path / "parallel", tmp_path / "single", rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_cli_convert_under_torchrun_saves_the_single_process_plan(tmp_path: Path) -> None:
    from moefy.cli import main
    from tests.test_streaming import sharded_folder
    from tests.tiny_folders import calibration_text_file

    folder = str(sharded_folder(tmp_path / "llama"))
    text = calibration_text_file(tmp_path / "calib.txt")
    flags = ["--no-distill", "--experts", "8", "--top-k", "4", "--shared", "0", "--sample-size", "512", "--router-epochs", "2",
             "--router-hidden", "16", "--calibration-sequences", "24", "--calibration-text", str(text)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "moefy.cli", "convert", folder, "--out",
         str(tmp_path / "parallel"), *flags], capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1  # rank 0 alone writes and reports
    assert main(["convert", folder, "--out", str(tmp_path / "single"), *flags]) == 0
    assert_plans_close(tmp_path / "parallel", tmp_path / "single", rtol=1e-4, atol=1e-5)  # other thread counts here
