"""The ``visiontune`` command line.

Every command that takes ``--config FILE.yaml`` also takes ``--set
section.key=value`` (repeatable) and a few shortcut flags; flags win over the
file.  Errors a user can fix (a missing folder, an unknown setting, a bad
image) are ``visiontune.errors.UserError``s: printed as one clear line, exit
status 2, and a traceback only with ``--verbose``.

The command modules beside this file register their subcommands; they import
the pipeline and serving lazily, so ``visiontune --help`` loads no TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from visiontune.errors import UserError

# Modules adding subcommands: each has ``add_commands(subparsers)``, registering
# functions ``func(args) -> int``.
COMMAND_MODULES = ("visiontune.cli.run", "visiontune.cli.vertex", "visiontune.cli.serve",
                   "visiontune.cli.report", "visiontune.cli.compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune",
        description="Fine-tune ImageNet-pretrained Keras backbones on your images with TFX "
                    "and push them to TF Serving.")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show TFX/Beam/TensorFlow logs, and tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # absl routes TFX's per-component chatter through here.
        import absl.logging
        absl.logging.set_verbosity(absl.logging.WARNING)
    logging.getLogger("visiontune").setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"visiontune {args.command}: error: {e}", file=sys.stderr)
        return 2
