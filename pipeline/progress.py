"""LocalDagRunner that reports each component as it starts and ends.

TFX's ``LocalDagRunner`` runs the pipeline's nodes one after another in this
process, in topological order, and says so only in INFO logs buried among
hundreds of others.  :class:`ProgressLocalDagRunner` runs them the same way and
reports one line when a component starts and one when it ends::

    [6/9] Transform ...
    [6/9] Transform done in 0.0 s (cached)
    [7/9] Trainer ...
    [7/9] Trainer done in 812.3 s
    [8/9] Evaluator ...
    [8/9] Evaluator FAILED after 3.2 s: ValueError: ...

``(cached)`` means TFX reused the outputs of an earlier execution with the same
inputs, code and settings; ``(skipped)`` that its inputs were not available.
The lines go to the ``visiontune.progress`` logger at INFO.

After each component the runner gives back what it freed (:func:`release_memory`:
``gc.collect()``, then glibc's ``malloc_trim``): the components share one
process, and each would otherwise start on top of the free-but-kept memory of
the ones before it (BENCHMARKS.md, "Peak memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import logging
import time
from typing import Callable, Optional

from ml_metadata.proto import metadata_store_pb2
from tfx.dsl.compiler import constants
from tfx.orchestration import metadata
from tfx.orchestration.local import local_dag_runner, runner_utils
from tfx.orchestration.portable import launcher, runtime_parameter_utils
from tfx.proto.orchestration import pipeline_pb2
from tfx.utils import telemetry_utils

logger = logging.getLogger("visiontune.progress")

_OUTCOMES = {metadata_store_pb2.Execution.CACHED: "cached",
             metadata_store_pb2.Execution.FAILED: "FAILED"}


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> bool:
    """Collects Python's garbage, then gives the C heap's free pages back to the system.

    glibc keeps what a program frees in its heaps for later allocations;
    ``malloc_trim(0)`` returns their free pages (they stay free for the
    program, which faults them back in when it needs them).  Without it, RSS
    stays at the high-water mark of the largest component so far.  Well under
    a second.  False where the C library is not glibc (only ``gc.collect()`` then).
    """
    gc.collect()
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


class ProgressLocalDagRunner(local_dag_runner.LocalDagRunner):
    """``LocalDagRunner`` that reports every component's start, end, wall time and outcome.

    ``report`` receives each line (default: the ``visiontune.progress`` logger).
    A partial run (``run_options``) is left to TFX's runner, without the lines.
    """

    def __init__(self, report: Optional[Callable[[str], None]] = None):
        super().__init__()
        self._report = report or logger.info

    def run_with_ir(self, pipeline: pipeline_pb2.Pipeline,
                    run_options: Optional[pipeline_pb2.RunOptions] = None) -> None:
        if run_options is not None:
            return super().run_with_ir(pipeline, run_options)
        # TFX 1.16's LocalDagRunner.run_with_ir (which has no per-node hook), reporting each launch.
        runtime_parameter_utils.substitute_runtime_parameter(
            pipeline, {constants.PIPELINE_RUN_ID_PARAMETER_NAME: datetime.datetime.now().isoformat()})
        deployment_config = runner_utils.extract_local_deployment_config(pipeline)
        connection = deployment_config.metadata_connection_config
        connection_config = getattr(connection, connection.WhichOneof("connection_config"))
        nodes = [n.pipeline_node for n in pipeline.nodes
                 if not n.pipeline_node.execution_options.HasField("skip")]
        start = time.monotonic()
        cached = 0
        with telemetry_utils.scoped_labels({telemetry_utils.LABEL_TFX_RUNNER: "local"}):
            for number, node in enumerate(nodes, 1):
                node_id = node.node_info.id
                component_launcher = launcher.Launcher(
                    pipeline_node=node,
                    mlmd_connection=metadata.Metadata(connection_config),
                    pipeline_info=pipeline.pipeline_info,
                    pipeline_runtime_spec=pipeline.runtime_spec,
                    executor_spec=runner_utils.extract_executor_spec(deployment_config, node_id),
                    custom_driver_spec=runner_utils.extract_custom_driver_spec(
                        deployment_config, node_id))
                prefix = f"[{number}/{len(nodes)}] {node_id}"
                self._report(f"{prefix} ...")
                node_start = time.monotonic()
                try:
                    execution_info = component_launcher.launch()
                except BaseException as e:
                    self._report(f"{prefix} FAILED after {time.monotonic() - node_start:.1f} s: "
                                 f"{_first_line(e)}")
                    raise
                seconds = time.monotonic() - node_start
                release_memory()
                outcome = self._outcome(connection_config, execution_info)
                if outcome == "FAILED":
                    self._report(f"{prefix} FAILED after {seconds:.1f} s")
                else:
                    cached += outcome == "cached"
                    self._report(f"{prefix} done in {seconds:.1f} s" + (f" ({outcome})" if outcome else ""))
        self._report(f"pipeline {pipeline.pipeline_info.id}: {len(nodes)} components in "
                     f"{time.monotonic() - start:.1f} s" + (f" ({cached} cached)" if cached else ""))

    @staticmethod
    def _outcome(connection_config, execution_info) -> str:
        """``cached``, ``FAILED``, ``skipped`` (no execution: inputs missing), or '' (ran)."""
        if execution_info is None or not execution_info.execution_id:
            return "skipped"
        with metadata.Metadata(connection_config) as m:
            executions = m.store.get_executions_by_id([execution_info.execution_id])
        return _OUTCOMES.get(executions[0].last_known_state, "") if executions else ""
