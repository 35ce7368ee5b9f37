"""Resumable search (`moefy.search_checkpoint`): a conversion killed with SIGKILL after a block was
checkpointed resumes there and saves the plan an uninterrupted run saves, tensor for tensor; a
checkpoint of other settings is reported and replaced; a damaged or foreign folder is a clear error;
a streamed search's checkpoint resumes in memory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moefy import api
from moefy import search_checkpoint as sc
from moefy.conversion import search
from moefy.errors import CheckpointError
from moefy.models import load_model
from tests.analysis_fixtures import random_batches, tiny_settings
from tests.test_streaming import LAYERS, assert_same_plan, sharded_folder
from tests.tiny_folders import calibration_text_file

ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER = 1  # the process dies right after block 1's checkpoint is written
# the CLI, with the checkpoint writer patched to SIGKILL its own process after block KILL_AFTER
KILLED_CLI = f"""
import os, signal, sys
import moefy.search_checkpoint as sc
real = sc.SearchCheckpoint.save_block
def save_then_die(self, lp, hidden, seconds):
    real(self, lp, hidden, seconds)
    if lp.index == {KILL_AFTER}:
        os.kill(os.getpid(), signal.SIGKILL)
sc.SearchCheckpoint.save_block = save_then_die
from moefy.cli import main
sys.exit(main(sys.argv[1:]))
"""


# the CLI twice in one process: the arguments before and after "--then"
TWO_RUNS = "import sys; from moefy.cli import main; a = sys.argv[1:]; i = a.index('--then'); sys.exit(main(a[:i]) or main(a[i + 1:]))"


def _cli(args: list[str], killed: bool = False) -> subprocess.CompletedProcess:
    code = KILLED_CLI if killed else TWO_RUNS
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}  # one thread: bit-reproducible sums
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_killed_conversion_resumes_to_the_same_plan(tmp_path: Path) -> None:
    folder = str(sharded_folder(tmp_path / "llama"))
    text = calibration_text_file(tmp_path / "calib.txt")
    flags = ["--no-distill", "--experts", "8", "--top-k", "4", "--shared", "0", "--sample-size", "512", "--router-epochs", "2",
             "--router-hidden", "16", "--calibration-sequences", "8", "--calibration-text", str(text)]
    out, fresh = tmp_path / "moe", tmp_path / "fresh"
    killed = _cli(["convert", folder, "--out", str(out), *flags], killed=True)
    assert killed.returncode == -9, killed.stderr
    state = json.loads((tmp_path / "moe.search" / "search.json").read_text())
    assert state["done"] == KILL_AFTER + 1 and not out.exists()
    # resumed, then an uninterrupted run (in one process: one start-up less)
    runs = _cli(["--verbose", "convert", folder, "--out", str(out), *flags, "--then", "convert", folder, "--out", str(fresh), *flags])
    assert runs.returncode == 0, runs.stderr
    assert f"search resumes at block {KILL_AFTER + 1} of {LAYERS}" in runs.stderr
    assert not (tmp_path / "moe.search").exists()  # removed once the plan is saved
    a, b = load_file(str(out / "plan.safetensors")), load_file(str(fresh / "plan.safetensors"))
    assert a.keys() == b.keys()
    for k, v in a.items():  # bit for bit: one thread, and the search pins the converted blocks' kernel
        # (a timed sparse/dense choice could differ between the two processes and move the last bits)
        assert torch.equal(v, b[k]), k


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    real = sc.SearchCheckpoint.save_block

    def save_then_stop(self: sc.SearchCheckpoint, lp, hidden, seconds) -> None:  # type: ignore[no-untyped-def]
        real(self, lp, hidden, seconds)
        if lp.index == index:
            raise KeyboardInterrupt

    monkeypatch.setattr(sc.SearchCheckpoint, "save_block", save_then_stop)


def test_a_streamed_search_resumes_in_memory_and_other_settings_start_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moefy.search_checkpoint")
    folder = str(sharded_folder(tmp_path / "llama"))
    config, _ = tiny_settings(sequential=True)
    batches = random_batches(24, 48)
    ckpt = tmp_path / "ckpt"
    whole = search(load_model(folder), batches, config)
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(KeyboardInterrupt):
            api.convert_plan(folder, config, stream=True, calibration=batches, search_checkpoint_dir=ckpt)
    resumed = search(load_model(folder), batches, config, checkpoint_dir=ckpt)
    assert "search resumes at block 1" in caplog.text
    assert_same_plan(whole, resumed)
    caplog.clear()
    other = search(load_model(folder), batches, config.replace(router_epochs=2, seed=1), checkpoint_dir=ckpt)
    assert "another search (different: router_epochs, seed); starting over" in caplog.text
    assert other.layers[0].router_recall is not None
    caplog.clear()
    search(load_model(folder), random_batches(24, 48, seed=2), config, checkpoint_dir=ckpt)
    assert "(different: calibration, router_epochs, seed)" in caplog.text


def test_damaged_or_foreign_checkpoint_folders_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = str(sharded_folder(tmp_path / "llama"))
    config, _ = tiny_settings()
    batches = random_batches(24, 48)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(KeyboardInterrupt):
            search(load_model(folder), batches, config, checkpoint_dir=ckpt)
    (ckpt / "hidden.1.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="damaged"):
        search(load_model(folder), batches, config, checkpoint_dir=ckpt)
    (ckpt / "search.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot be read"):
        search(load_model(folder), batches, config, checkpoint_dir=ckpt)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a search checkpoint"):
        search(load_model(folder), batches, config, checkpoint_dir=foreign)
    assert (foreign / "notes.txt").is_file()
