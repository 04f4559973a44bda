"""Options every config-taking command shares: ``--config``, ``--set`` and shortcut flags.

Shortcut flags are ``(flag, setting it overrides, help)``; a flag wins over
the file and over ``--set``.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Sequence, Tuple

Shortcut = Tuple[str, str, str]

RUN_SHORTCUTS: List[Shortcut] = [
    ("--output-dir", "pipeline.output_dir", "where the run's artifacts and metadata go"),
    ("--serving-dir", "pipeline.serving_dir", "Pusher target: SERVING_DIR/MODEL_NAME/VERSION"),
    ("--model-name", "pipeline.model_name", "name of the served model"),
    ("--source", "data.source", "the images: class-per-folder tree, or the folder labels-csv refers to"),
    ("--labels-csv", "data.labels_csv", "CSV (or glob of CSVs) with filename and label columns"),
    ("--test-source", "data.test_source", "a separate labelled test set"),
    ("--test-labels-csv", "data.test_labels_csv", "the test set's CSV"),
    ("--example-gen", "data.example_gen", "images (read the sources) | tfrecords (read --prepared-dir)"),
    ("--prepared-dir", "data.prepared_dir", "TFRecords of tf.Example (visiontune prepare's output) for "
                                            "--example-gen tfrecords"),
    ("--backbone", "model.backbone", "keras.applications backbone, e.g. mobilenet_v2"),
    ("--weights", "model.weights", "imagenet | none | path to an .h5 file"),
    ("--image-size", "model.image_size", "input side in pixels (32-299)"),
]
PREPARE_SHORTCUTS: List[Shortcut] = [
    ("--source", "data.source", "class-per-folder tree, or the folder labels-csv refers to"),
    ("--labels-csv", "data.labels_csv", "CSV (or glob of CSVs) with filename and label columns"),
    ("--test-source", "data.test_source", "a separate labelled test set"),
    ("--test-labels-csv", "data.test_labels_csv", "the test set's CSV"),
    ("--output", "data.prepared_dir", "where the TFRecords go"),
    ("--eval-fraction", "data.eval_fraction", "share of source that goes to the eval split"),
    ("--workers", "data.workers", "worker processes (0 = all cores)"),
]


def add_config_args(parser: argparse.ArgumentParser, shortcuts: Sequence[Shortcut] = ()) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    add_set_arg(parser)
    for flag, key, help_text in shortcuts:
        parser.add_argument(flag, dest=key.replace(".", "__"), help=f"{help_text} ({key})")


def add_set_arg(parser: argparse.ArgumentParser, help_text: str = "") -> None:
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=help_text or "override a setting, e.g. training.batch_size=16")


def overrides(args: argparse.Namespace, shortcuts: Sequence[Shortcut] = ()) -> List[str]:
    """``--set`` values, then the shortcut flags given, as ``key=value`` strings."""
    result = list(args.overrides)
    for _, key, _ in shortcuts:
        value = getattr(args, key.replace(".", "__"), None)
        if value is not None:
            result.append(f"{key}={value}")
    return result


def load_config(args: argparse.Namespace, shortcuts: Sequence[Shortcut] = (), local_files: bool = True,
                pipeline: bool = False):
    from visiontune import configs

    return configs.load_config(args.config, overrides(args, shortcuts), local_files=local_files,
                               pipeline=pipeline)


def check_output_folder(key: str, path: str) -> None:
    """Refuses, before any work, an output folder that cannot be made or written.

    Nothing is created: the deepest part of ``path`` that exists must be a
    folder this process may write (``os.access`` also says no on a read-only
    file system, even to root).  A full disk is found only by writing.
    """
    from visiontune.errors import ConfigError

    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "a file" if os.path.isfile(existing) else "not a folder"
        raise ConfigError(f"{key}: {path}: cannot be a folder: {existing} is {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise ConfigError(f"{key}: {path}: cannot write there: {existing} {why}")
