"""Shared fixtures: small real datasets, a real Transform output, the shared data folder."""

from __future__ import annotations

import os
import random

import pytest

import visiontune  # noqa: F401  (first: it makes tf.keras mean tf_keras before TensorFlow loads)
from visiontune import features

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("VISIONTUNE_SHARED") or os.path.join(os.path.dirname(REPO_ROOT), "shared")
MOBILENET_V2_035 = os.path.join(
    SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
GTSRB = os.path.join(SHARED, "datasets", "gtsrb")

# Deliberately numeric names: "10" must not sort before "2".
SHAPE_CLASSES = ["2", "10", "circle"]


# Fixtures that need ../shared: a test using one is marked ``shared`` (``-m "not shared"`` leaves it out)
# even where its module forgot the marker.
SHARED_FIXTURES = {"gtsrb_slice", "first_run", "first_run_snapshot"}


# Session fixtures whose tests build on one run, in file order (re-runs into its output folder, a resume
# after a kill): under pytest-xdist (``make test`` runs two workers, ``--dist loadgroup``) every test of
# a module that uses one runs on the same worker, which builds the fixture once.  A test's
# ``fixturenames`` holds the fixtures its fixtures use too: ``first_run`` and its snapshot use ``gtsrb_slice``.
SERIAL_FIXTURES = {"gtsrb_slice": "gtsrb_run", "stopped_run": "stopped_run"}


def xdist_groups(items) -> dict:
    """{module name: xdist group}: a module stays whole (its module fixtures are built once), and the
    modules sharing a ``SERIAL_FIXTURES`` run share one group."""
    groups = {}
    for item in items:
        module = item.module.__name__
        groups.setdefault(module, module)
        for name in getattr(item, "fixturenames", ()):
            if name in SERIAL_FIXTURES:
                groups[module] = SERIAL_FIXTURES[name]
    return groups


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    groups = xdist_groups(items)
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("shared"):
            item.add_marker(pytest.mark.shared)
        item.add_marker(pytest.mark.xdist_group(groups[item.module.__name__]))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: the controller's view of a worker's collection
def pytest_xdist_node_collection_finished(node, ids):
    """Under ``--dist loadgroup``, xdist names each test's group in its node id; on a pytest where it no
    longer does (9.2: pytest-dev/pytest-xdist#1386) the groups would split without a word."""
    if node.config.getoption("dist") == "loadgroup" and ids and not any("@" in i for i in ids):
        raise pytest.UsageError("pytest-xdist's --dist loadgroup ignores the test groups with this pytest "
                                "(pytest-dev/pytest-xdist#1386): install constraints.txt's pytest, "
                                "or run with TEST_WORKERS=0")


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
    from visiontune import configs
    from visiontune.components import prepare

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

    from visiontune.components import transform

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


def trainer_config(**training):
    """A tiny Trainer config (MobileNetV2-0.35 at 32 px, 1+1 epochs) for fast real exports."""
    from visiontune import configs

    weights = MOBILENET_V2_035 if os.path.exists(MOBILENET_V2_035) else "none"
    return configs.from_dict(configs.Config, {
        "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "image_size": 32, "weights": weights,
                  "head": {"dense_units": [16], "dropout": 0.1}},
        "training": {"batch_size": 8, "warmup": {"epochs": 1, "learning_rate": 0.01},
                     "fine_tune": {"epochs": 1, "learning_rate": 0.001, "backbone": "train_last",
                                   "layers": 8},
                     "early_stopping_patience": 0, **training},
        "evaluation": {"top_k": 2},
    })


def trainer_fn_args(tmp, transformed, config, classes):
    """TFX ``FnArgs`` for ``trainer.run_fn`` on a ``shapes_transformed`` output."""
    from tfx.components.trainer import fn_args_utils

    from visiontune import configs

    tft_dir, transformed_dir, _, _ = transformed
    return fn_args_utils.FnArgs(
        train_files=[os.path.join(transformed_dir, "train*")],
        eval_files=[os.path.join(transformed_dir, "eval*")],
        transform_output=tft_dir,
        serving_model_dir=os.path.join(tmp, "serving_model"),
        model_run_dir=os.path.join(tmp, "model_run"),
        custom_config={"config": configs.to_dict(config), "classes": classes,
                       "state_root": os.path.join(tmp, "state")})


@pytest.fixture(scope="session")
def exported_model(shapes_transformed, tmp_path_factory):
    """``FnArgs`` of one real ``trainer.run_fn`` export (``.serving_model_dir`` is the SavedModel).

    Session-scoped: the Trainer tests and the serving tests share one training run.
    """
    from visiontune.components import trainer

    tmp = str(tmp_path_factory.mktemp("trainer"))
    fn_args = trainer_fn_args(tmp, shapes_transformed, trainer_config(), SHAPE_CLASSES)
    trainer.run_fn(fn_args)
    return fn_args


# --------------------------------------------------------------------------- a small real GTSRB run

GTSRB_CLASSES = ["1", "2", "12", "13", "14", "38"]  # ids as GTSRB writes them; "12" after "2"


@pytest.fixture(scope="session")
def gtsrb_slice(tmp_path_factory):
    """Six GTSRB classes (all 40 training images each) and 120 of their official test images."""
    import csv

    require_shared(GTSRB)
    require_shared(MOBILENET_V2_035)
    root = tmp_path_factory.mktemp("gtsrb")
    train = root / "train"
    train.mkdir()
    for cid in GTSRB_CLASSES:
        os.symlink(os.path.join(GTSRB, "train", f"{int(cid):05d}"), train / f"{int(cid):05d}")
    with open(os.path.join(GTSRB, "test", "GT-final_test.csv")) as f:
        rows = [r for r in csv.DictReader(f, delimiter=";") if r["ClassId"] in GTSRB_CLASSES][:120]
    test_csv = root / "test.csv"
    with open(test_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    return root, str(train), str(test_csv), rows


def gtsrb_settings(root, train, test_csv, **overrides):
    """The ``--set`` settings of the shared GTSRB run: MobileNetV2-0.35 at 48 px, evaluated on the test images.

    ``overrides`` (``{"training.seed": 7}``) come last and win.  The tests that
    re-run it through the command line pass these same settings.
    """
    base = [
        f"data.source={train}", "data.labels_csv=*/GT-*.csv",
        f"data.test_source={os.path.join(GTSRB, 'test', 'Images')}", f"data.test_labels_csv={test_csv}",
        f"data.prepared_dir={root / 'prepared'}", "data.num_shards=2", "data.workers=1",
        "model.backbone=mobilenet_v2", "model.alpha=0.35", f"model.weights={MOBILENET_V2_035}",
        "model.image_size=48", "model.head.dense_units=[32]", "model.head.dropout=0.1",
        "training.batch_size=32", "training.warmup.epochs=3", "training.warmup.learning_rate=0.003",
        "training.fine_tune.epochs=3", "training.fine_tune.learning_rate=0.0005",
        "training.fine_tune.backbone=train_last", "training.fine_tune.layers=20",
        "training.early_stopping_patience=0",
        "evaluation.split=test", "evaluation.min_accuracy=0.4", "evaluation.max_regression=0.5",
        "export.tflite=[]",  # the TFLite export is tested on ``exported_model`` (test_tflite.py); not here
        f"pipeline.output_dir={root / 'run'}", f"pipeline.serving_dir={root / 'serving'}",
        "pipeline.model_name=signs", "pipeline.name=gtsrb-e2e",
    ]
    return base + [f"{k}={v}" for k, v in overrides.items()]


def gtsrb_config(root, train, test_csv, **overrides):
    """The shared GTSRB run's config (``gtsrb_settings``): a run of a few minutes."""
    from visiontune import configs

    return configs.load_config(None, gtsrb_settings(root, train, test_csv, **overrides))


@pytest.fixture(scope="session")
def first_run(gtsrb_slice):
    """(config, RunSummary) of one real pipeline run on ``gtsrb_slice``; shared by the e2e tests.

    Later tests run the pipeline again into the same output dir.  What the first
    run left is kept in ``<root>/first_run_snapshot`` (see ``first_run_snapshot``).
    """
    import shutil

    from visiontune.pipeline import local_runner

    root, train, test_csv, _ = gtsrb_slice
    config = gtsrb_config(root, train, test_csv)
    summary = local_runner.run(config)
    snapshot = root / "first_run_snapshot"
    snapshot.mkdir()
    out = config.pipeline.output_dir
    shutil.copy(os.path.join(out, features.METADATA_DB_FILE), snapshot)
    shutil.copy(os.path.join(out, features.RUN_SUMMARY_FILE), snapshot)
    if os.path.isdir(os.path.join(out, "report")):
        shutil.copytree(os.path.join(out, "report"), snapshot / "report")
    return config, summary


@pytest.fixture(scope="session")
def first_run_snapshot(first_run, gtsrb_slice):
    """A folder with the first run's metadata.sqlite, run_summary.json and report/, as the run left them.

    Artifact folders are never rewritten, so this metadata still describes the
    first run's artifacts after later runs into the same output dir.
    """
    return str(gtsrb_slice[0] / "first_run_snapshot")


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory):
    """A real ``visiontune run`` stopped with Ctrl-C, then SIGKILLed, then finished (``tests/stopped_run.py``).

    Session-scoped: test_errors_run.py checks the Ctrl-C, test_resume.py the kill and the resume.
    """
    from tests import stopped_run as sequence

    return sequence.run_stopped_twice(tmp_path_factory.mktemp("stopped_run"))


# --------------------------------------------------------------------------- re-runs of the shared run
#
# Later tests run the pipeline again into ``first_run``'s output dir (a cached
# re-run costs the Evaluator, not a training run).  Each must leave the serving
# folder, and so the last blessed model, as the first run left them: the tests
# after it count on one version there.


def run_argv(gtsrb_slice, *settings, command="run"):
    """``visiontune run`` with the shared GTSRB run's settings (``gtsrb_settings``) then ``settings``."""
    root, train, test_csv, _ = gtsrb_slice
    argv = [command]
    for setting in gtsrb_settings(root, train, test_csv) + list(settings):
        argv += ["--set", setting]
    return argv


def latest_states(metadata_path: str):
    """{component: state of its latest execution} from a run's ML Metadata (``COMPLETE``, ``CACHED``, ...)."""
    from ml_metadata.proto import metadata_store_pb2

    from visiontune.pipeline import run_metadata

    store = run_metadata.open_store(metadata_path)
    by_type = {t.id: t.name for t in store.get_execution_types()}
    latest = {}
    for e in sorted(store.get_executions(), key=lambda e: e.id):
        latest[by_type[e.type_id].rsplit(".", 1)[-1]] = metadata_store_pb2.Execution.State.Name(e.last_known_state)
    return latest


def folder_files(folder: str):
    """{relative path: (size, mtime_ns)} of every file under ``folder``: what a run must not touch."""
    found = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            found[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return found


# --------------------------------------------------------------------------- the built-in server on the tiny export

def builtin_server_fixture(folder: str, limits: dict):
    """A module-scoped ``server`` fixture: the built-in server on version 1 of ``exported_model``.

    ``folder`` names the temporary folder (``fuzz``, ``limits``); ``limits`` are
    the ``Limits`` the module's refusals are reached with.  One place, so the
    modules that test one server with small limits start it the same way.
    """

    @pytest.fixture(scope="module")
    def server(exported_model, tmp_path_factory):
        from tests.test_serving import MODEL, copy_version, start_builtin

        base = str(tmp_path_factory.mktemp(folder) / MODEL)
        copy_version(exported_model.serving_model_dir, os.path.join(base, "1"))
        served = start_builtin(base, **limits)
        try:
            served.wait_available(1)
            yield served
        finally:
            served.stop()

    return server
