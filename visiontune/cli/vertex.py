"""``visiontune compile`` and ``visiontune submit``: the pipeline on Vertex AI Pipelines.

``compile`` works offline and needs no credentials; ``submit`` is the only
command that talks to Google Cloud, and without credentials it stops at once
with one line saying how to get them.
"""

from __future__ import annotations

import contextlib

from visiontune.cli import options
from visiontune.errors import UserError

# Shortcut flags of ``compile``: (flag, setting it overrides, help).
_COMPILE_SHORTCUTS = [
    ("--project", "vertex.project", "Google Cloud project"),
    ("--region", "vertex.region", "Vertex AI / Dataflow region, e.g. us-central1"),
    ("--gcs-root", "vertex.root", "gs://BUCKET/PREFIX under which pipeline_root, prepared, serving go"),
    ("--image", "vertex.image", "the container image built from the Dockerfile"),
    ("--service-account", "vertex.service_account", "service account the steps run as"),
]


@contextlib.contextmanager
def _user_errors():
    import warnings

    from visiontune.pipeline import vertex_runner

    # The Google Cloud libraries warn about Python 3.10 once per imported module, and
    # about the google-cloud-storage version TFX pins: nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.")
    try:
        yield
    except vertex_runner.VertexError as e:
        raise UserError(str(e)) from None


def cmd_compile(args) -> int:
    from visiontune.pipeline import vertex_runner

    # The pipeline runs on Vertex AI: files on this machine (a local weights file) are not checked here;
    # vertex_runner.validate refuses the settings that would point at them.
    config = options.load_config(args, _COMPILE_SHORTCUTS, local_files=False)
    with _user_errors():
        classes, has_test = vertex_runner.load_classes(config, args.classes_file)
        vertex_runner.validate(config)
        vertex_runner.compile_pipeline(config, args.output, classes, has_test)
    paths = vertex_runner.resolve_paths(config.vertex)
    print(f"compiled {config.pipeline.name} for Vertex AI Pipelines: {args.output}\n"
          f"  image          {config.vertex.image}\n"
          f"  pipeline root  {paths.pipeline_root}\n"
          + (f"  reads          {paths.prepared_dir} ({len(classes)} classes)\n" if classes is not None else
             f"  reads images   {config.data.source} (classes found when it runs)\n")
          + f"  pushes to      {paths.serving_dir}/{config.pipeline.model_name}"
          + (f" and endpoint {config.vertex.endpoint.name}" if config.vertex.endpoint.name else "")
          + f"\nsubmit: visiontune submit {args.output} --project {config.vertex.project} "
            f"--region {config.vertex.region}")
    return 0


def cmd_submit(args) -> int:
    from visiontune.pipeline import vertex_runner

    caching = {"on": True, "off": False, None: None}[args.cache]
    with _user_errors():
        name = vertex_runner.submit(args.pipeline, args.project, args.region,
                                    service_account=args.service_account or "",
                                    schedule=args.schedule or "", display_name=args.display_name or "",
                                    enable_caching=caching)
    kind = "schedule" if args.schedule else "pipeline job"
    print(f"submitted {kind}: {name}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "compile", help="compile the pipeline for Vertex AI Pipelines (offline, no credentials)",
        description="Compiles the pipeline with KubeflowV2DagRunner into a PipelineJob JSON file "
                    "for Vertex AI Pipelines, using the config's vertex: section.")
    options.add_config_args(p, _COMPILE_SHORTCUTS)
    p.add_argument("--target", choices=["vertex"], default="vertex", help="orchestrator (vertex)")
    p.add_argument("--output", "-o", default="pipeline.json", help="the JSON file to write")
    p.add_argument("--classes-file", help="with data.example_gen tfrecords: class names, one a line "
                                          "(default: classes.txt of the local data.prepared_dir, else "
                                          "data.classes)")
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser(
        "submit", help="submit a compiled pipeline to Vertex AI Pipelines",
        description="Submits a compiled pipeline (visiontune compile) with google-cloud-aiplatform, "
                    "using Application Default Credentials.")
    p.add_argument("pipeline", help="the compiled pipeline JSON")
    p.add_argument("--project", required=True, help="Google Cloud project")
    p.add_argument("--region", required=True, help="Vertex AI region, e.g. us-central1")
    p.add_argument("--service-account", help="service account the pipeline runs as")
    p.add_argument("--schedule", metavar="CRON",
                   help="create a schedule instead of one run, e.g. '0 3 * * 1' (Mondays 03:00 UTC)")
    p.add_argument("--display-name", help="name of the run (default: the pipeline's)")
    p.add_argument("--cache", choices=["on", "off"],
                   help="override the compiled caching setting for this run")
    p.set_defaults(func=cmd_submit)
