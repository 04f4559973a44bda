"""Memory settings a run relies on (issue 17, "training that fits a small board").

The allocator settings the command line applies before TensorFlow loads, the
memory given back between components, Transform writing
only what the Trainer reads, and TFX's Google Cloud extensions loaded only
when used.  The peaks themselves are measured by ``benchmarks/memory.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_VARIABLES = ("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                    "GLIBC_TUNABLES")


def _python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in MEMORY_VARIABLES}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**base, **env}, cwd=REPO, timeout=300)
    return done.stdout.strip().splitlines()[-1]


CLI_HELP_THEN_REPORT = """
import contextlib, io, json, os, sys
from visiontune import cli
from visiontune.cli import allocator
applied = {}
configure = allocator.configure
def spy():
    applied.update(configure())
    applied["tensorflow imported before"] = "tensorflow" in sys.modules
    return applied
allocator.configure = spy
with contextlib.redirect_stdout(io.StringIO()):
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
print(json.dumps({"applied": applied, "env": os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR")}))
"""


def test_the_command_line_sets_the_allocator_before_tensorflow():
    out = json.loads(_python(CLI_HELP_THEN_REPORT))
    # oneDNN's own pool stays: through malloc it saves memory but slows training 2-4x (opt-in).
    assert out["env"] is None
    assert out["applied"] == {"M_MMAP_THRESHOLD": 128 * 1024, "M_ARENA_MAX": 2,
                              "tensorflow imported before": False}


def test_allocator_settings_the_user_gave_win():
    out = json.loads(_python(CLI_HELP_THEN_REPORT, TF_ONEDNN_USE_SYSTEM_ALLOCATOR="1", MALLOC_ARENA_MAX="4",
                             GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536"))
    assert out["env"] == "1"
    assert out["applied"] == {"tensorflow imported before": False}


def test_transform_writes_only_the_splits_the_trainer_reads_and_no_statistics(tmp_path):
    from tfx.proto import transform_pb2

    from visiontune import configs
    from visiontune.pipeline import pipeline as pipeline_lib

    config = configs.load_config(os.path.join(REPO, "configs", "gtsrb.yaml"),
                                 [f"pipeline.output_dir={tmp_path / 'run'}",
                                  f"pipeline.serving_dir={tmp_path / 'serving'}"])
    pipeline = pipeline_lib.create_pipeline(config, [str(i) for i in range(43)],
                                            pipeline_root=str(tmp_path / "run"), has_test_split=True)
    transform = {c.id: c for c in pipeline.components}["Transform"]
    splits = transform.exec_properties["splits_config"]
    if isinstance(splits, str):
        splits = json_format_parse(splits, transform_pb2.SplitsConfig())
    assert list(splits.analyze) == ["train"]  # what TFX analyzes without a splits_config
    assert list(splits.transform) == ["train", "eval"]  # not test: the Evaluator reads raw examples
    assert transform.exec_properties["disable_statistics"] in (True, 1)


def json_format_parse(text, message):
    from google.protobuf import json_format

    return json_format.Parse(text, message)


def test_tfx_google_cloud_extensions_load_only_when_used():
    code = ("import sys\nimport visiontune.pipeline\nfrom tfx import v1 as tfx\n"
            "before = sorted(m for m in sys.modules if m.startswith('google.cloud.aiplatform'))\n"
            "trainer = tfx.extensions.google_cloud_ai_platform.Trainer\n"
            "after = any(m.startswith('google.cloud.aiplatform') for m in sys.modules)\n"
            "import tfx.v1.extensions.google_cloud_big_query as bq\n"
            "print(before, trainer.__name__, after, bq.BigQueryExampleGen.__name__)")
    assert _python(code) == "[] Trainer True BigQueryExampleGen"


def test_the_runner_gives_memory_back_after_every_component(tmp_path, monkeypatch):
    from tfx import v1 as tfx

    from tests.test_cli import _tiny_components
    from visiontune.pipeline import progress

    calls = []
    release = progress.release_memory
    monkeypatch.setattr(progress, "release_memory", lambda: calls.append(len(lines)) or release())
    produce_component, consume_component = _tiny_components()
    produce = produce_component(fail=0)
    lines = []
    progress.ProgressLocalDagRunner(report=lines.append).run(tfx.dsl.Pipeline(
        pipeline_name="memory", pipeline_root=str(tmp_path / "root"),
        components=[produce, consume_component(text=produce.outputs["text"])],
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(tmp_path / "metadata.sqlite"))))
    assert calls == [1, 3]  # after each component's start line, before its end line
    assert release() in (True, False)  # glibc or not: never raises


def test_the_report_predicts_in_small_batches():
    import inspect

    from visiontune.pipeline import report_examples

    # 64 images at 192 px took ~650 MiB at the end of a whole run; 16, ~450 (BENCHMARKS.md).
    assert inspect.signature(report_examples.find_mistakes).parameters["batch_size"].default == 16
