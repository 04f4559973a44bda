"""Files a run leaves on disk, read one way for the summary, the report and the comparison.

The Trainer's serving model folder and the exported model's
``assets.extra/visiontune.json``, the Trainer's ``history.json``, folder
sizes, and the tf.Examples of ExampleGen's splits.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from visiontune import features

SERVING_MODEL_SUBDIR = "Format-Serving"  # inside a Trainer's Model artifact


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """A JSON file's content; None when it is missing or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def saved_model_size(path: str) -> int:
    """Bytes of the SavedModel at ``path``: every file but ``assets.extra/`` (TFLite models, metadata)."""
    total = 0
    for root, dirs, files in os.walk(path):
        if root == path:
            dirs[:] = [d for d in dirs if d != features.METADATA_DIR]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def serving_model_dir(model_uri: str) -> str:
    """The SavedModel folder of a Trainer's ``Model`` artifact."""
    return os.path.join(model_uri, SERVING_MODEL_SUBDIR)


def model_metadata(model_dir: str) -> Optional[Dict[str, Any]]:
    """The exported model's ``assets.extra/visiontune.json`` (backbone, input size, classes, ...)."""
    return read_json(os.path.join(model_dir, features.METADATA_DIR, features.MODEL_METADATA_FILE))


def training_history(model_run_dir: str) -> Optional[Dict[str, Any]]:
    """The Trainer's ``history.json`` in its ``ModelRun`` folder."""
    return read_json(os.path.join(model_run_dir, features.HISTORY_FILE))


def split_files(examples_uri: str, split: str) -> List[str]:
    """The record files of one split of an ``Examples`` artifact."""
    return sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))


def iter_examples(files: Sequence[str], limit: int = 0):
    """Serialized tf.Examples of gzipped TFRecord files (at most ``limit`` when > 0)."""
    import tensorflow as tf

    count = 0
    for path in files:
        compression = "GZIP" if path.endswith(".gz") else ""
        for record in tf.data.TFRecordDataset(path, compression_type=compression):
            yield record.numpy()
            count += 1
            if limit and count >= limit:
                return


def feature_value(example, name: str):
    """The first value of a tf.Example's feature, or None."""
    feature = example.features.feature.get(name)
    if feature is None:
        return None
    values = getattr(feature, feature.WhichOneof("kind")).value if feature.WhichOneof("kind") else []
    return values[0] if values else None


def text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
