"""Evaluator: TFMA (the Evaluator component's work) against model.evaluate, same model, split, metrics.

Takes the newest finished Evaluator execution of a pipeline run (ML Metadata,
``--metadata``, by default ``outputs/gtsrb/run``): its model, its raw
examples split, and the recorded component wall time.  Then, side by side in
one process, rounds alternating the order:

* **tfma**: ``tfma.run_model_analysis`` with the pipeline's own EvalConfig
  (``components.evaluation.create_eval_config``: example count, accuracy,
  top-k, confusion matrix plot, per-class precision/recall/F1 for every
  class) on the raw split, through the model's ``serving_examples`` signature
  with ``transform_features`` preprocessing, DirectRunner with the pipeline's
  Beam options — what the Evaluator's executor runs, for the candidate alone;
* **keras**: the same SavedModel loaded with ``tf_keras.models.load_model``,
  ``model.evaluate`` over the Transform's output of the same split (the
  Trainer's ``create_dataset``), computing accuracy, top-k, per-class
  precision, recall and F1 (arg-max, as TFMA's ``top_k: 1``) and a confusion
  matrix;
* **keras+decode**: the same, but from the raw split through the model's
  ``transform_features`` signature (decode + resize, the work TFMA also does).

Target: Evaluator (TFMA) <= 2x model.evaluate.

    .venv/bin/python benchmarks/evaluator.py [--metadata outputs/gtsrb/run/metadata.sqlite] [--rounds 1] [--no-write]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

from visiontune import features

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402
import _transformed  # noqa: E402

TITLE = "Evaluator: TFMA vs model.evaluate"
INTRO = """
Wall time on the same split and model, same metrics (accuracy, top-k,
per-class precision/recall/F1, confusion matrix), side by side in one process,
median over rounds: `tfma.run_model_analysis` with the pipeline's EvalConfig
and Beam options (the Evaluator executor's work, candidate model only) vs
`model.evaluate` on the Transform's output of the split ("keras"), and on the
raw split through the model's `transform_features` ("keras+decode"); and the
same TFMA run with `ModelSpec.model_type = "tf_generic"` (a candidate
configuration fix: no extra model load to detect the type, no Keras revival).
"component" is the Evaluator's own wall time recorded in ML Metadata by the
run (another process and time; with a baseline model TFMA evaluates both).
Target: TFMA <= 2x model.evaluate.

    .venv/bin/python benchmarks/evaluator.py
"""
HEADER = ("| date | command | machine | load 1/5 min | run, model, split (examples) | TFMA s | "
          "TFMA model_type=tf_generic s | keras s | keras+decode s | TFMA / keras | "
          "TFMA tf_generic / keras | TFMA / keras+decode | component s (MLMD) | target <= 2x |")


def newest_evaluation(metadata: str):
    """(seconds, {input key: uri}, transformed examples uri) of the newest complete Evaluator run."""
    from ml_metadata.proto import metadata_store_pb2

    from visiontune.pipeline import run_metadata

    store = run_metadata.open_store(metadata)
    names = {t.id: t.name.rsplit(".", 1)[-1] for t in store.get_execution_types()}
    done = [e for e in store.get_executions() if names[e.type_id] == "Evaluator"
            and e.last_known_state == metadata_store_pb2.Execution.COMPLETE]
    if not done:
        raise SystemExit(f"{metadata}: no finished Evaluator execution; run the pipeline first")
    execution = max(done, key=lambda e: e.id)
    seconds = (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0

    def inputs(execution_id):
        events = [v for v in store.get_events_by_execution_ids([execution_id])
                  if v.type == metadata_store_pb2.Event.INPUT]
        arts = {a.id: a for a in store.get_artifacts_by_id([v.artifact_id for v in events])}
        return {v.path.steps[0].key: arts[v.artifact_id] for v in events}

    ins = inputs(execution.id)
    model = ins["model"]
    producer = [v for v in store.get_events_by_artifact_ids([model.id])
                if v.type == metadata_store_pb2.Event.OUTPUT][0].execution_id
    transformed = inputs(producer)["examples"].uri
    return seconds, {k: a.uri for k, a in ins.items()}, transformed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metadata", default=os.path.join(common.REPO, "outputs", "gtsrb", "run",
                                                           "metadata.sqlite"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds (each ~2 min on 2 loaded cores); 2+ alternate the order")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    common.require(args.metadata)

    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_model_analysis as tfma
    import tf_keras

    from visiontune import configs
    from visiontune.components import evaluation, signatures, trainer, transform
    from visiontune.pipeline import local_runner

    component_s, uris, transformed_uri = newest_evaluation(args.metadata)
    model_dir = os.path.join(uris["model"], "Format-Serving")
    raw_files = sorted(glob.glob(os.path.join(uris["examples"], f"Split-{args.split}", "*")))
    pixel_files = sorted(glob.glob(os.path.join(transformed_uri, f"Split-{args.split}", "*")))
    if not pixel_files:  # Transform writes train and eval only: the same graph over the raw examples
        graph = os.path.join(os.path.dirname(os.path.dirname(transformed_uri)), "transform_graph",
                             os.path.basename(transformed_uri))
        pixel_files = [_transformed.transform_split(graph, raw_files, tempfile.mkdtemp(prefix="evaluator_"))]
    meta = signatures.read_metadata(model_dir)
    classes_path = os.path.join(model_dir, "assets.extra", "classes.txt")
    classes = [c for c in open(classes_path).read().splitlines() if c]
    num_classes = len(classes)
    size = int(meta.get("image_size") or tf_keras.models.load_model(model_dir, compile=False).input_shape[1])
    eval_cfg_section = configs.EvaluationConfig()
    eval_config = evaluation.create_eval_config(eval_cfg_section, num_classes)
    # The candidate alone, as the Evaluator's first run (rubber stamp): a change
    # threshold without a baseline model is refused outside the component.
    for spec in eval_config.metrics_specs:
        for metric in spec.metrics:
            for t in metric.per_slice_thresholds:
                t.threshold.ClearField("change_threshold")
    top_k = max(1, min(eval_cfg_section.top_k, num_classes))
    print(f"model {model_dir} ({size} px, {num_classes} classes); split {args.split}: "
          f"{raw_files} / {pixel_files}; component {component_s:.1f} s", flush=True)

    # The candidate: the same EvalConfig with ModelSpec.model_type set, so that
    # TFMA neither loads the model once more to find its type nor revives it
    # as a Keras model (tf.saved_model.load of the signatures instead).
    generic_config = tfma.EvalConfig()
    generic_config.CopyFrom(eval_config)
    generic_config.model_specs[0].model_type = tfma.constants.TF_GENERIC

    def run_tfma(tmp, config=eval_config):
        out = tempfile.mkdtemp(dir=tmp)
        start = time.perf_counter()
        shared = tfma.default_eval_shared_model(eval_saved_model_path=model_dir, eval_config=config)
        tfma.run_model_analysis(
            eval_shared_model=shared, eval_config=config,
            data_location=os.path.join(uris["examples"], f"Split-{args.split}", "*"),
            file_format="tfrecords", output_path=out,
            pipeline_options=beam.options.pipeline_options.PipelineOptions(local_runner.beam_args(1)))
        return time.perf_counter() - start

    class ArgmaxConfusion(tf_keras.metrics.Metric):
        """Confusion matrix of arg-max predictions (TFMA's MultiClassConfusionMatrixPlot).

        Per-class precision, recall and F1 with ``top_k: 1`` (arg-max) follow
        from it exactly; one metric instead of 3 x classes keeps tracing short.
        """

        def __init__(self, n, **kw):
            super().__init__(name="confusion", **kw)
            self.n = n
            self.m = self.add_weight(name="m", shape=(n, n), initializer="zeros", dtype=tf.float32)

        def update_state(self, y_true, y_pred, sample_weight=None):
            t = tf.argmax(y_true, -1)
            p = tf.argmax(y_pred, -1)
            self.m.assign_add(tf.math.confusion_matrix(t, p, self.n, dtype=tf.float32))

        def result(self):
            return self.m

    def keras_model():
        model = tf_keras.models.load_model(model_dir, compile=False)
        metrics = [tf_keras.metrics.CategoricalAccuracy(name="accuracy"),
                   tf_keras.metrics.TopKCategoricalAccuracy(k=top_k, name="top_k"),
                   ArgmaxConfusion(num_classes)]
        model.compile(loss=tf_keras.losses.CategoricalCrossentropy(), metrics=metrics)
        return model

    def per_class(result):
        import numpy as np
        m = np.asarray(result["confusion"])
        tp = np.diag(m)
        precision = tp / np.maximum(m.sum(0), 1)
        recall = tp / np.maximum(m.sum(1), 1)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return precision, recall, f1

    def run_keras(_tmp):
        start = time.perf_counter()
        model = keras_model()
        ds = trainer.create_dataset(pixel_files, size, args.batch_size, training=False,
                                    num_classes=num_classes, one_hot=True, cache=False)
        result = model.evaluate(ds, verbose=0, return_dict=True)
        per_class(result)
        return time.perf_counter() - start, result["accuracy"]

    def run_keras_decode(_tmp):
        start = time.perf_counter()
        model = keras_model()
        loaded = tf.saved_model.load(model_dir)
        transform_fn = loaded.signatures[features.TRANSFORM_FEATURES]
        arg = list(transform_fn.structured_input_signature[1])[0]

        def to_pixels(serialized):
            # Labels through the exported Transform graph; pixels decoded and
            # resized by the Transform's own function.
            label = tf.reshape(transform_fn(**{arg: serialized})[features.LABEL_ID_KEY], [-1])
            raw = tf.io.parse_example(serialized, {features.IMAGE_KEY: tf.io.FixedLenFeature([1], tf.string)})
            pixels = tf.map_fn(lambda b: transform.decode_and_resize(b[0], size), raw[features.IMAGE_KEY],
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
            return pixels, tf.one_hot(label, num_classes)

        ds = (tf.data.TFRecordDataset(raw_files, compression_type="GZIP").batch(args.batch_size)
              .map(to_pixels, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
        result = model.evaluate(ds, verbose=0, return_dict=True)
        per_class(result)
        return time.perf_counter() - start, result["accuracy"]

    times = {"tfma": [], "tfma_generic": [], "keras": [], "keras_decode": []}
    accuracy, loads = {}, []
    with tempfile.TemporaryDirectory(prefix="vt-eval-") as tmp:
        for r in range(args.rounds):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for name in order:
                if name == "tfma":
                    times[name].append(run_tfma(tmp))
                elif name == "tfma_generic":
                    times[name].append(run_tfma(tmp, generic_config))
                else:
                    seconds, accuracy[name] = (run_keras if name == "keras" else run_keras_decode)(tmp)
                    times[name].append(seconds)
                print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
            loads.append(os.getloadavg()[0])
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
                  + f", load {loads[-1]:.1f}", flush=True)
    med = {k: common.median(v) for k, v in times.items()}
    count = sum(1 for _ in tf.data.TFRecordDataset(raw_files, compression_type="GZIP"))
    report = {"times": times, "medians": med, "keras_accuracy": accuracy, "component_seconds": component_s,
              "model": model_dir, "examples": count, "load": loads}
    print(json.dumps(report, indent=2))
    ratio, ratio_decode = med["tfma"] / med["keras"], med["tfma"] / med["keras_decode"]
    ratio_generic = med["tfma_generic"] / med["keras"]
    row = (f"| {common.today()} | `{common.command()}` | {common.machine()} | {common.load()} | "
           f"{os.path.relpath(model_dir, common.REPO)} ({size} px), {args.split} ({count}) | {med['tfma']:.1f} | "
           f"{med['tfma_generic']:.1f} | {med['keras']:.1f} | {med['keras_decode']:.1f} | {ratio:.1f}x | "
           f"{ratio_generic:.1f}x | {ratio_decode:.1f}x | {component_s:.0f} | "
           f"{'met' if ratio <= 2 else 'missed'} (tf_generic: {'met' if ratio_generic <= 2 else 'missed'}) |")
    print(row)
    if not args.no_write:
        common.append_rows(TITLE, INTRO, HEADER, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
