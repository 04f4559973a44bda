"""Shared fixtures: small real datasets, a real Transform output, the shared data folder."""

from __future__ import annotations

import os
import random

import pytest

from components import keras_env  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("VISIONTUNE_SHARED") or os.path.join(os.path.dirname(REPO_ROOT), "shared")
MOBILENET_V2_035 = os.path.join(
    SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
GTSRB = os.path.join(SHARED, "datasets", "gtsrb")

# Deliberately numeric names: "10" must not sort before "2".
SHAPE_CLASSES = ["2", "10", "circle"]


def require_shared(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"needs {path} (../shared, or set VISIONTUNE_SHARED); see ../shared/README.md")
    return path


def draw_shape(label: str, size: int, rng: random.Random):
    """A real image whose class is visible: a square, a triangle or a circle."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randrange(0, 100) for _ in range(3))
    fg = tuple(rng.randrange(150, 256) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    m = rng.randrange(2, size // 5)
    box = [m, m, size - m - 1, size - m - 1]
    if label == "2":
        draw.rectangle(box, fill=fg)
    elif label == "10":
        draw.polygon([(size // 2, m), (m, size - m - 1), (size - m - 1, size - m - 1)], fill=fg)
    else:
        draw.ellipse(box, fill=fg)
    return image


def write_shape_tree(folder: str, per_class: int = 12, size: int = 40, seed: int = 0) -> str:
    """A class-per-folder tree of PNG and JPEG shapes."""
    rng = random.Random(seed)
    for label in SHAPE_CLASSES:
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        for i in range(per_class):
            image = draw_shape(label, size + rng.randrange(-8, 9), rng)
            ext = "png" if i % 2 else "jpg"
            image.save(os.path.join(folder, label, f"{label}_{i:03d}.{ext}"))
    return folder


@pytest.fixture(scope="session")
def shapes_prepared(tmp_path_factory):
    """A prepared (``visiontune prepare``) dataset of shapes: (prepared_dir, classes)."""
    from components import prepare
    from pipeline import configs

    root = tmp_path_factory.mktemp("shapes")
    source = write_shape_tree(str(root / "images"))
    result = prepare.prepare_dataset(
        configs.DataConfig(source=source, prepared_dir=str(root / "prepared"), eval_fraction=0.3,
                           num_shards=2, workers=1), progress=False)
    return result


RAW_FEATURE_SPEC_ARGS = {"image": "string", "image_format": "string", "filename": "string",
                         "label": "string", "height": "int64", "width": "int64"}


def raw_feature_spec():
    """The raw schema as SchemaGen infers it (``infer_feature_shape``: each feature [1])."""
    import tensorflow as tf

    return {k: tf.io.FixedLenFeature([1], getattr(tf, v)) for k, v in RAW_FEATURE_SPEC_ARGS.items()}


def run_transform(prepared_dir: str, classes, image_size: int, out_dir: str) -> str:
    """Runs ``preprocessing_fn`` with real TFT on Beam; returns the transform output dir.

    Writes ``transformed/{train,eval}-*.gz`` in the layout the Trainer reads.
    """
    import glob

    import apache_beam as beam
    import tensorflow as tf
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils

    from components import transform

    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec()))
    custom = {"image_size": image_size, "classes": list(classes)}

    def read(split):
        """Instance dicts ({name: [value]}) of every example of a prepared split."""
        rows = []
        for path in sorted(glob.glob(os.path.join(prepared_dir, split, "*"))):
            for record in tf.data.TFRecordDataset(path):
                features = tf.train.Example.FromString(record.numpy()).features.feature
                rows.append({k: list(getattr(features[k], features[k].WhichOneof("kind")).value)
                             for k in RAW_FEATURE_SPEC_ARGS})
        return rows

    with beam.Pipeline(runner="DirectRunner") as p, tft_beam.Context(temp_dir=os.path.join(out_dir, "tmp")):
        outputs = {}
        for split in ("train", "eval"):
            outputs[split] = (p | f"Read{split}" >> beam.Create(read(split))
                              )
        transformed_train, transform_fn = (
            (outputs["train"], metadata)
            | tft_beam.AnalyzeAndTransformDataset(lambda inputs: transform.preprocessing_fn(inputs, custom)))
        transformed_eval = ((outputs["eval"], metadata), transform_fn) | tft_beam.TransformDataset()
        for split, (data, meta) in (("train", transformed_train), ("eval", transformed_eval)):
            out_coder = tft.coders.ExampleProtoCoder(meta.schema)
            (data | f"Encode{split}" >> beam.Map(out_coder.encode)
             | f"Write{split}" >> beam.io.WriteToTFRecord(os.path.join(out_dir, "transformed", split),
                                                          file_name_suffix=".gz"))
        transform_fn | tft_beam.WriteTransformFn(os.path.join(out_dir, "transform_output"))
    # TFX's Transform also stores the raw schema there; the serving signatures read it.
    metadata_io.write_metadata(metadata, os.path.join(out_dir, "transform_output", "metadata"))
    return os.path.join(out_dir, "transform_output")


@pytest.fixture(scope="session")
def shapes_transformed(shapes_prepared, tmp_path_factory):
    """(transform_output_dir, transformed_dir, classes, image_size) for the shapes dataset."""
    out = str(tmp_path_factory.mktemp("transformed"))
    size = 32
    tft_dir = run_transform(shapes_prepared.output_dir, shapes_prepared.classes, size, out)
    return tft_dir, os.path.join(out, "transformed"), shapes_prepared.classes, size
