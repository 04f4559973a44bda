"""Vertex AI: the GTSRB config compiled offline for Vertex AI Pipelines, and submit without credentials.

The compiled PipelineJob JSON is parsed with KFP's pipeline-spec proto and its
DAG checked: component order, image, the Trainer's Vertex AI Training job
(machine, GPUs, TPU), Dataflow options on the Beam components only, and no
local path anywhere.  Only the calls that need Google Cloud (submitting,
Dataflow, Vertex AI Training, the Endpoint) are not exercised.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from visiontune import configs
from visiontune.pipeline import vertex_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GTSRB_CONFIG = os.path.join(REPO, "configs", "gtsrb.yaml")
IMAGE = "us-central1-docker.pkg.dev/test-project/visiontune/visiontune:0.1.0"
TPU_IMAGE = "us-central1-docker.pkg.dev/test-project/visiontune/visiontune-tpu:0.1.0"
ROOT = "gs://test-bucket/visiontune/gtsrb"
GTSRB_CLASSES = [str(i) for i in range(43)]
VERTEX = ["vertex.project=test-project", "vertex.region=europe-west4", f"vertex.root={ROOT}",
          f"vertex.image={IMAGE}", "vertex.service_account=pipelines@test-project.iam.gserviceaccount.com"]
BEAM_COMPONENTS = {"ImportExampleGen", "StatisticsGen", "Transform", "Evaluator"}
ORDER = ["ImportExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Transform",
         "Trainer", "Evaluator", "Pusher"]


GCS_SOURCE = "gs://test-bucket/images/gtsrb/Final_Training/Images"
GCS_TEST_SOURCE = "gs://test-bucket/images/gtsrb/Final_Test/Images"
IMAGES_ON_GCS = [f"data.source={GCS_SOURCE}", f"data.test_source={GCS_TEST_SOURCE}"]
IMAGES_ON_GCS_ARGS = [arg for setting in IMAGES_ON_GCS for arg in ("--set", setting)]


def _classes_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(GTSRB_CLASSES) + "\n")
    return str(path)


def _gtsrb(overrides=(), example_gen="tfrecords"):
    """The GTSRB config as the Vertex compile loads it: no files of this machine (../shared) are needed.

    TFRecords in (uploaded to ``vertex.prepared_dir``) unless ``example_gen`` says images.
    """
    return configs.load_config(GTSRB_CONFIG, [f"data.example_gen={example_gen}"] + list(overrides),
                               local_files=False)


def _compile(tmp_path, *overrides, classes=None):
    """Compiles the GTSRB config in-process; returns (PipelineJob proto, JSON dict)."""
    config = _gtsrb(VERTEX + list(overrides))
    output = tmp_path / "pipeline.json"
    vertex_runner.compile_pipeline(config, str(output), classes or GTSRB_CLASSES, has_test_split=True)
    job_dict = json.loads(output.read_text())
    job = json_format.ParseDict(job_dict, pipeline_spec_pb2.PipelineJob())
    return job, job_dict


def _spec(job) -> pipeline_spec_pb2.PipelineSpec:
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(json_format.MessageToDict(job.pipeline_spec), spec)
    return spec


def _param(spec, task, name):
    value = spec.root.dag.tasks[task].inputs.parameters[name].runtime_value.constant_value
    return value.string_value


def _container(spec, task):
    executor = spec.components[spec.root.dag.tasks[task].component_ref.name].executor_label
    return spec.deployment_spec.fields["executors"].struct_value.fields[executor] \
        .struct_value.fields["container"].struct_value


def _args(container):
    return [v.string_value for v in container.fields["args"].list_value.values]


def _topological_order(spec):
    tasks = spec.root.dag.tasks
    done, order = set(), []
    while len(order) < len(tasks):
        ready = sorted(t for t in tasks if t not in done and set(tasks[t].dependent_tasks) <= done)
        assert ready, "the DAG has a cycle"
        for t in ready:
            done.add(t)
            order.append(t)
    return order


def _trainer_custom_config(spec):
    return json.loads(_param(spec, "Trainer", "custom_config"))


@pytest.fixture(scope="module")
def gpu_job(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("gpu"))


def test_compiles_offline_to_a_pipeline_job_with_the_whole_dag(gpu_job):
    job, _ = gpu_job
    spec = _spec(job)
    assert spec.pipeline_info.name == "gtsrb" and spec.sdk_version == "tfx-1.16.0"
    assert job.runtime_config.gcs_output_directory == f"{ROOT}/pipeline_root"
    tasks = spec.root.dag.tasks
    assert set(ORDER) <= set(tasks) and "endpoint_pusher" not in tasks
    order = _topological_order(spec)
    positions = [order.index(name) for name in ORDER]
    assert positions == sorted(positions), order
    deps = {name: set(tasks[name].dependent_tasks) for name in ORDER}
    assert deps["StatisticsGen"] == {"ImportExampleGen"}
    assert deps["Transform"] == {"ImportExampleGen", "SchemaGen"}
    assert deps["Trainer"] == {"SchemaGen", "Transform"}
    assert {"ImportExampleGen", "Trainer"} <= deps["Evaluator"]
    assert any("resolver" in d for d in deps["Evaluator"])  # the latest blessed model as baseline
    assert deps["Pusher"] == {"Evaluator", "Trainer"}
    assert _param(spec, "ImportExampleGen", "input_base") == f"{ROOT}/prepared"
    splits = json.loads(_param(spec, "ImportExampleGen", "input_config"))["splits"]
    assert [s["name"] for s in splits] == ["train", "eval", "test"]


def test_every_step_runs_in_the_image_with_module_code_inside(gpu_job):
    spec = _spec(gpu_job[0])
    for task in ORDER:
        container = _container(spec, task)
        assert container.fields["image"].string_value == IMAGE, task
    # Module code is referenced by dotted path: it travels inside the image.
    assert _param(spec, "Trainer", "run_fn") == "visiontune.components.trainer.run_fn"
    assert _param(spec, "Transform", "preprocessing_fn") == "visiontune.components.transform.preprocessing_fn"
    assert "module_file" not in spec.root.dag.tasks["Trainer"].inputs.parameters
    assert _args(_container(spec, "Pusher"))[:2] == ["--executor_class_path", "visiontune.components.pusher.Executor"]
    push = json.loads(_param(spec, "Pusher", "push_destination"))
    assert push["filesystem"]["base_directory"] == f"{ROOT}/serving/gtsrb"


def test_trainer_runs_on_vertex_ai_training_with_the_configured_gpu(gpu_job):
    spec = _spec(gpu_job[0])
    assert _args(_container(spec, "Trainer"))[1] == \
        "visiontune.components.class_aware_vertex.VertexTrainerExecutor"
    custom = _trainer_custom_config(spec)
    assert custom["ai_platform_enable_vertex"] is True
    assert custom["ai_platform_vertex_region"] == "europe-west4"
    training = custom["ai_platform_training_args"]
    assert training["project"] == "test-project"
    (pool,) = training["job_spec"]["worker_pool_specs"]
    assert pool["machine_spec"] == {"machine_type": "a2-highgpu-1g",
                                    "accelerator_type": "NVIDIA_TESLA_A100", "accelerator_count": 1}
    assert pool["container_spec"] == {"image_uri": IMAGE}
    assert training["job_spec"]["service_account"] == "pipelines@test-project.iam.gserviceaccount.com"
    # What run_fn sees: GCS paths, no TPU (so GPUs pick the strategy), the classes in order.
    assert custom["config"]["training"]["tpu"] == ""
    assert custom["config"]["model"]["weights"] == "imagenet"
    assert custom["config"]["data"]["prepared_dir"] == f"{ROOT}/prepared"
    assert custom["state_root"] == f"{ROOT}/pipeline_root/trainer_state"
    assert custom["classes"] == GTSRB_CLASSES
    assert "vertex" not in custom["config"]


def test_dataflow_arguments_go_to_the_beam_components_only(gpu_job):
    spec = _spec(gpu_job[0])
    for task in ORDER:
        args = _args(_container(spec, task))
        beam = [a for a in args if a.startswith("--") and a not in
                ("--executor_class_path", "--json_serialized_invocation_args")]
        if task not in BEAM_COMPONENTS:
            assert beam == [], (task, beam)
            continue
        assert "--runner=DataflowRunner" in beam, task
        for expected in ("--project=test-project", "--region=europe-west4",
                         f"--temp_location={ROOT}/dataflow/tmp", f"--staging_location={ROOT}/dataflow/staging",
                         "--machine_type=n1-standard-4", "--max_num_workers=4",
                         f"--sdk_container_image={IMAGE}",
                         "--service_account_email=pipelines@test-project.iam.gserviceaccount.com"):
            assert expected in beam, (task, expected)
        assert not any(a.startswith("--direct_") for a in beam), task
    # ExampleGen's driver (which resolves the input span) gets them too.
    lifecycle = _container(spec, "ImportExampleGen").fields["lifecycle"].struct_value
    driver_args = [v.string_value for v in lifecycle.fields["preCacheCheck"].struct_value
                   .fields["args"].list_value.values]
    assert "--runner=DataflowRunner" in driver_args


def test_no_local_path_is_left_in_the_spec(gpu_job, tmp_path):
    _, job_dict = gpu_job
    # Nested JSON (custom_config, push_destination) sits escaped inside strings: unescape it.
    text = json.dumps(job_dict).replace('\\"', '"')
    for local in (REPO, os.path.dirname(REPO), os.getcwd(), str(tmp_path), os.path.expanduser("~")):
        assert local not in text, local
    assert not re.findall(r"(?<![\w.\-])/(?:work|tmp|home|root|Users|var|mnt)\b", text)
    assert "../shared" not in text and "outputs/" not in text
    # Every absolute location is on GCS or is the image.
    locations = set(re.findall(r"[a-z]+://[^\"\\\s]+", text))
    assert locations and all(loc.startswith("gs://test-bucket/") for loc in locations), locations


def test_four_v100s_and_a_tpu(tmp_path):
    job, _ = _compile(tmp_path, "vertex.training.machine_type=n1-standard-16",
                      "vertex.training.accelerator_type=NVIDIA_TESLA_V100",
                      "vertex.training.accelerator_count=4")
    custom = _trainer_custom_config(_spec(job))
    (pool,) = custom["ai_platform_training_args"]["job_spec"]["worker_pool_specs"]
    assert pool["machine_spec"] == {"machine_type": "n1-standard-16",
                                    "accelerator_type": "NVIDIA_TESLA_V100", "accelerator_count": 4}
    # Several GPUs on one machine: components.strategy picks MirroredStrategy from the hardware.
    assert custom["config"]["training"]["tpu"] == ""

    tpu = ["vertex.training.machine_type=cloud-tpu", "vertex.training.accelerator_type=TPU_V3",
           "vertex.training.accelerator_count=8"]
    # The default image has TensorFlow's CPU/GPU build, which sees no TPU: refused.
    with pytest.raises(vertex_runner.VertexError, match="vertex.training.image: .*Dockerfile.tpu"):
        _compile(tmp_path, *tpu)
    with pytest.raises(vertex_runner.VertexError, match="vertex.training.image: "):
        _compile(tmp_path, *tpu, f"vertex.training.image={IMAGE}")
    job, _ = _compile(tmp_path, *tpu, f"vertex.training.image={TPU_IMAGE}")
    custom = _trainer_custom_config(_spec(job))
    (pool,) = custom["ai_platform_training_args"]["job_spec"]["worker_pool_specs"]
    assert pool["machine_spec"] == {"machine_type": "cloud-tpu", "accelerator_type": "TPU_V3",
                                    "accelerator_count": 8}
    assert pool["container_spec"] == {"image_uri": TPU_IMAGE}  # the training job only
    assert _container(_spec(job), "Transform").fields["image"].string_value == IMAGE
    # training.tpu set: components.strategy.create_strategy builds a TPUStrategy.
    assert custom["config"]["training"]["tpu"] == "local"


def test_the_tpu_image_is_the_default_image_with_tensorflows_tpu_build():
    """``Dockerfile.tpu`` replaces TensorFlow with tensorflow-tpu of the same version, and adds libtpu."""
    pinned = re.search(r"^tensorflow==(\S+)$", open(os.path.join(REPO, "constraints.txt")).read(), re.M).group(1)
    text = open(os.path.join(REPO, "Dockerfile.tpu")).read()
    assert re.search(r"^ARG BASE_IMAGE$", text, re.M) and "FROM ${BASE_IMAGE}" in text
    assert f"tensorflow-tpu=={pinned}" in text and "libtpu-releases" in text
    assert "pip uninstall -y tensorflow" in text


def test_optional_endpoint_push_and_dataflow_off(tmp_path):
    job, _ = _compile(tmp_path, "vertex.endpoint.name=gtsrb-signs", "vertex.dataflow.enabled=false",
                      "vertex.training.accelerator_type=", "vertex.training.accelerator_count=0",
                      "vertex.training.machine_type=n1-standard-8")
    spec = _spec(job)
    assert set(spec.root.dag.tasks["endpoint_pusher"].dependent_tasks) == {"Evaluator", "Trainer"}
    assert _args(_container(spec, "endpoint_pusher"))[1] == \
        "tfx.extensions.google_cloud_ai_platform.pusher.executor.Executor"
    custom = json.loads(_param(spec, "endpoint_pusher", "custom_config"))
    assert custom["ai_platform_enable_vertex"] is True
    assert custom["ai_platform_vertex_region"] == "europe-west4"
    assert custom["ai_platform_serving_args"]["endpoint_name"] == "gtsrb-signs"
    assert custom["ai_platform_serving_args"]["project_id"] == "test-project"
    assert custom["ai_platform_vertex_container_image_uri"].startswith("us-docker.pkg.dev/vertex-ai/prediction/")
    # The filesystem Pusher still pushes to GCS.
    assert "Pusher" in spec.root.dag.tasks
    # Dataflow off: the Beam components run DirectRunner in their containers, with no options.
    for task in BEAM_COMPONENTS:
        assert not [a for a in _args(_container(spec, task)) if a.startswith("--runner")]
    pool = _trainer_custom_config(spec)["ai_platform_training_args"]["job_spec"]["worker_pool_specs"][0]
    assert pool["machine_spec"] == {"machine_type": "n1-standard-8"}


@pytest.mark.parametrize("overrides, message", [
    (["vertex.project=YOUR_PROJECT"], "vertex.project: 'YOUR_PROJECT' is a placeholder"),
    (["vertex.root=/work/data"], "vertex.root: '/work/data' is not a gs:// location"),
    (["vertex.image="], "vertex.image: not set"),
    (["vertex.weights="], "model.weights: .* is a local file"),
    (["vertex.training.accelerator_count=0"], "set accelerator_type and accelerator_count together"),
    (["vertex.training.machine_type=n1-standard-8"], "NVIDIA_TESLA_A100 runs on a2-highgpu-"),
])
def test_invalid_vertex_settings_are_named(tmp_path, overrides, message):
    config = _gtsrb(VERTEX + overrides)
    with pytest.raises(vertex_runner.VertexError, match=message):
        vertex_runner.compile_pipeline(config, str(tmp_path / "p.json"), GTSRB_CLASSES, True)
    assert not (tmp_path / "p.json").exists()


def test_the_shipped_placeholders_are_refused():
    config = _gtsrb()
    with pytest.raises(vertex_runner.VertexError, match="placeholder"):
        vertex_runner.validate(config)


def test_classes_come_from_a_file_the_local_prepared_dir_or_the_config(tmp_path):
    config = _gtsrb(VERTEX + [f"data.prepared_dir={tmp_path / 'none'}"])
    with pytest.raises(vertex_runner.VertexError, match="--classes-file"):
        vertex_runner.load_classes(config)
    classes, has_test = vertex_runner.load_classes(config, _classes_file(tmp_path))
    assert classes == GTSRB_CLASSES and has_test  # the config prepares a test set
    config.data.classes = ["b", "a"]
    assert vertex_runner.load_classes(config)[0] == ["b", "a"]


def test_classes_and_test_split_from_a_local_prepared_dataset(shapes_prepared, tmp_path):
    config = _gtsrb(VERTEX + [f"data.prepared_dir={shapes_prepared.output_dir}",
                                                         "evaluation.split=eval"])
    classes, has_test = vertex_runner.load_classes(config)
    assert classes == list(shapes_prepared.classes) and has_test is False


def test_local_pipeline_of_the_same_config_is_unchanged(tmp_path, caplog):
    """The vertex: section changes nothing locally: stock Trainer, our Pusher, DirectRunner only."""
    from visiontune.components import class_aware, prepare, pusher
    from visiontune.pipeline import local_runner, pipeline as pipeline_lib

    config = _gtsrb(VERTEX + [f"pipeline.output_dir={tmp_path / 'run'}"])
    prepared = prepare.PrepareResult(output_dir=config.data.prepared_dir, classes=GTSRB_CLASSES,
                                     counts={"train": {"0": 1}, "eval": {"0": 1}, "test": {"0": 1}},
                                     rejects=[])
    pipeline = local_runner.create_local_pipeline(config, prepared)
    by_id = {c.id: c for c in pipeline.components}
    assert "endpoint_pusher" not in by_id
    assert type(by_id["Trainer"]) is class_aware.Trainer  # TFX's Trainer, plus the class list input
    # A Pusher subclass, not the deprecated custom_executor_spec (which logs a warning).
    assert type(by_id["Pusher"]) is pusher.Pusher
    assert by_id["Pusher"].executor_spec.executor_class is pusher.Executor
    assert "custom_executor_spec" not in caplog.text
    trainer_custom = json.loads(by_id["Trainer"].exec_properties["custom_config"])
    assert trainer_custom["config"]["training"]["tpu"] == ""
    assert "ai_platform_training_args" not in trainer_custom
    for name in BEAM_COMPONENTS:
        assert by_id[name].executor_spec.beam_pipeline_args == local_runner.beam_args(1)
    # Without the vertex: section the local Trainer settings (its cache key) are identical.
    plain = _gtsrb([f"pipeline.output_dir={tmp_path / 'run'}"])
    plain.vertex = configs.VertexConfig()
    other = {c.id: c for c in local_runner.create_local_pipeline(plain, prepared).components}
    assert json.loads(other["Trainer"].exec_properties["custom_config"]) == trainer_custom
    assert pipeline_lib.TRAINER_FN == "visiontune.components.trainer.run_fn"


def _cli(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "visiontune.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def _no_credentials_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_", "GCE_"))}
    env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing-key.json"),
               CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),  # no gcloud application-default login
               GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")  # no metadata server
    return env


def test_cli_compile_then_submit_without_credentials(tmp_path):
    env = _no_credentials_env(tmp_path)
    output = tmp_path / "out" / "pipeline.json"
    # Images in (the default): no local dataset and no class list are needed to compile.
    result = _cli("compile", "--config", GTSRB_CONFIG, "--target", "vertex", "--output", str(output),
                  "--project", "test-project", "--gcs-root", ROOT, "--image", IMAGE,
                  *IMAGES_ON_GCS_ARGS, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled gtsrb" in result.stdout and "Traceback" not in result.stderr
    assert f"reads images   {GCS_SOURCE}" in result.stdout
    json_format.ParseDict(json.loads(output.read_text()), pipeline_spec_pb2.PipelineJob())

    result = _cli("submit", str(output), "--project", "test-project", "--region", "us-central1",
                  "--schedule", "0 3 * * 1", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert "no Google Cloud credentials" in error_lines[0]
    assert "gcloud auth application-default login" in error_lines[0]


def test_cli_compile_errors_are_one_line(tmp_path):
    result = _cli("compile", "--config", GTSRB_CONFIG, "--output", str(tmp_path / "p.json"),
                  *IMAGES_ON_GCS_ARGS, env=_no_credentials_env(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "placeholder" in result.stderr
    # Images on this machine cannot be read by Vertex AI; a class list is not for images in.
    result = _cli("compile", "--config", GTSRB_CONFIG, "--output", str(tmp_path / "p.json"),
                  "--project", "test-project", "--gcs-root", ROOT, "--image", IMAGE)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.source: " in result.stderr and "is not a gs:// location" in result.stderr
    result = _cli("compile", "--config", GTSRB_CONFIG, "--output", str(tmp_path / "p.json"),
                  "--project", "test-project", "--gcs-root", ROOT, "--image", IMAGE, *IMAGES_ON_GCS_ARGS,
                  "--classes-file", _classes_file(tmp_path))
    assert result.returncode == 2 and "--classes-file: only with data.example_gen 'tfrecords'" in result.stderr
    result = _cli("submit", str(tmp_path / "nope.json"), "--project", "p", "--region", "r")
    assert result.returncode == 2 and "cannot read the compiled pipeline" in result.stderr


def test_remote_weights_are_copied_to_a_local_file_for_keras(tmp_path):
    """On Vertex AI Training ``model.weights`` is a gs:// file; h5py needs a local one.

    ``file://`` goes through the same ``tf.io.gfile`` path as ``gs://``.
    """
    from visiontune.components import backbones

    source = tmp_path / "weights_no_top.h5"
    source.write_bytes(b"\x89HDF\r\n\x1a\n fake weights")
    local = backbones.resolve_weights(f"file://{source}")
    assert os.path.isfile(local) and local != str(source) and "://" not in local
    assert open(local, "rb").read() == source.read_bytes()
    assert backbones.resolve_weights(f"file://{source}") == local  # cached
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        backbones.resolve_weights(f"file://{tmp_path}/missing.h5")


@pytest.fixture(scope="module")
def images_job(tmp_path_factory):
    """The GTSRB config with images in (the default), its images on GCS: no class list given."""
    config = _gtsrb(VERTEX + IMAGES_ON_GCS, example_gen="images")
    output = tmp_path_factory.mktemp("images") / "pipeline.json"
    classes, has_test = vertex_runner.load_classes(config)
    assert classes is None and has_test
    vertex_runner.compile_pipeline(config, str(output), classes, has_test)
    job_dict = json.loads(output.read_text())
    return json_format.ParseDict(job_dict, pipeline_spec_pb2.PipelineJob()), job_dict


def test_images_in_ingest_runs_on_dataflow_and_the_classes_are_read_at_run_time(images_job):
    spec = _spec(images_job[0])
    tasks = spec.root.dag.tasks
    assert "ImportExampleGen" not in tasks
    deps = {name: set(tasks[name].dependent_tasks) for name in tasks}
    assert deps["StatisticsGen"] == {"ImageExampleGen"}
    # The class list is an artifact of ingest, an input of Transform, the Trainer and the Evaluator.
    for name in ("Transform", "Trainer", "Evaluator"):
        assert "ImageExampleGen" in deps[name], name
        assert tasks[name].inputs.artifacts["classes"].task_output_artifact.producer_task == "ImageExampleGen"
    data = json.loads(_param(spec, "ImageExampleGen", "data"))
    assert data["source"] == GCS_SOURCE and data["test_source"] == GCS_TEST_SOURCE
    assert data["labels_csv"] == "*/GT-*.csv" and data["split_group_regex"]
    assert "classes" not in _trainer_custom_config(spec)
    assert "classes" not in json.loads(_param(spec, "Transform", "custom_config"))
    assert _args(_container(spec, "ImageExampleGen"))[:2] == [
        "--executor_class_path", "visiontune.components.image_example_gen_executor.Executor"]
    beam = _args(_container(spec, "ImageExampleGen"))
    assert "--runner=DataflowRunner" in beam and not any(a.startswith("--direct_") for a in beam)
    # Vertex AI runs no TFX driver, so the sources' fingerprint is not in its cache key: never cached.
    assert not tasks["ImageExampleGen"].caching_options.enable_cache
    assert tasks["Transform"].caching_options.enable_cache


def test_images_in_leave_no_local_path_in_the_spec(images_job, tmp_path):
    text = json.dumps(images_job[1]).replace('\\"', '"')
    for local in (REPO, os.path.dirname(REPO), os.getcwd(), str(tmp_path)):
        assert local not in text, local
    locations = set(re.findall(r"[a-z]+://[^\"\\\s]+", text))
    assert locations and all(loc.startswith("gs://test-bucket/") for loc in locations), locations
