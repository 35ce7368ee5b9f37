"""The `moefy` command line: one table of commands, each a function whose docstring is its --help
and whose flags come from one `add_*` function (settings flags are generated from
`moefy.settings`). Library code logs; only the CLI prints. Any MoefyError or bad flag is one line
on stderr and exit code 2; transformers' own log lines and load bars are silenced unless -v."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

from moefy import __version__
from moefy.cli import analysis_commands as analysis
from moefy.cli import compare_commands as compare
from moefy.cli import model_commands as models
from moefy.cli import speed_commands as speed
from moefy.cli.flags import Parser
from moefy.errors import MoefyError


class Command(NamedTuple):
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    summary: str


COMMANDS: dict[str, Command] = {
    "run": Command(models.cmd_run, models.add_run, "the main job: evaluate, convert, evaluate, save, report"),
    "convert": Command(models.cmd_convert, models.add_convert, "convert a dense model into an MoE (saves an adapter folder)"),
    "eval": Command(models.cmd_eval, models.add_eval, "evaluate a dense model or a converted folder on held-out text"),
    "inspect": Command(models.cmd_inspect, models.add_inspect, "show a converted folder's plan, per layer"),
    "export": Command(models.cmd_export, models.add_export, "write a standalone folder: base weights + plan + tokenizer"),
    "finetune": Command(speed.cmd_finetune, speed.add_finetune, "fine-tune a converted model's routers end to end"),
    "bench": Command(speed.cmd_bench, speed.add_bench, "speed: dense vs MoE, FFN layers and end to end"),
    "flops": Command(models.cmd_flops, models.add_flops, "FFN FLOPs per token: dense vs MoE"),
    "stats": Command(models.cmd_stats, models.add_stats, "per-layer FFN activation statistics of a dense model"),
    "analyze": Command(analysis.cmd_analyze, analysis.add_analyze, "sparsity, routing, specialisation and cost figures"),
    "report": Command(analysis.cmd_report, analysis.add_report, "self-contained HTML report of a converted folder"),
    "compare": Command(compare.cmd_compare, compare.add_compare, "the paper's Tables 1-3 in kind: methods x FFN budgets x selection"),
    "models": Command(models.cmd_models, models.add_models, "bundled models and supported families"),
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moefy",
        description="Turn a dense pretrained transformer into a real, faster Mixture-of-Experts model "
        "without retraining its weights (Generalized MoEfication).",
    )
    p.add_argument("--version", action="version", version=f"moefy {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (and transformers' own messages)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, cmd in COMMANDS.items():
        s = sub.add_parser(name, help=cmd.summary, description=inspect.cleandoc(cmd.run.__doc__ or cmd.summary),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(s)
        s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        s.set_defaults(func=cmd.run)
    return p


def _quiet_libraries(verbose: bool) -> None:
    """Silence transformers' log lines and load bars (unless -v) through its environment variables,
    so that nothing heavy is imported before the command has checked its arguments."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported (e.g. main() called from Python): tell it directly
        transformers = sys.modules["transformers"]
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that half-written outputs are cleaned up on the way out."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad flag (already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        _quiet_libraries(args.verbose)
        return int(args.func(args) or 0)
    except MoefyError as e:
        print(f"moefy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moefy: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("moefy: terminated", file=sys.stderr)
        return 143


__all__ = ["COMMANDS", "build_parser", "main"]
