"""The ``tagstream`` command line: ``run``, ``score``, ``produce``, ``replay``, ``profiles``,
``schemas`` and ``serve``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from worker import __version__
from worker.exit_codes import EXIT_USAGE

# Sub-command name -> (module under worker.commands, one-line help). Modules are imported
# only when their command runs, so ``tagstream schemas`` never pays for importing torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "consume, score and produce: the streaming worker"),
    "score": ("score", "score JSON-lines events from a file or stdin to stdout"),
    "produce": ("produce", "send input events to a topic"),
    "replay": ("replay", "send dead-lettered inputs back into the stream"),
    "profiles": ("profiles", "set, delete and list the label profiles of the control topic"),
    "schemas": ("schemas", "write the JSON Schema files of the event contract"),
    "serve": ("serve", "score over HTTP on the same micro-batcher: POST /v1/classify"),
}


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(f"worker.commands.{COMMANDS[name][0]}")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagstream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tagstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _command_module(name).configure(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    result: int = _command_module(args.command).execute(args)
    return result
