"""The ``visiontune`` command line.

Every command that takes ``--config FILE.yaml`` also takes ``--set
section.key=value`` (repeatable) and a few shortcut flags; flags win over the
file.  Errors a user can fix (a missing folder, an unknown setting, a bad
image) are ``visiontune.errors.UserError``s: printed as one clear line, exit
status 2, and a traceback only with ``--verbose``; so is a full disk or a
folder the user may not write, wherever it is met.  Ctrl-C stops a command
with one line saying what it left, exit status 130.  Commands with output
folders name them in ``args.output_folders`` (messages name these, not the
files inside them).

Output is quiet by default: a command's result, one line per pipeline
component as it starts and ends, Keras's epoch lines, our own ``visiontune.*``
log messages and every error; ``--verbose`` (before or after the command)
brings back the libraries' logs and warnings (see ``_configure_output``).

The command modules beside this file register their subcommands; they import
the pipeline and serving lazily, so ``visiontune --help`` loads no TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import traceback
import warnings
from typing import Optional, Sequence

from visiontune.cli import allocator, interrupts
from visiontune.errors import Interrupted, UserError, disk_problem, was_interrupted

# Modules adding subcommands: each has ``add_commands(subparsers)``, registering
# functions ``func(args) -> int``.
# Stopped by Ctrl-C: the shell's status for a command ended by SIGINT (128 + 2).
STOPPED_STATUS = 130
COMMAND_MODULES = ("visiontune.cli.run", "visiontune.cli.vertex", "visiontune.cli.serve",
                   "visiontune.cli.report", "visiontune.cli.compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune",
        description="Fine-tune ImageNet-pretrained Keras backbones on your images with TFX "
                    "and push them to TF Serving.")
    verbose_help = ("show the libraries' logs and warnings (TFX, Beam, TensorFlow, absl), "
                    "and tracebacks of errors")
    parser.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    # Also after the command (``visiontune run -v``); SUPPRESS keeps a --verbose given before it.
    for command_parser in sub.choices.values():
        command_parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                                    help=verbose_help)
    return parser


class _QuietFormatter(logging.Formatter):
    """INFO lines (ours: progress, report path) as plain text; warnings and errors say what and who."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return record.message if record.levelno <= logging.INFO else super().formatMessage(record)


def _quiet_filter(record: logging.LogRecord) -> bool:
    """visiontune's own loggers (``visiontune.*``) at INFO, everything else only at ERROR.

    Not even the root logger's warnings: that is where Beam's multi-processing
    mode relays its workers' logs (absl's and TensorFlow's among them).
    """
    return (record.levelno >= logging.ERROR or record.name == "visiontune"
            or record.name.startswith("visiontune."))


class _HeldErrors(logging.Filter):
    """Holds the libraries' error records back until the command has ended (quiet mode).

    A failure inside TFX or Beam is logged by them (Beam: with the worker's
    traceback) and then raised; when the command line says it in one line (a
    user's mistake, a full disk, Ctrl-C) their records are dropped, else
    (success, or a bug's traceback) shown as they would have been.  The same
    for exceptions that end a library's thread (``threading.excepthook``).
    """

    def __init__(self):
        super().__init__()
        self.held: list = []
        self.handler: Optional[logging.Handler] = None
        self._hook = None  # threading.excepthook before ``hold``

    def hold(self, handler: logging.Handler) -> None:
        """Holds what reaches ``handler`` and the threads' exceptions, until ``release``."""
        handler.addFilter(self)
        self.handler = handler
        self._hook, threading.excepthook = threading.excepthook, self.thread_failed

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "visiontune" or record.name.startswith("visiontune."):
            return True
        self.held.append(record)
        return False

    def thread_failed(self, failure) -> None:
        """``threading.excepthook``: Beam's threads fail as its workers stop (gRPC streams closed)."""
        text = "".join(traceback.format_exception(failure.exc_type, failure.exc_value, failure.exc_traceback))
        name = failure.thread.name if failure.thread is not None else "?"
        self.held.append(f"Exception in thread {name}:\n{text}".rstrip("\n"))

    def release(self, show: bool) -> None:
        if self._hook is not None:
            threading.excepthook, self._hook = self._hook, None
        # Forgotten here: a later command in the same process (tests call main() in turn) that holds
        # nothing must not flush this one, whose stream may be closed by then.
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.removeFilter(self)
        held, self.held = self.held, []
        if show and handler is not None:
            for record in held:
                text = record if isinstance(record, str) else handler.format(record)
                handler.stream.write(text + handler.terminator)
            handler.flush()


_held_errors = _HeldErrors()


# Long-running: a library's error must show when it happens, not when the server stops.
_NOT_HELD = ("serve",)


def _configure_output(verbose: bool, hold: bool = True) -> None:
    """What a command prints besides its own output.

    By default: our ``visiontune.*`` loggers at INFO (the per-component
    progress lines, the report path, warnings), any error (the libraries' ones
    held until the command ends unless ``hold`` is off: ``_HeldErrors``),
    Keras's epoch lines (stdout) and the command's result; not the libraries' INFO and WARNING
    logs, TensorFlow's C++ start-up lines or FutureWarnings.  ``--verbose``
    shows all of these.  This runs before anything imports TensorFlow, so the
    environment variables reach it, and child processes (Beam workers) inherit them.
    """
    import absl.logging

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        absl.logging.set_verbosity(absl.logging.INFO)
        return
    # cuFFT/cuDNN/cuBLAS "Unable to register ... factory" are logged at ERROR as
    # TensorFlow loads; 3 hides them.  "2" is visiontune's own default (visiontune/__init__.py),
    # any other value the user's choice.
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "2":
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if not sys.warnoptions:  # -W / PYTHONWARNINGS given: the user's choice
        # google-cloud libraries warn about Python 3.10 and each other's versions
        # as they are imported: nothing a visiontune user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ["PYTHONWARNINGS"] = "ignore::FutureWarning"
    handler = logging.StreamHandler()
    handler.setFormatter(_QuietFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_quiet_filter)
    if hold:
        _held_errors.hold(handler)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("visiontune").setLevel(logging.INFO)
    # absl routes TFX's per-component chatter (and its warnings) through here.
    absl.logging.set_verbosity(absl.logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Before anything imports TensorFlow (see visiontune/cli/allocator.py).
    allocator.configure()
    args = build_parser().parse_args(argv)
    if argv is None:
        # The command line is ours alone: TFX's Beam executors parse sys.argv as
        # absl flags, where "-v ARG" means --verbosity=ARG (and fails on "-v --set").
        del sys.argv[1:]
    _configure_output(args.verbose, hold=args.command not in _NOT_HELD)
    said = False  # the outcome is one line of ours: the libraries' error records go
    try:
        with interrupts.delivered():
            return args.func(args)
    except UserError as e:
        if args.verbose:
            raise
        said = True
        print(f"visiontune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.verbose:
            raise
        said = True
        left = f": {e}" if isinstance(e, Interrupted) and str(e) else ""
        print(f"visiontune {args.command}: stopped (Ctrl-C){left}", file=sys.stderr)
        return STOPPED_STATUS
    except Exception as e:
        if was_interrupted(e) and not args.verbose:  # Ctrl-C inside Beam's wrapper
            said = True
            print(f"visiontune {args.command}: stopped (Ctrl-C)", file=sys.stderr)
            return STOPPED_STATUS
        # A full disk or a folder one may not write, met anywhere (see visiontune.errors).
        problem = disk_problem(e, getattr(args, "output_folders", ()))
        if problem is None or args.verbose:
            raise
        said = True
        print(f"visiontune {args.command}: error: {problem}", file=sys.stderr)
        return 2
    finally:
        _held_errors.release(show=not said)
