"""A local run's ML Metadata, read one way for the summary, the report and the comparison.

Opens ``<output_dir>/metadata.sqlite`` read-only and answers what they ask of
it: the ``pipeline_run`` contexts, a run's component executions (in the order
they ran) with their states and wall times, an execution's input and output
artifacts by key, the execution that produced an artifact, the newest
execution of a component or artifact of a type, and properties of either.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Sequence

import ml_metadata as mlmd
from ml_metadata.proto import metadata_store_pb2

INPUTS = (metadata_store_pb2.Event.INPUT, metadata_store_pb2.Event.DECLARED_INPUT)
OUTPUTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
PIPELINE_RUN = "pipeline_run"  # the context type of one pipeline run


def open_store(metadata_path: str) -> mlmd.MetadataStore:
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return mlmd.MetadataStore(config)


def prop(node, name: str, default=None):
    """A custom or declared property of an artifact or execution (custom first); ``default`` if absent."""
    for props in (node.custom_properties, node.properties):
        if name in props:
            value = props[name]
            kind = value.WhichOneof("value")
            return getattr(value, kind) if kind else None
    return default


def state_name(execution) -> str:
    """``COMPLETE``, ``CACHED``, ``FAILED``, ..."""
    return metadata_store_pb2.Execution.State.Name(execution.last_known_state)


def wall_seconds(execution) -> float:
    return (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0


def component_names(store: mlmd.MetadataStore) -> Dict[int, str]:
    """{execution type id: component} (``tfx.components.trainer.component.Trainer`` -> ``Trainer``)."""
    return {t.id: t.name.rsplit(".", 1)[-1] for t in store.get_execution_types()}


def latest_execution(store: mlmd.MetadataStore, component: str):
    """Newest execution whose type name ends in ``component`` (e.g. ``Evaluator``), or None."""
    types = [t for t in store.get_execution_types() if t.name.rsplit(".", 1)[-1] == component]
    executions = [e for t in types for e in store.get_executions_by_type(t.name)]
    return max(executions, key=lambda e: e.id) if executions else None


def latest_artifact(store: mlmd.MetadataStore, type_name: str):
    """Newest LIVE artifact of a type (``Model``, ``ModelBlessing``, ...), or None."""
    artifacts = [a for a in store.get_artifacts_by_type(type_name)
                 if a.state == metadata_store_pb2.Artifact.LIVE]
    return max(artifacts, key=lambda a: a.id) if artifacts else None


def linked(store: mlmd.MetadataStore, execution_id: int, kinds: Sequence[int]) -> Dict[str, List[Any]]:
    """{event key: [artifacts]} of an execution's events of the given kinds (``INPUTS``, ``OUTPUTS``)."""
    events = [e for e in store.get_events_by_execution_ids([execution_id]) if e.type in kinds]
    artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
    out: Dict[str, List[Any]] = {}
    for event in events:
        key = event.path.steps[0].key if event.path.steps else ""
        if event.artifact_id in artifacts:
            out.setdefault(key, []).append(artifacts[event.artifact_id])
    return out


def inputs(store: mlmd.MetadataStore, execution_id: int) -> Dict[str, List[Any]]:
    """{input key (``examples``, ``model``, ...): [artifacts]} of an execution."""
    return linked(store, execution_id, INPUTS)


def outputs(store: mlmd.MetadataStore, execution_id: int) -> Dict[str, List[Any]]:
    """{output key (``model``, ``model_run``, ``blessing``, ...): [artifacts]} of an execution.

    A CACHED execution is linked to the (reused) artifacts of the one it stands for.
    """
    return linked(store, execution_id, OUTPUTS)


def producer(store: mlmd.MetadataStore, artifact_id: int):
    """The execution that output an artifact, or None."""
    for event in store.get_events_by_artifact_ids([artifact_id]):
        if event.type in OUTPUTS:
            return store.get_executions_by_id([event.execution_id])[0]
    return None


def pipeline_runs(metadata_path: str) -> Dict[int, Any]:
    """{context id: ``pipeline_run`` context}; empty when there is no metadata yet."""
    if not os.path.exists(metadata_path):
        return {}
    return {c.id: c for c in open_store(metadata_path).get_contexts_by_type(PIPELINE_RUN)}


def newest_run(store: mlmd.MetadataStore):
    """The ``pipeline_run`` context created last, or None."""
    runs = list(store.get_contexts_by_type(PIPELINE_RUN))
    return max(runs, key=lambda c: c.create_time_since_epoch) if runs else None


@dataclasses.dataclass
class ComponentRun:
    """One component's execution in a pipeline run."""

    component: str  # ``Trainer``
    state: str  # ``COMPLETE``, ``CACHED``, ...
    seconds: float  # wall time, as ML Metadata recorded it
    execution: Any  # metadata_store_pb2.Execution

    def timing(self) -> Dict[str, Any]:
        return {"component": self.component, "state": self.state, "seconds": self.seconds}


def run_components(store: mlmd.MetadataStore, context_id: int) -> List[ComponentRun]:
    """The executions of one ``pipeline_run`` context, in the order they ran."""
    names = component_names(store)
    return [ComponentRun(component=names.get(e.type_id, "?"), state=state_name(e), seconds=wall_seconds(e),
                         execution=e)
            for e in sorted(store.get_executions_by_context(context_id), key=lambda e: e.id)]


def component_timings(metadata_path: str) -> List[Dict[str, Any]]:
    """Wall time of each component in the newest run: [{component, state, seconds}], in order run."""
    store = open_store(metadata_path)
    newest = newest_run(store)
    return [c.timing() for c in run_components(store, newest.id)] if newest is not None else []
