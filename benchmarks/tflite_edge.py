"""TensorFlow Lite edge models on GTSRB: accuracy, size and single-thread latency against the SavedModel.

Converts a trained GTSRB run's model with the Trainer's own code
(``components.tflite_export.export_tflite``: the Keras model loaded from the
Trainer's SavedModel, int8 calibrated on the run's transformed train split),
then sends the 2,000 official test images, whole (no ROI crop, PPM converted
to PNG as ``benchmarks/gtsrb_quality.py`` sends them), through the
SavedModel's ``serving_default`` and through both ``.tflite`` models (pixels
from Transform's ``decode_and_resize`` of the same bytes, as ``visiontune
predict --tflite`` makes them).  The run is not retrained.

Everything runs on one thread: TensorFlow's intra- and inter-op pools are set
to 1 before anything runs, the interpreters get ``num_threads=1`` (with the
default XNNPACK delegate).  Latency is per image, measured on the first
``--latency-images`` test images, the paths interleaved image by image:
``serving_default`` on one image's bytes (decode + resize + model), the
interpreter's ``invoke`` alone, and decode + resize (TensorFlow) + ``invoke``.

    .venv/bin/python benchmarks/tflite_edge.py --run-dir outputs/gtsrb/run [--no-write]
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import _perf_common as common  # noqa: E402

TITLE = "## Edge models: TensorFlow Lite (issue 17)"
MARKER = "<!-- tflite_edge rows -->"
INTRO = """
A trained GTSRB run's model (`configs/gtsrb.yaml` of the row's day: 192 px,
autocontrast, centre crop 0.875; MobileNetV2-0.35, then two MobileNetV2-1.0
averaged) converted by the Trainer's own code
(`components/tflite_export.py`; int8 calibrated on 200 images of the run's
transformed train split), then the 2,000 official test images sent whole
through the SavedModel's `serving_default` and through both `.tflite` files
(pixels from Transform's `decode_and_resize` of the same bytes, as `visiontune
predict --tflite` makes them).  One thread everywhere: TensorFlow intra/inter-op
pools of 1, `tf.lite.Interpreter(num_threads=1)` (default XNNPACK delegate).
Latency: median / p90 ms per image on the first 200 test images, the paths
interleaved image by image; "model" is `invoke` alone, "+ decode" adds
TensorFlow's decode and antialiased resize (what a device does its own way);
`serving_default` always includes decode and resize.  Sizes: the SavedModel
without `assets.extra`, the `.tflite` files as pushed.  Target: int8 within 1
point of the SavedModel.

    .venv/bin/python benchmarks/tflite_edge.py --run-dir outputs/gtsrb/run
"""
HEADER = ("| date | command | machine | load 1/5 min | model | size KiB | test accuracy | vs SavedModel "
          "| agrees with SavedModel top-1 | latency model ms | latency + decode ms | conversion s |")


def _arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=os.path.join(REPO, "outputs", "gtsrb", "run"),
                        help="a finished GTSRB run's output_dir (run_summary.json, Trainer/, Transform/)")
    parser.add_argument("--test-dir", default=os.path.join(common.GTSRB, "test"),
                        help="GTSRB test folder: Images/*.ppm and GT-final_test.csv")
    parser.add_argument("--latency-images", type=int, default=200)
    parser.add_argument("--calibration-images", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    return parser.parse_args(argv)


def _newest(pattern: str) -> str:
    found = sorted(glob.glob(pattern), key=lambda p: int(p.rstrip("/").split(os.sep)[-2]))
    if not found:
        raise SystemExit(f"nothing matches {pattern}")
    return found[-1]


def _stats(values):
    import numpy as np

    return float(np.median(values) * 1000), float(np.percentile(values, 90) * 1000)


def main(argv=None) -> int:
    args = _arguments(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import numpy as np
    import tf_keras

    from visiontune import features
    from visiontune.components import signatures, tflite_export, transform
    from visiontune.serving.images import encode_for_serving
    from visiontune.serving.tflite import TFLiteModel

    load_before = common.load()
    summary = json.load(open(os.path.join(common.require(args.run_dir), features.RUN_SUMMARY_FILE)))
    model_dir = summary["model_dir"]
    train_files = [os.path.join(_newest(os.path.join(args.run_dir, "Transform", "transformed_examples", "*",
                                                     "Split-train/")), "*")]
    meta = signatures.read_metadata(model_dir)
    classes, size = meta["classes"], meta["image_size"]

    start = time.perf_counter()
    keras_model = tf_keras.models.load_model(model_dir, compile=False)
    load_seconds = time.perf_counter() - start
    out = tempfile.mkdtemp(prefix="tflite_edge_")
    start = time.perf_counter()
    info = tflite_export.export_tflite(keras_model, out, classes, size, list(features.TFLITE_VARIANTS),
                                       train_files, args.calibration_images)
    export_seconds = time.perf_counter() - start
    if info["errors"]:
        raise SystemExit(f"conversion failed: {info['errors']}")
    edge = {v: TFLiteModel(out, v, num_threads=1) for v in features.TFLITE_VARIANTS}

    labels_csv = os.path.join(args.test_dir, "GT-final_test.csv")
    with open(common.require(labels_csv)) as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    images = [encode_for_serving(os.path.join(args.test_dir, "Images", r["Filename"])) for r in rows]
    truth = np.array([classes.index(r["ClassId"]) for r in rows])

    serving = tf.saved_model.load(model_dir).signatures[features.SERVING_DEFAULT]
    decode = tf.function(lambda b: transform.decode_and_resize(b, size),
                         input_signature=[tf.TensorSpec([], tf.string)])
    predicted = {"savedmodel": [], **{v: [] for v in edge}}
    for i in range(0, len(images), 100):
        answer = serving(image_bytes=tf.constant(images[i:i + 100]))
        predicted["savedmodel"].extend(answer[features.CLASS_IDS_OUTPUT].numpy())
    for encoded in images:
        pixels = decode(tf.constant(encoded)).numpy()
        for variant, model in edge.items():
            predicted[variant].append(int(np.argmax(model.run(pixels))))
    predicted = {k: np.array(v) for k, v in predicted.items()}
    accuracy = {k: float((v == truth).mean()) for k, v in predicted.items()}
    agreement = {k: float((v == predicted["savedmodel"]).mean()) for k, v in predicted.items()}

    # Latency, interleaved image by image (warm-up first).
    latency = {"savedmodel": [], **{v: [] for v in edge}, **{f"{v}+decode": [] for v in edge}}
    sample = images[:args.latency_images]
    for encoded in sample[:10]:
        serving(image_bytes=tf.constant([encoded]))
        for model in edge.values():
            model.run(decode(tf.constant(encoded)).numpy())
    for encoded in sample:
        t = time.perf_counter()
        serving(image_bytes=tf.constant([encoded]))[features.CLASS_IDS_OUTPUT].numpy()
        latency["savedmodel"].append(time.perf_counter() - t)
        for variant, model in edge.items():
            t = time.perf_counter()
            pixels = decode(tf.constant(encoded)).numpy()
            t_model = time.perf_counter()
            model.run(pixels)
            done = time.perf_counter()
            latency[variant].append(done - t_model)
            latency[f"{variant}+decode"].append(done - t)

    sizes = {"savedmodel": common.saved_model_bytes(model_dir),
             **{v: info["models"][v]["bytes"] for v in edge}}
    result = {"model_dir": model_dir, "train_files": train_files, "image_size": size, "test_images": len(rows),
              "accuracy": accuracy, "agreement_with_savedmodel": agreement, "bytes": sizes,
              "latency_ms_median_p90": {k: _stats(v) for k, v in latency.items()},
              "keras_load_seconds": round(load_seconds, 1), "export_seconds": round(export_seconds, 1),
              "conversion_seconds": {v: info["models"][v]["conversion_seconds"] for v in edge},
              "calibration": info["calibration"], "float32_ops_int8": info["models"]["int8"]["float32_ops"],
              "select_tf_ops": {v: info["models"][v]["select_tf_ops"] for v in edge}}
    print(json.dumps(result, indent=2))

    load = f"{load_before} -> {common.load()}"
    command = common.command()
    table = []
    for key, label in (("savedmodel", "SavedModel (`serving_default`)"), ("float16", "TFLite float16"),
                       ("int8", "TFLite int8")):
        model_ms = "-" if key == "savedmodel" else "%.2f / %.2f" % result["latency_ms_median_p90"][key]
        full = result["latency_ms_median_p90"]["savedmodel" if key == "savedmodel" else f"{key}+decode"]
        delta = "-" if key == "savedmodel" else f"{(accuracy[key] - accuracy['savedmodel']) * 100:+.2f} pt"
        conversion = "-" if key == "savedmodel" else (
            f"{info['models'][key]['conversion_seconds']:.1f}"
            + (f" (+{info['preparation_seconds']:.1f} model copy and calibration set)" if key == "int8" else ""))
        table.append(f"| {common.today()} | `{command}` | {common.machine()} | {load} | {label} | "
                     f"{sizes[key] / 1024:,.0f} | **{accuracy[key]:.4f}** | {delta} | "
                     f"{agreement[key]:.4f} | {model_ms} | {full[0]:.2f} / {full[1]:.2f} | {conversion} |")
    print("\n".join(table))
    if not args.no_write:
        path = os.path.join(REPO, "BENCHMARKS.md")
        text = open(path).read()
        if MARKER not in text:
            text = (text.rstrip("\n") + f"\n\n{TITLE}\n{INTRO}\n{HEADER}\n" + "|---" * (HEADER.count("|") - 1)
                    + "|\n" + MARKER + "\n")
        open(path, "w").write(text.replace(MARKER, "\n".join(table) + "\n" + MARKER, 1))
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
