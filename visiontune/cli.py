"""The ``visiontune`` command line.

Every command that takes ``--config FILE.yaml`` also takes ``--set
section.key=value`` (repeatable) and a few shortcut flags; flags win over the
file.  Errors a user can fix (a missing folder, an unknown setting, a bad
image) are printed as one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

from components import keras_env  # noqa: F401

# Shortcut flags: (flag, setting it overrides, help).
_RUN_SHORTCUTS = [
    ("--output-dir", "pipeline.output_dir", "where the run's artifacts and metadata go"),
    ("--serving-dir", "pipeline.serving_dir", "Pusher target: SERVING_DIR/MODEL_NAME/VERSION"),
    ("--model-name", "pipeline.model_name", "name of the served model"),
    ("--prepared-dir", "data.prepared_dir", "prepared TFRecords (visiontune prepare's output)"),
    ("--backbone", "model.backbone", "keras.applications backbone, e.g. mobilenet_v2"),
    ("--weights", "model.weights", "imagenet | none | path to an .h5 file"),
    ("--image-size", "model.image_size", "input side in pixels (32-299)"),
]
_PREPARE_SHORTCUTS = [
    ("--source", "data.source", "class-per-folder tree, or the folder labels-csv refers to"),
    ("--labels-csv", "data.labels_csv", "CSV (or glob of CSVs) with filename and label columns"),
    ("--test-source", "data.test_source", "a separate labelled test set"),
    ("--test-labels-csv", "data.test_labels_csv", "the test set's CSV"),
    ("--output", "data.prepared_dir", "where the TFRecords go"),
    ("--eval-fraction", "data.eval_fraction", "share of source that goes to the eval split"),
    ("--workers", "data.workers", "worker processes (0 = all cores)"),
]


# Modules adding subcommands: each has ``add_commands(subparsers)``, registering
# functions ``func(args) -> int`` that import their heavy dependencies lazily
# (argparse runs on every invocation; TensorFlow should not).
COMMAND_MODULES: Tuple[str, ...] = ("pipeline.vertex_commands", "serving.commands", "pipeline.report_commands",
                                     "pipeline.compare_commands")


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _add_config_args(parser: argparse.ArgumentParser, shortcuts) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting, e.g. training.batch_size=16")
    for flag, key, help_text in shortcuts:
        parser.add_argument(flag, dest=key.replace(".", "__"), help=f"{help_text} ({key})")


def _overrides(args: argparse.Namespace, shortcuts) -> List[str]:
    result = list(args.overrides)
    for _, key, _ in shortcuts:
        value = getattr(args, key.replace(".", "__"), None)
        if value is not None:
            result.append(f"{key}={value}")
    return result


def _load(args, shortcuts):
    from pipeline import configs

    return configs.load_config(args.config, _overrides(args, shortcuts))


def cmd_prepare(args) -> int:
    from components import prepare

    config = _load(args, _PREPARE_SHORTCUTS)
    if not config.data.prepared_dir:
        raise UserError("no output folder: pass --output or set data.prepared_dir")
    from pipeline import configs

    result = prepare.prepare_dataset(config.data, progress=not args.quiet,
                                     segmentation=configs.segmentation_settings(config))
    print(result.summary())
    return 0


def cmd_run(args) -> int:
    from pipeline import local_runner

    config = _load(args, _RUN_SHORTCUTS)
    summary = local_runner.run(config, force_prepare=args.prepare)
    _print_summary(summary, args.json)
    return 0 if summary.pushed or not args.fail_if_not_pushed else 3


def cmd_demo(args) -> int:
    from visiontune import demo

    summary = demo.run_demo(args.output_dir, overrides=args.overrides)
    _print_summary(summary, args.json)
    return 0


def _print_summary(summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.message())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune",
        description="Fine-tune ImageNet-pretrained Keras backbones on your images with TFX "
                    "and push them to TF Serving.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show TFX/Beam logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert images (folders or CSV-labelled) to TFRecords")
    _add_config_args(p, _PREPARE_SHORTCUTS)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("run", help="run the pipeline locally (LocalDagRunner, SQLite metadata)")
    _add_config_args(p, _RUN_SHORTCUTS)
    p.add_argument("--prepare", action="store_true",
                   help="re-run ingest even if prepared_dir already holds a dataset")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.add_argument("--fail-if-not-pushed", action="store_true",
                   help="exit with status 3 when the model was not blessed and pushed")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the whole pipeline on built-in data (no downloads)")
    p.add_argument("--output-dir", default="outputs/demo", help="where everything goes")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

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
    from components import prepare
    from pipeline import configs

    try:
        return args.func(args)
    except (UserError, configs.ConfigError, prepare.PrepareError, FileNotFoundError) as e:
        print(f"visiontune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Under ``python -m visiontune.cli`` this file runs as ``__main__``; hand over to
    # the imported module so its ``UserError`` is the one command modules raise.
    from visiontune import cli as _cli

    sys.exit(_cli.main())
