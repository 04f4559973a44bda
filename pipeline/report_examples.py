"""The report's look at examples: sample training images, and the exported model run over the eval split.

Classification: a few training images per class, and the misclassified eval
images (``serving_examples`` over at most ``MAX_EVAL_EXAMPLES`` of them).
Segmentation: the first eval images with their ground truth and predicted mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

from visiontune import features
from visiontune.pipeline.run_files import feature_value, iter_examples, split_files, text

SAMPLES_PER_CLASS = 4
MAX_SAMPLE_CLASSES = 60
MAX_EVAL_EXAMPLES = 1000
MAX_OVERLAYS = 8


def sample_images(examples_uri: str, classes: Sequence[str], per_class: int = SAMPLES_PER_CLASS,
                  max_classes: int = MAX_SAMPLE_CLASSES, max_read: int = 20000
                  ) -> Dict[str, List[bytes]]:
    """A few encoded training images per class ({class: [image bytes]}), first found first."""
    import tensorflow as tf

    wanted = list(classes)[:max_classes]
    samples: Dict[str, List[bytes]] = {c: [] for c in wanted}
    files = split_files(examples_uri, "train")
    for record in iter_examples(files, limit=max_read):
        example = tf.train.Example.FromString(record)
        label = text(feature_value(example, features.LABEL_KEY))
        if label in samples and len(samples[label]) < per_class:
            samples[label].append(feature_value(example, features.IMAGE_KEY))
            if all(len(v) >= per_class for v in samples.values()):
                break
    return samples


@dataclasses.dataclass
class Mistake:
    image: bytes
    filename: str
    true: str
    predicted: str
    confidence: float


def find_mistakes(model_dir: str, examples_uri: str, split: str,
                  max_examples: int = MAX_EVAL_EXAMPLES, batch_size: int = 16
                  ) -> Tuple[int, int, List[Mistake]]:
    """Runs ``serving_examples`` over the split: (examples checked, total in split or -1, mistakes).

    Mistakes are sorted most confident first.  Batches of 16: the report runs
    in the process of the whole run, after every component, and 64 images at
    192 px took ~650 MiB there (BENCHMARKS.md, "Peak memory").
    """
    import tensorflow as tf

    files = split_files(examples_uri, split)
    if not files:
        raise FileNotFoundError(f"no examples in {examples_uri}/Split-{split}")
    model = tf.saved_model.load(model_dir)
    predict = model.signatures[features.SERVING_EXAMPLES]
    mistakes: List[Mistake] = []
    checked = 0

    def flush(batch):
        out = predict(examples=tf.constant([r for r, _ in batch]))
        names = [text(c) for c in out[features.CLASSES_OUTPUT].numpy()]
        scores = out[features.SCORES_OUTPUT].numpy()
        for (_, example), name, score in zip(batch, names, scores):
            true = text(feature_value(example, features.LABEL_KEY))
            if name != true:
                mistakes.append(Mistake(image=feature_value(example, features.IMAGE_KEY),
                                        filename=text(feature_value(example, features.FILENAME_KEY) or b""),
                                        true=true, predicted=name, confidence=float(score)))

    batch = []
    for record in iter_examples(files, limit=max_examples):
        batch.append((record, tf.train.Example.FromString(record)))
        checked += 1
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    total = checked
    if max_examples and checked >= max_examples:  # there may be more: count them without predicting
        total = sum(1 for _ in iter_examples(files))
    mistakes.sort(key=lambda m: -m.confidence)
    return checked, total, mistakes


@dataclasses.dataclass
class Overlay:
    filename: str
    image: bytes  # encoded input image
    truth: Any  # [h, w] class ids, -1 = void
    predicted: Any  # [h, w] class ids
    pixel_accuracy: float  # non-void pixels


def segmentation_overlays(model_dir: str, examples_uri: str, split: str,
                          class_values: Sequence[Sequence[int]], limit: int = MAX_OVERLAYS
                          ) -> List[Overlay]:
    """Ground truth and prediction (``serving_examples``' full-size ``masks``) of the first eval images."""
    import numpy as np
    import tensorflow as tf

    from visiontune.components import masks

    files = split_files(examples_uri, split)
    if not files:
        raise FileNotFoundError(f"no examples in {examples_uri}/Split-{split}")
    lookup = np.array(masks.lookup_table(class_values, -1), dtype=np.int64)
    predict = tf.saved_model.load(model_dir).signatures[features.SERVING_EXAMPLES]
    found: List[Overlay] = []
    for record in iter_examples(files, limit=limit):
        example = tf.train.Example.FromString(record)
        out = predict(examples=tf.constant([record]))
        truth = lookup[tf.io.decode_png(feature_value(example, features.MASK_KEY), channels=1).numpy()[..., 0]]
        predicted = lookup[tf.io.decode_png(out[features.MASK_BYTES_OUTPUT][0], channels=1).numpy()[..., 0]]
        valid = truth >= 0
        accuracy = float((predicted[valid] == truth[valid]).mean()) if valid.any() else float("nan")
        found.append(Overlay(filename=text(feature_value(example, features.FILENAME_KEY) or b""),
                             image=feature_value(example, features.IMAGE_KEY), truth=truth,
                             predicted=predicted, pixel_accuracy=accuracy))
    return found

