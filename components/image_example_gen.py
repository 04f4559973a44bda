"""ImageExampleGen: the pipeline's first component, from image files to ``tf.Example`` TFRecords, on Beam.

TFX has no ExampleGen for image files (tensorflow/tfx#2476).  This one reads
what ``visiontune prepare`` reads (class folders, CSV label lists such as
GTSRB's, a separate test source, image/mask pairs for segmentation), applies
the same checks and re-encoding (``components.image_encoding``) and the same
stable splits (a hash of each path, or of its ``data.split_group_regex``
group), and writes through Beam, so the work runs on the DirectRunner on a
laptop and on Dataflow in the cloud.  Its three outputs are artifacts in ML
Metadata, with lineage: ``examples`` (splits of gzipped TFRecords, as TFX's
own ExampleGens write them), ``classes`` (``ingest_artifacts.ClassList``) and
``report`` (``ingest_artifacts.IngestReport``: rejects and counts).

TFX's cache keys on a component's inputs and parameters, and this component
has no input artifacts: its driver (``SourceFingerprintDriver``) lists the
sources before each run and adds a fingerprint of every file's path, size and
modification time as the ``input_fingerprint`` parameter, as TFX's own
file-based ExampleGens do.  New or changed images are a new execution; an
unchanged folder is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterator, Optional, Tuple

from tfx import types
from tfx.dsl.components.base import base_beam_component, base_driver as legacy_driver, executor_spec
from tfx.orchestration.portable import base_driver
from tfx.proto.orchestration import driver_output_pb2
from tfx.types import component_spec, standard_artifacts

from visiontune.components import image_example_gen_executor, ingest_artifacts
from visiontune.components.image_example_gen_executor import (  # noqa: E402 - the keys live with the executor
    CLASSES_KEY,
    DATA_KEY,
    EXAMPLES_KEY,
    FINGERPRINT_KEY,
    REPORT_KEY,
    SEGMENTATION_KEY,
)


class ImageExampleGenSpec(component_spec.ComponentSpec):
    """Parameters: the ``data`` settings (and ``segmentation``) as JSON, and the driver's fingerprint."""

    PARAMETERS = {
        DATA_KEY: component_spec.ExecutionParameter(type=str),
        SEGMENTATION_KEY: component_spec.ExecutionParameter(type=str, optional=True),
        FINGERPRINT_KEY: component_spec.ExecutionParameter(type=str, optional=True),
    }
    INPUTS: Dict[str, Any] = {}
    OUTPUTS = {
        EXAMPLES_KEY: component_spec.ChannelParameter(type=standard_artifacts.Examples),
        CLASSES_KEY: component_spec.ChannelParameter(type=ingest_artifacts.ClassList),
        REPORT_KEY: component_spec.ChannelParameter(type=ingest_artifacts.IngestReport),
    }


def source_files(root: str) -> Iterator[Tuple[str, int, int]]:
    """(path relative to ``root``, size, mtime in ns) of every file under ``root``, sorted; links followed."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(root):
        if tf.io.gfile.exists(root):
            stat = tf.io.gfile.stat(root)
            yield os.path.basename(root), stat.length, stat.mtime_nsec
        return
    for folder, _, names in sorted(tf.io.gfile.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                stat = tf.io.gfile.stat(path)
            except tf.errors.OpError:  # a broken link: listing reports it
                yield os.path.relpath(path, root), -1, -1
                continue
            yield os.path.relpath(path, root), stat.length, stat.mtime_nsec


def sources_fingerprint(data: Dict[str, Any]) -> str:
    """Hash of every file under the sources (and of absolute label CSVs): changes when any image does."""
    digest = hashlib.sha256()
    roots = [data.get("source", ""), data.get("test_source", "")]
    roots += [data.get(k, "") for k in ("labels_csv", "test_labels_csv") if os.path.isabs(data.get(k, ""))]
    for root in filter(None, roots):
        digest.update(f"\0root {root}\n".encode("utf-8", "surrogateescape"))
        for relpath, size, mtime in source_files(root):
            digest.update(f"{relpath}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


class SourceFingerprintDriver(legacy_driver.BaseDriver, base_driver.BaseDriver):
    """Adds the sources' fingerprint to the parameters before TFX looks up its cache.

    Both driver bases, as TFX's ExampleGen driver has: components must name a
    legacy driver class, and the IR-based runners call ``run``.
    """

    def __init__(self, metadata_handle):
        legacy_driver.BaseDriver.__init__(self, metadata_handle)
        base_driver.BaseDriver.__init__(self, metadata_handle)

    def run(self, execution_info) -> driver_output_pb2.DriverOutput:
        data = json.loads(execution_info.exec_properties[DATA_KEY])
        output = driver_output_pb2.DriverOutput()
        output.exec_properties[FINGERPRINT_KEY].string_value = sources_fingerprint(data)
        return output


class ImageExampleGen(base_beam_component.BaseBeamComponent):
    """Images (local folders or ``gs://``) in; examples, class list and rejects report out."""

    SPEC_CLASS = ImageExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(image_example_gen_executor.Executor)
    DRIVER_CLASS = SourceFingerprintDriver

    def __init__(self, data: Dict[str, Any], segmentation: Optional[Dict[str, Any]] = None):
        """``data``: ``configs.to_dict(config)["data"]``; ``segmentation`` likewise, for that task."""
        super().__init__(spec=ImageExampleGenSpec(
            data=json.dumps(data, sort_keys=True),
            segmentation=json.dumps(segmentation, sort_keys=True) if segmentation else None,
            examples=types.Channel(type=standard_artifacts.Examples),
            classes=types.Channel(type=ingest_artifacts.ClassList),
            report=types.Channel(type=ingest_artifacts.IngestReport),
        ))
