"""A split's transformed examples, for benchmarks that feed a model what the Trainer was fed.

The pipeline's Transform writes only the splits the Trainer reads (train and
eval, issue 17); the Evaluator reads ExampleGen's raw examples.  For any other
split (the test images) this applies the run's own Transform graph to the raw
examples, as Transform's Beam job did for every split before: the same graph
on the same records, so the same pixels, in the same order.
"""

from __future__ import annotations

import glob
import os
from typing import List


def _newest(pattern: str) -> str:
    runs = [p for p in glob.glob(pattern) if os.path.basename(p).isdigit()]
    if not runs:
        raise SystemExit(f"nothing matches {pattern}: run the pipeline first")
    return max(runs, key=lambda p: int(os.path.basename(p)))


def transform_split(transform_graph: str, raw_files: List[str], out_dir: str) -> str:
    """Writes ``out_dir/transformed.gz`` from ``raw_files`` (gzipped ``tf.Example``s) and returns its path."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_transform as tft

    output = tft.TFTransformOutput(transform_graph)
    spec = output.raw_feature_spec()
    layer = output.transform_features_layer()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "transformed.gz")

    def feature(value) -> tf.train.Feature:
        value = np.asarray(value)
        values = value.reshape(-1).tolist()
        if value.dtype.kind in "SO":
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        if value.dtype.kind in "iu":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    with tf.io.TFRecordWriter(path, "GZIP") as writer:
        for batch in tf.data.TFRecordDataset(raw_files, compression_type="GZIP").batch(64):
            out = {k: v.numpy() for k, v in layer(tf.io.parse_example(batch, spec)).items()}
            for i in range(len(batch)):
                writer.write(tf.train.Example(features=tf.train.Features(
                    feature={k: feature(v[i]) for k, v in out.items()})).SerializeToString())
    return path


def split_files(pipeline_root: str, split: str, work_dir: str) -> List[str]:
    """The newest run's transformed ``split``: Transform's own files, or made from the raw examples."""
    transformed = os.path.join(_newest(os.path.join(pipeline_root, "Transform", "transformed_examples", "*")),
                               f"Split-{split}")
    if os.path.isdir(transformed):
        return sorted(glob.glob(os.path.join(transformed, "*")))
    raw = raw_split_files(pipeline_root, split)
    graph = _newest(os.path.join(pipeline_root, "Transform", "transform_graph", "*"))
    print(f"transforming {os.path.dirname(raw[0])} with {graph} (Transform writes train and eval only)",
          flush=True)
    return [transform_split(graph, raw, os.path.join(work_dir, split))]


def raw_split_files(pipeline_root: str, split: str) -> List[str]:
    """The newest run's ExampleGen files of ``split`` (gzipped raw ``tf.Example``s)."""
    raw = os.path.join(_newest(os.path.join(pipeline_root, "*ExampleGen", "examples", "*")), f"Split-{split}")
    if not os.path.isdir(raw):
        raise SystemExit(f"{pipeline_root}: no {split} split")
    return sorted(glob.glob(os.path.join(raw, "*")))
