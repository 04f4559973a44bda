"""ImageExampleGen: images in, on real Beam and LocalDagRunner with SQLite ML Metadata.

Its output is checked against ``visiontune prepare`` on the same images (the
same records, in the same order, in each shard), its class list and rejects
report against prepare's files, and its artifacts and their lineage in ML
Metadata.  Re-runs: unchanged images are a cache hit, a new image a new
execution; two Beam worker processes write the same bytes as one.
"""

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import write_shape_tree
from visiontune import configs, features
from visiontune.components import evaluation, prepare
from visiontune.pipeline import local_runner, run_metadata

SPLITS = ["train", "eval"]


def _data(source, **extra):
    return configs.from_dict(configs.DataConfig, {"source": str(source), "eval_fraction": 0.3, "num_shards": 2,
                                                  "workers": 1, **extra})


def _run_ingest(root, data, workers=1):
    """Runs a pipeline of ImageExampleGen alone; returns (its output URIs, metadata path)."""
    from tfx import v1 as tfx

    from visiontune.components.image_example_gen import ImageExampleGen

    gen = ImageExampleGen(data=configs.to_dict(data))
    metadata = os.path.join(root, "metadata.sqlite")
    tfx.orchestration.LocalDagRunner().run(tfx.dsl.Pipeline(
        pipeline_name="ingest", pipeline_root=os.path.join(root, "pipeline"), components=[gen],
        enable_cache=True, beam_pipeline_args=local_runner.beam_args(workers),
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata)))
    store = run_metadata.open_store(metadata)
    execution = run_metadata.latest_execution(store, "ImageExampleGen")
    outputs = run_metadata.outputs(store, execution.id)
    return {key: artifacts[0] for key, artifacts in outputs.items()}, execution, store


def _shards(examples_uri, split):
    return sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("ieg_source")
    src = write_shape_tree(str(root / "images"))
    with open(os.path.join(src, "2", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    with open(os.path.join(src, "circle", ".notes.txt"), "w") as f:
        f.write("hidden")
    return src


@pytest.fixture(scope="module")
def ingested(source, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ieg_run"))
    return root, _run_ingest(root, _data(source))


def test_same_records_as_prepare_with_class_list_and_rejects_as_artifacts(source, ingested, tmp_path):
    _, (outputs, execution, store) = ingested
    prepared = prepare.prepare_dataset(_data(source), output_dir=str(tmp_path / "prepared"), progress=False)
    examples = outputs["examples"]
    for split in SPLITS:
        ours = _shards(examples.uri, split)
        theirs = sorted(glob.glob(os.path.join(prepared.output_dir, split, "*.tfrecord")))
        assert [os.path.basename(p) for p in ours] == [f"data_tfrecord-0000{i}-of-00002.gz" for i in range(2)]
        # Gzipped, as TFX's ExampleGens write; inside, prepare's records in prepare's order.
        assert [gzip.decompress(_read(p)) for p in ours] == [_read(p) for p in theirs], split
    assert _read(os.path.join(outputs["classes"].uri, features.CLASSES_FILE)) == \
        _read(os.path.join(prepared.output_dir, features.CLASSES_FILE))
    for name in (features.REJECTS_FILE, features.SUMMARY_FILE):
        assert _read(os.path.join(outputs["report"].uri, name)) == _read(os.path.join(prepared.output_dir, name))
    assert "broken.png" in _read(os.path.join(outputs["report"].uri, features.REJECTS_FILE)).decode()
    # Artifacts TFX components understand, recorded with their producer.
    assert json.loads(examples.properties["split_names"].string_value) == SPLITS
    assert examples.custom_properties["file_format"].string_value == "tfrecords_gzip"
    assert examples.custom_properties["payload_format"].string_value == "FORMAT_TF_EXAMPLE"
    types = {t.id: t.name for t in store.get_artifact_types()}
    assert types[outputs["classes"].type_id] == "visiontune.ClassList"
    assert types[outputs["report"].type_id] == "visiontune.IngestReport"
    assert outputs["classes"].custom_properties["num_classes"].int_value == 3
    assert outputs["report"].custom_properties["rejects"].int_value == 1
    # The driver's fingerprint of the sources is a parameter: TFX's cache key.
    assert len(run_metadata.prop(execution, "input_fingerprint", "")) == 64
    assert json.loads(run_metadata.prop(execution, "data"))["source"] == source


def test_unchanged_images_are_cached_and_a_new_image_is_a_new_execution(source, tmp_path):
    src = shutil.copytree(source, tmp_path / "images")
    root = str(tmp_path / "run")
    first, execution, _ = _run_ingest(root, _data(src))
    again, cached, _ = _run_ingest(root, _data(src))
    assert cached.id != execution.id and again["examples"].id == first["examples"].id  # cache hit
    shutil.copy(os.path.join(src, "10", "10_001.png"), os.path.join(src, "10", "10_999.png"))
    grown, new_execution, _ = _run_ingest(root, _data(src))
    assert grown["examples"].id != first["examples"].id
    summary = json.loads(_read(os.path.join(grown["report"].uri, features.SUMMARY_FILE)))
    before = json.loads(_read(os.path.join(first["report"].uri, features.SUMMARY_FILE)))
    assert sum(summary["totals"].values()) == sum(before["totals"].values()) + 1


def test_two_beam_worker_processes_write_the_same_bytes(source, ingested, tmp_path):
    _, (outputs, _, _) = ingested
    parallel, _, _ = _run_ingest(str(tmp_path), _data(source), workers=2)  # DirectRunner multi_processing
    for split in SPLITS:
        assert [_read(p) for p in _shards(parallel["examples"].uri, split)] == \
            [_read(p) for p in _shards(outputs["examples"].uri, split)]


def test_a_split_emptied_by_rejects_is_one_line_and_exit_2(tmp_path):
    src = write_shape_tree(str(tmp_path / "images"), per_class=2)
    for path in glob.glob(os.path.join(src, "*", "*")):
        with open(path, "wb") as f:
            f.write(b"\xff\xd8 not a jpeg")
    result = subprocess.run(
        [sys.executable, "-m", "visiontune.cli", "run", "--set", f"data.source={src}",
         "--set", "data.workers=1", "--set", "data.eval_fraction=0.3",
         "--set", f"pipeline.output_dir={tmp_path / 'run'}", "--set", "model.weights=none"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("visiontune run: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "no image of the train split could be used" in errors[0]
    assert "the examples are not published" in errors[0]


def test_eval_config_completed_at_run_time_equals_one_built_with_the_classes():
    settings = configs.EvaluationConfig(top_k=5)
    for n in (2, 3, 43):
        assert evaluation.fit_to_classes(evaluation.create_eval_config(settings, None), n) == \
            evaluation.create_eval_config(settings, n)


def _copy_to(local_root, url_root):
    """Copies a local tree to a URL of a filesystem TensorFlow knows."""
    import tensorflow as tf

    for folder, _, names in os.walk(local_root):
        target = url_root + folder[len(local_root):]
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(folder, name), f"{target}/{name}", overwrite=True)
    return url_root


def test_a_source_on_another_filesystem_gives_the_same_examples(source, ingested):
    """``ram://`` (TensorFlow's in-memory filesystem) stands for ``gs://``: listed and read through tf.io.gfile."""
    root, (outputs, _, _) = ingested
    url = _copy_to(source, "ram://ieg/images")
    remote, _, _ = _run_ingest(os.path.join(root, "ram"), _data(url))
    for split in SPLITS:
        assert [_read(p) for p in _shards(remote["examples"].uri, split)] == \
            [_read(p) for p in _shards(outputs["examples"].uri, split)]
    rejects = _read(os.path.join(remote["report"].uri, features.REJECTS_FILE)).decode()
    assert "ram://ieg/images/2/broken.png" in rejects
    summary = json.loads(_read(os.path.join(remote["report"].uri, features.SUMMARY_FILE)))
    assert summary["hidden"] == {"files": 1, "folders": 0}


def test_csv_labels_on_another_filesystem_are_listed_as_locally(tmp_path):
    from visiontune.components import image_listing

    local = tmp_path / "csv_source"
    write_shape_tree(str(local / "images"), per_class=3)
    rows = ["Filename;ClassId"] + [f"images/{label}/{label}_{i:03d}.{'png' if i % 2 else 'jpg'};{label}"
                                   for label in ("2", "10", "circle") for i in range(3)]
    rows += ["images/2/missing.png;2", "../outside.png;2", "images/2/2_000.jpg;10"]
    (local / "labels.csv").write_text("\n".join(rows) + "\n")
    url = _copy_to(str(local), "ram://csv_source")
    for sub, labels_csv in (("", "labels.csv"), ("/images", "../labels.csv")):  # GTSRB's test CSV is above
        listed = {}
        for where in (str(local), url):
            items, rejects, _ = image_listing._collect_items(_data(where + sub, labels_csv=labels_csv))
            listed[where] = ([(i.relpath, i.label, i.split) for i in items],  # paths normalised or not
                             [(os.path.basename(path), reason.split(" in ")[0]) for path, reason in rejects])
        assert listed[url] == listed[str(local)]
        assert len(listed[url][0]) == 9 and len(listed[url][1]) == 3


def test_the_module_beam_workers_import_loads_no_tensorflow():
    """Workers unpickle ``WriteShard`` by importing its module: it must stay light (seconds and GBs)."""
    code = ("import sys, visiontune.components.ingest_beam\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tfx', 'tf_keras'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("runner,in_process", [("", True), ("--runner=DirectRunner", True),
                                               ("--runner=DataflowRunner", False)])
def test_small_datasets_are_ingested_in_process_on_the_direct_runner_only(runner, in_process):
    """``data.workers: 0`` below ``AUTO_PARALLEL_MIN_IMAGES``: Beam's worker start-up would cost more than it saves."""
    from tfx.dsl.components.base import base_beam_executor

    from visiontune.components import image_example_gen_executor, ingest_beam

    args = [a for a in [runner, *local_runner.beam_args(2)] if a]
    executor = image_example_gen_executor.Executor(base_beam_executor.BaseBeamExecutor.Context(
        beam_pipeline_args=list(args), tmp_dir="/tmp", unique_id="1"))
    executor._workers_when_local(ingest_beam.ingest_workers(0, images=100, shards=8))
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(executor._beam_pipeline_args).get_all_options()  # as the pipeline parses them
    assert (options["direct_running_mode"], options["direct_num_workers"]) == \
        (("in_memory", 1) if in_process else ("multi_processing", 2))


@pytest.mark.parametrize("workers,images,shards,expected", [
    (0, 100, 8, 1), (0, 20_000, 8, min(8, os.cpu_count() or 1)), (3, 100, 8, 3), (100_000, 100, 8, 8),
    (100_000, 100, 1, 1)])
def test_worker_count_follows_the_setting_the_images_and_at_most_the_shards(workers, images, shards, expected):
    from visiontune.components import ingest_beam

    assert ingest_beam.ingest_workers(workers, images, shards) == expected


def test_segmentation_pairs_on_another_filesystem_give_the_same_examples(tmp_path):
    """Image/mask pairs at a URL are paired, checked and encoded as they are locally."""
    import numpy as np
    from PIL import Image

    from tests.test_segmentation import _palette_mask, _seg_config, write_pairs

    local = write_pairs(str(tmp_path / "pairs"), count=6)
    Image.new("RGB", (48, 48)).save(tmp_path / "pairs" / "x" / "in000100.jpg")  # no mask
    _palette_mask(np.zeros((48, 48))).save(tmp_path / "pairs" / "y" / "gt000999.png")  # no image
    url = _copy_to(local, "ram://ieg/pairs")
    results = {}
    for where, name in ((local, "local"), (url, "url")):
        config = _seg_config(where, str(tmp_path / name))
        results[name] = prepare.prepare_dataset(config.data, progress=False,
                                                segmentation=configs.segmentation_settings(config))
    assert sum(results["url"].totals.values()) == 6
    assert [(p[len(url):], r.replace(url, local)) for p, r in results["url"].rejects] == \
        [(p[len(local):], r) for p, r in results["local"].rejects]
    for split in SPLITS:
        local_shards = sorted(glob.glob(str(tmp_path / "local" / split / "*")))
        assert local_shards and [_read(p) for p in local_shards] == \
            [_read(p) for p in sorted(glob.glob(str(tmp_path / "url" / split / "*")))]
