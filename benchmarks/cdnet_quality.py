"""Segmentation quality on the real task: the CDnet2014 config, scored as a client would see it.

Runs the pipeline with ``configs/cdnet2014.yaml`` (overrides with ``--set``),
then sends the 10 labelled test frames (JPEG, whole) through the pushed model's
``serving_default`` and compares the returned full-size masks (320x240) with
the ground-truth masks, void pixels (50/85/170) excluded: pixel accuracy,
foreground precision/recall/F-measure and IoU, mean IoU.  The Evaluator's TFMA
figures (at the model's input resolution) are shown beside them.  Appends a
row to BENCHMARKS.md.

    .venv/bin/python benchmarks/cdnet_quality.py [--set model.image_size=256 ...] --note "what changed"
"""

from __future__ import annotations

import glob
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _perf_common as common  # noqa: E402

MARKER = "<!-- cdnet_quality rows -->"


def client_scores(model_dir: str, test_source: str, seg) -> dict:
    """Pixel scores of ``serving_default``'s masks against the raw ground truth, void excluded."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from visiontune.components import masks

    predict = tf.saved_model.load(model_dir).signatures["serving_default"]
    lookup = np.array(masks.lookup_table(seg.class_values, -1), dtype=np.int64)
    fg = seg.foreground_class
    counts = np.zeros((len(seg.class_values), len(seg.class_values)), dtype=np.int64)
    images = sorted(glob.glob(os.path.join(test_source, seg.image_dir, "*")))
    for path in images:
        mask_path = os.path.join(test_source, seg.mask_dir,
                                 masks.mask_name(os.path.basename(path), seg.mask_regex, seg.mask_template))
        truth = lookup[masks.mask_values(Image.open(mask_path))]
        with open(path, "rb") as f:
            out = predict(image_bytes=tf.constant([f.read()]))
        predicted = lookup[tf.io.decode_png(out["mask_bytes"][0], channels=1).numpy()[..., 0]]
        valid = truth >= 0
        np.add.at(counts, (truth[valid], predicted[valid]), 1)
    tp = counts[fg, fg]
    fp = counts[:, fg].sum() - tp
    fn = counts[fg, :].sum() - tp
    ious = [counts[c, c] / (counts[c, :].sum() + counts[:, c].sum() - counts[c, c])
            for c in range(len(counts))]
    return {"frames": len(images), "pixel_accuracy": float(np.trace(counts) / counts.sum()),
            "precision": float(tp / (tp + fp)), "recall": float(tp / (tp + fn)),
            "f_measure": float(2 * tp / (2 * tp + fp + fn)), "foreground_iou": float(ious[fg]),
            "mean_iou": float(np.mean(ious))}


def main(argv=None) -> int:
    args = common.quality_arguments(__doc__, "cdnet2014.yaml", argv)
    config, summary, wall, per_component = common.run_pipeline(args.config, args.overrides)
    scores = client_scores(summary.pushed_dir or summary.model_dir, config.data.test_source,
                           config.segmentation)
    tfma = summary.metrics
    command = "benchmarks/cdnet_quality.py " + " ".join(f"--set {o}" for o in args.overrides)
    row = (f"| {common.today()} | `{command.strip()}` | {args.note or '-'} | {common.machine()} | "
           f"{wall:.0f} s ({per_component}) | {tfma.get('pixel_accuracy', 0):.4f} | "
           f"**{scores['pixel_accuracy']:.4f}** | {scores['f_measure']:.4f} | "
           f"{scores['precision']:.4f} / {scores['recall']:.4f} | {scores['foreground_iou']:.4f} | "
           f"{scores['mean_iou']:.4f} | {'yes' if summary.pushed else 'no'} |")
    print(json.dumps({"client": scores, "wall_seconds": wall, "timings": per_component,
                      "pipeline_metrics": tfma, "pushed": summary.pushed_dir}, indent=2))
    print(row)
    if not args.no_write:
        common.insert_row(MARKER, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
