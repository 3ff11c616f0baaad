"""The ``imagebert-ds`` console script.

Each sub-package contributes its sub-commands through a ``register(subparsers)`` function in its
own ``cli`` module; heavy imports (torch, DALI, DeepSpeed) happen inside the handlers so that
``imagebert-ds --help`` stays fast. ``main`` maps a command's errors to exit codes
(``runtime.errors``); a command whose bad arguments surface as ``ValueError`` /
``FileNotFoundError`` says so with ``set_defaults(usage_errors=True)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in help order.
_COMMAND_MODULES = (
    "imagebert_ds.model.cli",
    "imagebert_ds.data.cli",
    "imagebert_ds.train.cli",
    "imagebert_ds.demo",
    "imagebert_ds.eval.cli",
    "imagebert_ds.relation.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``imagebert-ds`` parser with every sub-package's sub-commands."""
    parser = argparse.ArgumentParser(
        prog="imagebert-ds", description="Cross-modal BERT pre-training (ImageBERT)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module: surface it
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the console script; returns the exit code."""
    from imagebert_ds.runtime.errors import run_command

    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(lambda: args.func(args), args.command,
                       catch_value_errors=getattr(args, "usage_errors", False))


if __name__ == "__main__":
    sys.exit(main())
