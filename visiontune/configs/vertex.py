"""The ``vertex:`` section: where and how the pipeline runs on Vertex AI Pipelines.

Only ``visiontune compile --target vertex`` reads it (``pipeline.vertex_runner``
checks what it needs there); a local run ignores it.  Its counts are checked
when the config loads like every other number.
"""

from __future__ import annotations

import dataclasses
from typing import List

from visiontune.configs.fields import setting


@dataclasses.dataclass
class DataflowConfig:
    """Beam on Dataflow for ExampleGen, StatisticsGen, Transform and Evaluator on Vertex AI.

    Attributes:
      enabled: false: those components run Beam's DirectRunner inside their
        own container.
      machine_type: the Dataflow workers' machine type.
      max_workers: the most Dataflow workers (>= 1).
      disk_size_gb: each worker's disk; 0: Dataflow's default.
      temp_location: Beam's temp folder; empty: ``VERTEX.root/dataflow/tmp``.
      staging_location: Beam's staging folder; empty:
        ``VERTEX.root/dataflow/staging``.
      sdk_container_image: the worker container: the TFX libraries the
        workers run must match the launcher's.  Empty: ``vertex.image`` (the
        Dockerfile keeps Beam's boot entrypoint for this).
      extra_args: extra ``--flag=value`` Beam options, e.g.
        ``["--subnetwork=...", "--no_use_public_ips"]``.
    """

    enabled: bool = True
    machine_type: str = "n1-standard-4"
    max_workers: int = setting(4, ge=1)
    disk_size_gb: int = setting(0, ge=0)
    temp_location: str = ""
    staging_location: str = ""
    sdk_container_image: str = ""
    extra_args: List[str] = setting([])


@dataclasses.dataclass
class VertexTrainingConfig:
    """The Trainer's Vertex AI Training job (one worker pool).

    Attributes:
      machine_type: e.g. ``n1-standard-8``, ``a2-highgpu-1g``, ``cloud-tpu``.
      accelerator_type: ``NVIDIA_TESLA_T4`` | ``NVIDIA_TESLA_V100`` |
        ``NVIDIA_TESLA_A100`` | ``NVIDIA_L4`` | ... or a TPU: ``TPU_V2`` |
        ``TPU_V3`` (machine_type ``cloud-tpu``, accelerator_count 8), ...
        Empty: CPU only.
      accelerator_count: accelerators per machine (>= 0; set with
        ``accelerator_type``).
      tpu_topology: the TPU slice topology of TPU VM machine types (e.g.
        ``2x2`` for ct5lp-hightpu-4t).
      tpu: what ``training.tpu`` becomes when the accelerator is a TPU, so
        that ``components.strategy`` builds a TPUStrategy there (``local``:
        resolve the TPU attached to the training VM).
      replica_count: machines (>= 1; the compile accepts 1: several GPUs on
        one machine train with MirroredStrategy).
      boot_disk_size_gb: 0: Vertex's default (100 GB).
      image: the training job's container image; empty: ``vertex.image``.
        A TPU accelerator needs the image built from ``Dockerfile.tpu``
        (TensorFlow's TPU build and libtpu): ``vertex.image`` has the CPU/GPU
        TensorFlow, which sees no TPU, so compile refuses a TPU without it.
    """

    machine_type: str = "n1-standard-8"
    accelerator_type: str = ""
    accelerator_count: int = setting(0, ge=0)
    tpu_topology: str = ""
    tpu: str = "local"
    replica_count: int = setting(1, ge=1)
    boot_disk_size_gb: int = setting(0, ge=0)
    image: str = ""


@dataclasses.dataclass
class VertexEndpointConfig:
    """Optional deployment of a blessed model to a Vertex AI Endpoint.

    Attributes:
      name: the Endpoint's display name; empty: push to ``serving_dir`` only.
      machine_type: the serving machines' type.
      min_replica_count: the fewest serving machines (>= 1).
      max_replica_count: the most serving machines (>= min_replica_count).
      traffic_percentage: the share of the Endpoint's traffic the new model
        gets, 0-100.
      serving_image: the prebuilt TF serving container of Vertex AI Prediction.
    """

    name: str = ""
    machine_type: str = "n1-standard-4"
    min_replica_count: int = setting(1, ge=1)
    max_replica_count: int = setting(1, ge=1)
    traffic_percentage: int = setting(100, ge=0, le=100)
    serving_image: str = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"


@dataclasses.dataclass
class VertexConfig:
    """Where and how the pipeline runs on Vertex AI Pipelines (``visiontune compile --target vertex``).

    Only read by the Vertex compile; a local run ignores this section.

    Attributes:
      project: the Google Cloud project.
      region: the Vertex AI and Dataflow region.
      root: ``gs://BUCKET/PREFIX``: the default parent of every path below.
      pipeline_root: the pipeline's artifacts; empty: ``ROOT/pipeline_root``.
      prepared_dir: the TFRecords; empty: ``ROOT/prepared`` (upload
        ``visiontune prepare``'s output there).
      serving_dir: the pushed models; empty: ``ROOT/serving``.
      image: the image built from the repository's Dockerfile, e.g.
        ``us-central1-docker.pkg.dev/PROJECT/visiontune/visiontune:0.1.0``.
      weights: ``model.weights`` on Vertex: ``imagenet`` | ``none`` |
        ``gs://.../weights.h5``; empty: ``model.weights``, which must then not
        be a local file.
      service_account: runs the pipeline, the Dataflow workers and the
        training job.  Empty: the default.
      dataflow: Beam on Dataflow.
      training: the Trainer's Vertex AI Training job.
      endpoint: the optional Vertex AI Endpoint.
    """

    project: str = ""
    region: str = "us-central1"
    root: str = ""
    pipeline_root: str = ""
    prepared_dir: str = ""
    serving_dir: str = ""
    image: str = ""
    weights: str = ""
    service_account: str = ""
    dataflow: DataflowConfig = dataclasses.field(default_factory=DataflowConfig)
    training: VertexTrainingConfig = dataclasses.field(default_factory=VertexTrainingConfig)
    endpoint: VertexEndpointConfig = dataclasses.field(default_factory=VertexEndpointConfig)
