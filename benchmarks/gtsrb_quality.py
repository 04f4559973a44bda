"""Quality on the real task: the GTSRB config, scored as a client would see it.

Runs the pipeline with ``configs/gtsrb.yaml`` (overrides with ``--set``), then
sends all 2,000 official test images, whole (no ROI crop), through the pushed
model's ``serving_default`` signature and reports accuracy, plus the wall time
of every component.  The validation figure (the one a recipe is chosen by) is
the same model's accuracy on the run's eval split (the sign tracks held out
of training), through its ``serving_examples`` signature.  Appends a row to
BENCHMARKS.md.

    .venv/bin/python benchmarks/gtsrb_quality.py [--set model.image_size=128 ...]
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _perf_common as common  # noqa: E402
import _transformed  # noqa: E402

MARKER = "<!-- gtsrb_candidates rows -->"


def client_accuracy(model_dir: str, images_dir: str, labels_csv: str, batch: int = 100) -> float:
    import numpy as np
    import tensorflow as tf

    from visiontune.serving.images import encode_for_serving

    model = tf.saved_model.load(model_dir)
    predict = model.signatures["serving_default"]
    with open(labels_csv) as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    correct = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        images = [encode_for_serving(os.path.join(images_dir, r["Filename"])) for r in chunk]
        out = predict(image_bytes=tf.constant(images))
        predicted = [c.decode() for c in out["classes"].numpy()]
        correct += int(np.sum([p == r["ClassId"] for p, r in zip(predicted, chunk)]))
    return correct / len(rows)


def validation_scores(model_dir: str, pipeline_root: str, batch: int = 100):
    """(accuracy, cross-entropy) on the run's eval split: ExampleGen's raw examples through
    ``serving_examples``.  Candidates are chosen by accuracy; the cross-entropy breaks ties
    (277 validation images: one error is 0.36 points)."""
    import numpy as np
    import tensorflow as tf

    from visiontune import features
    from visiontune.components import signatures

    index = {name.encode(): i for i, name in enumerate(signatures.read_metadata(model_dir)["classes"])}
    predict = tf.saved_model.load(model_dir).signatures[features.SERVING_EXAMPLES]
    spec = {features.LABEL_KEY: tf.io.FixedLenFeature([], tf.string)}
    files = _transformed.raw_split_files(pipeline_root, "eval")
    correct, losses = 0, []
    for records in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch):
        labels = np.array([index[b] for b in tf.io.parse_example(records, spec)[features.LABEL_KEY].numpy()])
        probabilities = predict(**{features.EXAMPLES_INPUT: records})[features.PROBABILITIES_OUTPUT].numpy()
        correct += int(np.sum(probabilities.argmax(-1) == labels))
        losses.extend(-np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12)))
    return correct / max(len(losses), 1), float(np.mean(losses))


def main(argv=None) -> int:
    args = common.quality_arguments(__doc__, "gtsrb.yaml", argv)
    config, summary, wall, per_component = common.run_pipeline(args.config, args.overrides)
    model_dir = summary.pushed_dir or summary.model_dir
    test_dir = config.data.test_source
    labels = os.path.normpath(os.path.join(test_dir, config.data.test_labels_csv))
    validation, cross_entropy = validation_scores(model_dir, config.pipeline.output_dir)
    accuracy = client_accuracy(model_dir, test_dir, labels)
    command = "benchmarks/gtsrb_quality.py " + " ".join(f"--set {o}" for o in args.overrides)
    row = (f"| {datetime.date.today()} | `{command.strip()}` | {args.note or '-'} | {common.machine()} | "
           f"{wall:.0f} s ({per_component}) | **{validation:.4f}** / {cross_entropy:.4f} | "
           f"{summary.metrics.get('sparse_categorical_accuracy', 0):.4f} | {accuracy:.4f} | "
           f"{common.saved_model_bytes(model_dir) / 2**20:.1f} | {'yes' if summary.pushed else 'no'} |")
    print(json.dumps({"validation_accuracy": validation, "validation_cross_entropy": cross_entropy,
                      "client_accuracy": accuracy, "wall_seconds": wall,
                      "timings": per_component, "pipeline_metrics": summary.metrics,
                      "pushed": summary.pushed_dir}, indent=2))
    print(row)
    if not args.no_write:
        common.insert_row(MARKER, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
