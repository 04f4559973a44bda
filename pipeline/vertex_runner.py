"""Compiles the pipeline for Vertex AI Pipelines and submits it.

The same ``pipeline.create_pipeline`` that ``local_runner`` runs, compiled
with ``KubeflowV2DagRunner`` into a PipelineJob JSON file:

* every step runs in one container image (``vertex.image``, built from the
  repository's ``Dockerfile``: the TFX 1.16 image plus this package), so module
  code is referenced by dotted path and nothing is uploaded at compile time;
  compiling works offline, without credentials;
* ExampleGen, StatisticsGen, Transform and Evaluator run their Beam pipelines
  on Dataflow (``vertex.dataflow``);
* the Trainer runs as a Vertex AI Training job through TFX's Google Cloud
  extension, on the machine, GPUs or TPU of ``vertex.training``; with a TPU,
  ``training.tpu`` is set so that ``components.strategy`` builds a TPUStrategy,
  with several GPUs it picks MirroredStrategy by itself;
* the Pusher copies blessed models to ``vertex.serving_dir`` and, when
  ``vertex.endpoint.name`` is set, a second Pusher deploys them to a Vertex AI
  Endpoint.

Only ``submit`` talks to Google Cloud.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visiontune import configs, features
from visiontune.errors import UserError

GCS_PREFIX = "gs://"
PLACEHOLDER_MARKERS = ("YOUR_", "<", ">")
SUBMIT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


class VertexError(UserError, ValueError):
    """A problem with the Vertex settings or the environment that the user can fix."""


@dataclasses.dataclass
class VertexPaths:
    pipeline_root: str
    prepared_dir: str
    serving_dir: str
    temp_location: str
    staging_location: str


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/")] + list(parts))


def resolve_paths(vertex: configs.VertexConfig) -> VertexPaths:
    """The GCS locations, each defaulting to a folder under ``vertex.root``."""
    def pick(value: str, *default: str) -> str:
        if value:
            return value.rstrip("/")
        return _join(vertex.root, *default) if vertex.root else ""

    return VertexPaths(
        pipeline_root=pick(vertex.pipeline_root, "pipeline_root"),
        prepared_dir=pick(vertex.prepared_dir, "prepared"),
        serving_dir=pick(vertex.serving_dir, "serving"),
        temp_location=pick(vertex.dataflow.temp_location, "dataflow", "tmp"),
        staging_location=pick(vertex.dataflow.staging_location, "dataflow", "staging"),
    )


def _check_placeholder(name: str, value: str) -> None:
    if any(marker in value for marker in PLACEHOLDER_MARKERS):
        raise VertexError(f"{name}: {value!r} is a placeholder; set it to yours "
                          f"(in the config's vertex: section, or --set {name}=...)")


def _check_gcs(name: str, value: str) -> None:
    if not value:
        raise VertexError(f"{name}: not set (a gs:// location; or set vertex.root)")
    _check_placeholder(name, value)
    if not value.startswith(GCS_PREFIX) or len(value) <= len(GCS_PREFIX):
        raise VertexError(f"{name}: {value!r} is not a gs:// location (Vertex AI cannot read local paths)")


# Accelerators that Vertex AI attaches only to one machine family.
ACCELERATOR_MACHINES = {
    "NVIDIA_TESLA_A100": "a2-highgpu-",
    "NVIDIA_A100_80GB": "a2-ultragpu-",
    "NVIDIA_L4": "g2-standard-",
    "NVIDIA_H100_80GB": "a3-highgpu-",
    "NVIDIA_TESLA_K80": "n1-",
    "NVIDIA_TESLA_P4": "n1-",
    "NVIDIA_TESLA_P100": "n1-",
    "NVIDIA_TESLA_T4": "n1-",
    "NVIDIA_TESLA_V100": "n1-",
    "TPU_V2": "cloud-tpu",
    "TPU_V3": "cloud-tpu",
}


def is_tpu(accelerator_type: str) -> bool:
    return accelerator_type.upper().startswith("TPU")


def validate(config: configs.Config) -> VertexPaths:
    """Checks everything the compile needs, with messages naming the setting."""
    vertex = config.vertex
    for name, value in (("vertex.project", vertex.project), ("vertex.region", vertex.region),
                        ("vertex.image", vertex.image)):
        if not value:
            raise VertexError(f"{name}: not set (needed to compile for Vertex AI)")
        _check_placeholder(name, value)
    if vertex.root:
        _check_gcs("vertex.root", vertex.root)
    paths = resolve_paths(vertex)
    _check_gcs("vertex.pipeline_root", paths.pipeline_root)
    if config.data.example_gen == "images":
        _check_gcs("data.source", config.data.source)
        if config.data.test_source:
            _check_gcs("data.test_source", config.data.test_source)
    else:
        _check_gcs("vertex.prepared_dir", paths.prepared_dir)
    _check_gcs("vertex.serving_dir", paths.serving_dir)
    if vertex.dataflow.enabled:
        _check_gcs("vertex.dataflow.temp_location", paths.temp_location)
        _check_gcs("vertex.dataflow.staging_location", paths.staging_location)
        if vertex.dataflow.max_workers < 1:
            raise VertexError("vertex.dataflow.max_workers must be >= 1")
    training = vertex.training
    if bool(training.accelerator_type) != (training.accelerator_count > 0):
        raise VertexError("vertex.training: set accelerator_type and accelerator_count together "
                          f"(got {training.accelerator_type!r} x {training.accelerator_count})")
    family = ACCELERATOR_MACHINES.get(training.accelerator_type)
    if family and not training.machine_type.startswith(family):
        raise VertexError(f"vertex.training.machine_type: {training.accelerator_type} runs on "
                          f"{family}* machines, not {training.machine_type!r}")
    if training.replica_count != 1:
        raise VertexError("vertex.training.replica_count: only 1 is supported (one machine; "
                          "several GPUs on it train with MirroredStrategy)")
    if is_tpu(training.accelerator_type) and not training.tpu:
        raise VertexError("vertex.training.tpu: empty, but the accelerator is a TPU")
    if is_tpu(training.accelerator_type) and training.image in ("", vertex.image):
        raise VertexError(
            f"vertex.training.image: the accelerator is a TPU ({training.accelerator_type}) but the training "
            f"image is vertex.image, whose TensorFlow is the CPU/GPU build and sees no TPU; build Dockerfile.tpu "
            "(TensorFlow's TPU build and libtpu) and set vertex.training.image to it")
    if training.image:
        _check_placeholder("vertex.training.image", training.image)
    weights = weights_on_vertex(config)
    if weights.lower() not in ("imagenet", "none", "") and not weights.startswith(GCS_PREFIX):
        raise VertexError(
            f"model.weights: {weights!r} is a local file, which the training job cannot read; "
            "copy it to GCS and set vertex.weights=gs://..., or use vertex.weights=imagenet")
    if weights.startswith(GCS_PREFIX):
        _check_placeholder("vertex.weights", weights)
    endpoint = vertex.endpoint
    if endpoint.name:
        _check_placeholder("vertex.endpoint.name", endpoint.name)
        if not 1 <= endpoint.min_replica_count <= endpoint.max_replica_count:
            raise VertexError("vertex.endpoint: need 1 <= min_replica_count <= max_replica_count")
    return paths


def weights_on_vertex(config: configs.Config) -> str:
    return config.vertex.weights or config.model.weights


def cloud_config(config: configs.Config, paths: VertexPaths) -> configs.Config:
    """The config as the components on Google Cloud see it: GCS paths, no local ones.

    With images in, ImageExampleGen reads ``data.source`` (a ``gs://`` folder)
    on Dataflow.  With TFRecords in, the ingest settings stay behind: the
    TFRecords were written before and uploaded to ``vertex.prepared_dir``.
    """
    cloud = copy.deepcopy(config)
    if config.data.example_gen == "images":
        cloud.data.prepared_dir = ""
    else:
        cloud.data.source = cloud.data.test_source = ""
        cloud.data.labels_csv = cloud.data.test_labels_csv = ""
        cloud.data.prepared_dir = paths.prepared_dir
    cloud.model.weights = weights_on_vertex(config)
    cloud.pipeline.output_dir = paths.pipeline_root
    cloud.pipeline.serving_dir = paths.serving_dir
    accelerator = config.vertex.training.accelerator_type
    cloud.training.tpu = config.vertex.training.tpu if is_tpu(accelerator) else ""
    return cloud


def dataflow_args(config: configs.Config, paths: VertexPaths) -> List[str]:
    """Beam options for the Beam-powered components; empty when Dataflow is off."""
    vertex, dataflow = config.vertex, config.vertex.dataflow
    if not dataflow.enabled:
        return []
    args = [
        "--runner=DataflowRunner",
        f"--project={vertex.project}",
        f"--region={vertex.region}",
        f"--temp_location={paths.temp_location}",
        f"--staging_location={paths.staging_location}",
        f"--machine_type={dataflow.machine_type}",
        f"--max_num_workers={dataflow.max_workers}",
        f"--sdk_container_image={dataflow.sdk_container_image or vertex.image}",
        "--experiments=use_runner_v2",
    ]
    if dataflow.disk_size_gb:
        args.append(f"--disk_size_gb={dataflow.disk_size_gb}")
    if vertex.service_account:
        args.append(f"--service_account_email={vertex.service_account}")
    return args + list(dataflow.extra_args)


def training_job_spec(config: configs.Config) -> Dict[str, Any]:
    """The Vertex AI CustomJob spec the Trainer's Google Cloud extension submits."""
    vertex, training = config.vertex, config.vertex.training
    machine_spec: Dict[str, Any] = {"machine_type": training.machine_type}
    if training.accelerator_type:
        machine_spec["accelerator_type"] = training.accelerator_type
        machine_spec["accelerator_count"] = training.accelerator_count
    if training.tpu_topology:
        machine_spec["tpu_topology"] = training.tpu_topology
    pool: Dict[str, Any] = {
        "machine_spec": machine_spec,
        "replica_count": training.replica_count,
        "container_spec": {"image_uri": training.image or vertex.image},
    }
    if training.boot_disk_size_gb:
        pool["disk_spec"] = {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": training.boot_disk_size_gb}
    job_spec: Dict[str, Any] = {"worker_pool_specs": [pool]}
    if vertex.service_account:
        job_spec["service_account"] = vertex.service_account
    return {"project": vertex.project, "job_spec": job_spec}


def cloud_training(config: configs.Config) -> Dict[str, Any]:
    from tfx import v1 as tfx

    gcp = tfx.extensions.google_cloud_ai_platform
    return {
        gcp.ENABLE_VERTEX_KEY: True,
        gcp.VERTEX_REGION_KEY: config.vertex.region,
        gcp.TRAINING_ARGS_KEY: training_job_spec(config),
    }


def endpoint_push(config: configs.Config) -> Optional[Dict[str, Any]]:
    endpoint = config.vertex.endpoint
    if not endpoint.name:
        return None
    from tfx import v1 as tfx

    gcp = tfx.extensions.google_cloud_ai_platform
    return {
        gcp.ENABLE_VERTEX_KEY: True,
        gcp.VERTEX_REGION_KEY: config.vertex.region,
        gcp.VERTEX_CONTAINER_IMAGE_URI_KEY: endpoint.serving_image,
        gcp.SERVING_ARGS_KEY: {
            "project_id": config.vertex.project,
            "endpoint_name": endpoint.name,
            "machine_type": endpoint.machine_type,
            "min_replica_count": endpoint.min_replica_count,
            "max_replica_count": endpoint.max_replica_count,
            "traffic_percentage": endpoint.traffic_percentage,
        },
    }


def load_classes(config: configs.Config, classes_file: Optional[str] = None
                 ) -> Tuple[Optional[List[str]], bool]:
    """The class order and whether a test split exists, without touching GCS.

    With images in: ``(None, whether data.test_source is set)``; ImageExampleGen
    finds the classes when the pipeline runs, and ``classes_file`` is refused.
    With TFRecords in: from ``classes_file``, else the local prepared dataset
    (``data.prepared_dir``, the folder uploaded to ``vertex.prepared_dir``),
    else ``data.classes``.
    """
    from visiontune.components import prepare

    if config.data.example_gen == "images":
        if classes_file:
            raise VertexError("--classes-file: only with data.example_gen 'tfrecords'; with images the "
                              "pipeline reads the classes from data.source when it runs")
        return None, bool(config.data.test_source)

    prepared_dir = config.data.prepared_dir
    local_prepared = bool(prepared_dir) and "://" not in prepared_dir and prepare.is_prepared(prepared_dir)
    has_test = bool(config.data.test_source)
    if local_prepared:
        counts = prepare.load_result(prepared_dir).counts
        has_test = sum(counts.get("test", {}).values()) > 0
    if classes_file:
        try:
            with open(classes_file, encoding="utf-8") as f:
                classes = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise VertexError(f"--classes-file {classes_file}: {e.strerror}") from None
        if not classes:
            raise VertexError(f"--classes-file {classes_file}: no class names in it")
    elif local_prepared:
        classes = prepare.read_classes(prepared_dir)
    elif config.data.classes:
        classes = list(config.data.classes)
    else:
        raise VertexError(
            "the class list is needed to compile: run `visiontune prepare` first (its "
            f"{features.CLASSES_FILE} in data.prepared_dir is read), or pass --classes-file, "
            "or set data.classes")
    if len(set(classes)) != len(classes):
        raise VertexError("the class list names a class twice")
    return classes, has_test


def create_vertex_pipeline(config: configs.Config, classes: Optional[Sequence[str]], has_test_split: bool):
    """The pipeline with Google Cloud settings; ``config`` must pass ``validate``."""
    from visiontune.pipeline import pipeline as pipeline_lib

    paths = validate(config)
    cloud = cloud_config(config, paths)
    return pipeline_lib.create_pipeline(
        cloud, classes,
        pipeline_root=paths.pipeline_root,
        has_test_split=has_test_split,
        trainer_state_root=_join(paths.pipeline_root, "trainer_state"),
        component_beam_args=dataflow_args(config, paths),
        cloud_training=cloud_training(config),
        endpoint_push=endpoint_push(config),
    )


def compile_pipeline(config: configs.Config, output: str, classes: Optional[Sequence[str]],
                     has_test_split: bool) -> Dict[str, Any]:
    """Writes the PipelineJob JSON to ``output`` and returns it.  Offline, no credentials.

    ImageExampleGen's step is compiled with caching off: Vertex AI does not run
    TFX component drivers, so the sources' fingerprint that keys the local
    cache is not computed there, and a cached step would miss new images.
    """
    from tfx import v1 as tfx

    pipeline = create_vertex_pipeline(config, classes, has_test_split)
    output = os.path.abspath(output)
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
            default_image=config.vertex.image),
        output_dir=os.path.dirname(output),
        output_filename=os.path.basename(output))
    job = runner.run(pipeline, write_out=False)
    tasks = job.get("pipelineSpec", {}).get("root", {}).get("dag", {}).get("tasks", {})
    if "ImageExampleGen" in tasks:
        tasks["ImageExampleGen"]["cachingOptions"] = {}
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output + ".incomplete", "w", encoding="utf-8") as f:
        json.dump(job, f, sort_keys=True, indent=2)
    os.replace(output + ".incomplete", output)
    return job


# --- submission: the only part that needs Google Cloud -------------------------------------


def read_pipeline_job(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            job = json.load(f)
    except OSError as e:
        raise VertexError(f"{path}: cannot read the compiled pipeline: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise VertexError(f"{path}: not a compiled pipeline (invalid JSON: {e})") from None
    if not isinstance(job, dict) or "pipelineSpec" not in job:
        raise VertexError(f"{path}: not a compiled pipeline (no pipelineSpec); "
                          "make one with `visiontune compile --target vertex`")
    return job


def google_credentials(project: str):
    """Application Default Credentials, or a one-line explanation of how to get them."""
    import google.auth
    from google.auth import exceptions as auth_exceptions

    try:
        credentials, _ = google.auth.default(scopes=list(SUBMIT_SCOPES), quota_project_id=project)
    except auth_exceptions.DefaultCredentialsError as e:
        reason = " ".join(str(e).split())
        raise VertexError(
            "no Google Cloud credentials: run `gcloud auth application-default login`, or set "
            f"GOOGLE_APPLICATION_CREDENTIALS to a service account key file ({reason})") from None
    return credentials


def submit(path: str, project: str, region: str, service_account: str = "",
           schedule: str = "", display_name: str = "", enable_caching: Optional[bool] = None) -> str:
    """Submits (or schedules) a compiled pipeline; returns the job's or schedule's resource name."""
    job = read_pipeline_job(path)
    if not project or not region:
        raise VertexError("--project and --region are required")
    credentials = google_credentials(project)

    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud import aiplatform

    name = display_name or job.get("displayName") or "visiontune"
    try:
        pipeline_job = aiplatform.PipelineJob(
            display_name=name, template_path=path, enable_caching=enable_caching,
            project=project, location=region, credentials=credentials)
        if schedule:
            created = pipeline_job.create_schedule(
                cron=schedule, display_name=f"{name}-schedule",
                service_account=service_account or None)
            return created.resource_name
        pipeline_job.submit(service_account=service_account or None)
        return pipeline_job.resource_name
    except (auth_exceptions.GoogleAuthError, api_exceptions.GoogleAPIError) as e:
        raise VertexError(f"Vertex AI refused the pipeline: {' '.join(str(e).split())}") from None
