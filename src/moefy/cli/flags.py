"""CLI flags generated from the settings dataclasses (`moefy.settings`), so `--help` shows the real
defaults and valid choices, and a one-line-error argument parser."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, Field, fields
from typing import Any, NoReturn

from moefy.settings import RuntimeConfig, flag_name


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as every other moefy error."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _field_type(f: Field) -> type:
    t = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return typ
    return str


def add_settings(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    """One flag per CLI-visible field of `cls`; unset flags stay absent from the namespace
    (argparse.SUPPRESS), so only what the user typed overrides the defaults."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        typ = _field_type(f)
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if choices:
            help_text += f"; one of: {', '.join(choices)}"
        flag = flag_name(f)
        if typ is bool:
            if default:
                group.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                   help=f"do not {help_text} (default: do)")
            else:
                group.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        shown = "none" if default is None else default
        group.add_argument(flag, dest=f.name, type=typ, default=argparse.SUPPRESS, metavar=_metavar(f, typ),
                           help=f"{help_text} (default: {shown})")


def _metavar(f: Field, typ: type) -> str:
    if f.metadata.get("choices"):
        return "{" + ",".join(f.metadata["choices"]) + "}"
    return {int: "N", float: "X"}.get(typ, "NAME")


DTYPES = ("float32", "bfloat16", "float16")  # moefy.models.DTYPES, without importing torch here


def add_dtype(parser: argparse.ArgumentParser) -> None:
    """--dtype and --device: the precision and the place the model is loaded and run in."""
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="precision the model is loaded and run in (default: float32)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where the model is loaded and run: cpu, cuda, cuda:N or mps (default: cpu)")


def check_device(args: argparse.Namespace) -> None:
    """--device names a device this machine has (checked before any model loads)."""
    from moefy.models import torch_device

    torch_device(args.device)


def settings_from(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of `cls` the user gave, as keyword arguments."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def runtime_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime flags the user gave, checked now (before any model loads); they override the
    runtime a converted folder was saved with, flag by flag."""
    given = settings_from(args, RuntimeConfig)
    RuntimeConfig().replace(**given)  # validates the values and their combination
    return given


__all__ = ["Parser", "add_dtype", "check_device", "add_settings", "runtime_changes", "settings_from"]
