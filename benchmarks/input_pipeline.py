"""Input pipeline: the Trainer's tf.data path against the tutorials' image_dataset_from_directory.

Same images (all 3,452 flowers), same size (``--size``, 128 px by default,
the flowers' own size), same batch size, both iterated for ``--epochs``
epochs, several rounds alternating which goes first, in one process:

* **pipeline**: ``components.trainer.create_dataset`` (interleave over gzipped
  shards, parallel parse/decode, cache when it fits, shuffle, batch,
  prefetch, AUTOTUNE) over the real Transform's output (TFT on Beam, as
  ``tests/conftest.run_transform`` runs it; built once and kept in
  ``--work-dir``);
* **tutorial**: ``tf_keras.utils.image_dataset_from_directory`` on the JPEG
  folder, as the tutorials start; and the same with ``.cache().prefetch()``,
  the tutorials' "configure the dataset for performance" step;
* **tfxio**: the same transformed records through the Trainer's
  ``fn_args.data_accessor`` (built as TFX's Trainer builds it, from an Examples
  artifact): ``tf_dataset_factory(files, TensorFlowDatasetOptions(batch_size,
  shuffle, shuffle_seed, num_epochs=1), transformed schema)`` then the pixels
  decoded; as TFX's templates use it (shuffled by tfxio, no cache), and
  **tfxio+cache**: unshuffled tfxio batches, decoded, unbatched, then
  ``create_dataset``'s cache, shuffle and batch (the only way to keep its order).

Epoch 1 (reads and decodes, fills the cache) and epochs 2+ (median) are
reported apart.  Then the model's own consumption rate: train steps/s of
MobileNetV2-0.35 (the GTSRB config's model: augmentation, head) at the same
size and batch on batches already in memory, with the backbone frozen
(warm-up phase, the fastest consumer) and fully trainable (fine-tuning).
Targets: pipeline >= 5x the tutorial, and >= 3x the model's consumption rate.
Whether each tfxio variant yields the same examples in the same order as
``create_dataset`` (same seed, epochs 1 and 2) is checked and reported, over
both files and over the train file alone.

    .venv/bin/python benchmarks/input_pipeline.py [--size 128] [--rounds 3] [--epochs 3] [--no-write]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

TITLE = "Input pipeline: Trainer tf.data vs image_dataset_from_directory"
INTRO = """
Images/s iterating all 3,452 flowers (JPEG, 128 px) batch 32: the Trainer's
`create_dataset` over the Transform's TFRecords vs the tutorials'
`image_dataset_from_directory` (plain, and with `.cache().prefetch()`), epoch 1
and epochs 2+ apart, medians over rounds alternating the order.  "tfxio": the
same records through the Trainer's `fn_args.data_accessor` (shuffled by tfxio,
no cache); "tfxio+cache": tfxio batches unshuffled, then `create_dataset`'s
cache and shuffle; "same order" says whether they yield `create_dataset`'s
examples in its order (epochs 1 and 2, same seed), over both files and over
the train file alone (one shard, as the GTSRB Transform writes its splits).
"model" is MobileNetV2-0.35 train steps on in-memory batches, as images/s,
backbone frozen / all trainable.  Targets: pipeline >= 5x tutorial; pipeline >= 3x
the model (frozen, its fastest).

    .venv/bin/python benchmarks/input_pipeline.py
"""
HEADER = ("| date | command | machine | load 1/5 min | pipeline img/s epoch 1 / 2+ | tutorial img/s "
          "epoch 1 / 2+ | tutorial+cache img/s epoch 1 / 2+ | pipeline / tutorial (2+) | "
          "model img/s frozen / all | pipeline (2+) / model frozen | targets | tfxio img/s epoch 1 / 2+ | "
          "tfxio+cache img/s epoch 1 / 2+ | same order as pipeline: tfxio / tfxio+cache |")


def transformed_flowers(size: int, work_dir: str) -> str:
    """Folder of ``{train,eval}-*.gz`` transformed flowers at ``size`` (built once)."""
    from visiontune import configs
    from visiontune.components import prepare

    root = os.path.join(work_dir, f"flowers-{size}")
    done = os.path.join(root, "transformed", "DONE")
    if os.path.exists(done):
        return os.path.join(root, "transformed")
    sys.path.insert(0, os.path.join(common.REPO, "tests"))
    from conftest import run_transform  # the real preprocessing_fn with TFT on Beam

    start = time.time()
    prepared = prepare.prepare_dataset(
        configs.DataConfig(source=common.FLOWERS, prepared_dir=os.path.join(root, "prepared"),
                           num_shards=4, workers=1), progress=False)
    run_transform(prepared.output_dir, prepared.classes, size, root)
    open(done, "w").write(f"{time.time() - start:.0f} s\n")
    print(f"built transformed flowers at {size} px in {time.time() - start:.0f} s", flush=True)
    return os.path.join(root, "transformed")


def transform_output_dir(transformed: str) -> str:
    """The ``transform_output`` (TFTransformOutput) folder next to ``transformed/``."""
    return os.path.join(os.path.dirname(transformed), "transform_output")


def data_accessor(transformed: str):
    """``fn_args.data_accessor`` as TFX's Trainer builds it for an Examples artifact at ``transformed``."""
    from tfx.components.trainer import fn_args_utils
    from tfx.components.util import examples_utils, tfxio_utils
    from tfx.proto import example_gen_pb2
    from tfx.types import standard_artifacts

    examples = standard_artifacts.Examples()
    examples.uri = transformed
    examples_utils.set_payload_format(examples, example_gen_pb2.FORMAT_TF_EXAMPLE)
    return fn_args_utils.DataAccessor(
        tf_dataset_factory=tfxio_utils.get_tf_dataset_factory_from_artifact([examples], ["Trainer"]),
        record_batch_factory=None, data_view_decode_fn=None)


def tfxio_dataset(accessor, files, schema, size: int, batch: int, *, cache: bool, seed: int = 42):
    """``(pixels, label)`` batches read through ``accessor.tf_dataset_factory``.

    ``cache=False``: shuffled by tfxio (``shuffle_buffer_size`` as
    ``create_dataset``'s), no cache: each epoch reads and parses the files again.
    ``cache=True``: tfxio unshuffled, then ``create_dataset``'s cache, shuffle, batch.
    """
    import tensorflow as tf
    from tfx_bsl.public import tfxio

    from visiontune import features
    from visiontune.components import transform

    options = tfxio.TensorFlowDatasetOptions(batch_size=batch, shuffle=not cache, shuffle_seed=seed,
                                             shuffle_buffer_size=4096, num_epochs=1)
    ds = accessor.tf_dataset_factory(list(files), options, schema)
    ds = ds.map(lambda b: (transform.decode_pixels(b[features.PIXELS_KEY], size), b[features.LABEL_ID_KEY]),
                num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.unbatch().cache().shuffle(4096, seed=seed, reshuffle_each_iteration=True).batch(batch)
    return ds.prefetch(tf.data.AUTOTUNE)


def order_digest(ds, epochs: int = 2):
    """Per epoch, a digest of (label, pixel sum) of every example in the order ``ds`` yields them."""
    import hashlib

    import numpy as np
    import tensorflow as tf

    digests = []
    for _ in range(epochs):
        h = hashlib.sha256()
        for images, labels in ds:
            sums = tf.reduce_sum(tf.cast(images, tf.int64), axis=[1, 2, 3])
            h.update(np.stack([labels.numpy().astype(np.int64), sums.numpy()]).tobytes())
        digests.append(h.hexdigest())
    return digests


def time_epochs(ds, epochs: int):
    """(images/s per epoch, images per epoch) iterating ``ds`` ``epochs`` times."""
    rates, count = [], 0
    for _ in range(epochs):
        count = 0
        start = time.perf_counter()
        for images, _labels in ds:
            count += int(images.shape[0])
        rates.append(count / (time.perf_counter() - start))
    return rates, count


def model_rate(size: int, batch: int, steps: int, backbone: str) -> float:
    """Images/s that ``model.fit`` consumes from batches already in memory."""
    import tensorflow as tf
    import tf_keras

    from visiontune import configs
    from visiontune.components import model as model_lib

    cfg = configs.load_config(os.path.join(common.REPO, "configs", "gtsrb.yaml"),
                              [f"model.image_size={size}", f"model.weights={common.MOBILENET_V2_035}"])
    model = model_lib.create_model(cfg.model, 5, cfg.training.augmentation, cfg.training.seed)
    model_lib.apply_fine_tune_policy(model, backbone, 0, freeze_batch_norm=True)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-4),
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    x = tf.random.uniform([batch, size, size, 3], 0, 255, dtype=tf.int32)
    ds = tf.data.Dataset.from_tensors((tf.cast(x, tf.uint8), tf.zeros([batch], tf.int64))).repeat()
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model-steps", type=int, default=15)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "visiontune-bench"))
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    common.require(common.FLOWERS)
    common.require(common.MOBILENET_V2_035)
    import tensorflow as tf
    import tensorflow_transform as tft
    import tf_keras

    from visiontune.components import trainer

    transformed = transformed_flowers(args.size, args.work_dir)
    files = sorted(glob.glob(os.path.join(transformed, "*.gz")))
    accessor = data_accessor(transformed)
    schema = tft.TFTransformOutput(transform_output_dir(transformed)).transformed_metadata.schema

    def pipeline_ds(files=files):
        return trainer.create_dataset(files, args.size, args.batch_size, training=True)

    def tutorial_ds(cache=False):
        ds = tf_keras.utils.image_dataset_from_directory(
            common.FLOWERS, image_size=(args.size, args.size), batch_size=args.batch_size,
            seed=42)
        return ds.cache().prefetch(-1) if cache else ds

    def tfxio_ds(cache=False, files=files):
        return tfxio_dataset(accessor, files, schema, args.size, args.batch_size, cache=cache)

    # Same examples in the same order as create_dataset (the Trainer sets the global seed)?
    # Over both files, and over the train file alone (a split the Transform wrote as one shard).
    same_order = {}
    for subset, subset_files in (("all", files), ("train", [f for f in files if "train" in os.path.basename(f)])):
        orders = {}
        for name, make in (("pipeline", pipeline_ds), ("tfxio", tfxio_ds),
                           ("tfxio_cache", lambda files: tfxio_ds(cache=True, files=files))):
            tf.random.set_seed(42)
            orders[name] = order_digest(make(files=subset_files))
        same_order[subset] = {k: orders[k] == orders["pipeline"] for k in ("tfxio", "tfxio_cache")}
    print(f"same order as create_dataset (epochs 1, 2): {same_order}", flush=True)

    makers = {"pipeline": pipeline_ds, "tutorial": tutorial_ds,
              "tutorial_cache": lambda: tutorial_ds(cache=True), "tfxio": tfxio_ds,
              "tfxio_cache": lambda: tfxio_ds(cache=True)}
    results = {k: {"epoch1": [], "later": []} for k in makers}
    loads, counts = [], {}
    for r in range(args.rounds):
        order = list(makers) if r % 2 == 0 else list(reversed(makers))
        for name in order:
            rates, counts[name] = time_epochs(makers[name](), args.epochs)
            results[name]["epoch1"].append(rates[0])
            results[name]["later"].append(common.median(rates[1:]) if len(rates) > 1 else rates[0])
        loads.append(os.getloadavg()[0])
        print(f"round {r}: " + ", ".join(f"{k} {v['epoch1'][-1]:.0f}/{v['later'][-1]:.0f}"
                                         for k, v in results.items()) + f" img/s, load {loads[-1]:.1f}",
              flush=True)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the datasets differ in size: {counts}")
    med = {k: {e: common.median(v[e]) for e in v} for k, v in results.items()}
    frozen = model_rate(args.size, args.batch_size, args.model_steps, "frozen")
    full = model_rate(args.size, args.batch_size, max(5, args.model_steps // 2), "all")
    speedup = med["pipeline"]["later"] / med["tutorial"]["later"]
    speedup1 = med["pipeline"]["epoch1"] / med["tutorial"]["epoch1"]
    headroom = med["pipeline"]["later"] / frozen
    report = {"images": counts["pipeline"], "rounds": results, "medians": med,
              "model_img_per_s": {"frozen": frozen, "all": full},
              "pipeline_over_tutorial_later": speedup, "pipeline_over_tutorial_epoch1": speedup1,
              "pipeline_over_model_frozen": headroom, "load": loads,
              "same_order_as_pipeline": same_order}
    print(json.dumps(report, indent=2))

    def pair(k):
        return f"{med[k]['epoch1']:.0f} / {med[k]['later']:.0f}"

    def yes(flag):
        return "yes" if flag else "no"

    targets = (f"5x: {'met' if speedup >= 5 else 'missed'} (epoch 1: {speedup1:.1f}x); "
               f"3x model: {'met' if headroom >= 3 else 'missed'}")
    row = (f"| {common.today()} | `{common.command()}` | {common.machine()} | {common.load()} | "
           f"{pair('pipeline')} | {pair('tutorial')} | {pair('tutorial_cache')} | {speedup:.1f}x | "
           f"{frozen:.0f} / {full:.0f} | {headroom:.1f}x | {targets} | {pair('tfxio')} | "
           f"{pair('tfxio_cache')} | "
           + "; ".join(f"{'both files' if k == 'all' else 'train file'}: {yes(v['tfxio'])} / "
                       f"{yes(v['tfxio_cache'])}" for k, v in same_order.items()) + " |")
    print(row)
    if not args.no_write:
        common.append_rows(TITLE, INTRO, HEADER, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
