"""``visiontune prepare``, ``run`` and ``demo``: the pipeline on this machine."""

from __future__ import annotations

import contextlib
import json
from typing import Iterator

from visiontune.cli import options
from visiontune.errors import Interrupted, UserError, was_interrupted


def cmd_prepare(args) -> int:
    from visiontune import configs
    from visiontune.components import prepare

    config = options.load_config(args, options.PREPARE_SHORTCUTS)
    if not config.data.prepared_dir:
        raise UserError("no output folder: pass --output or set data.prepared_dir")
    options.check_output_folder("data.prepared_dir", config.data.prepared_dir)
    args.output_folders = [config.data.prepared_dir]
    result = prepare.prepare_dataset(config.data, progress=not args.quiet,
                                     segmentation=configs.segmentation_settings(config))
    print(result.summary())
    return 0


def cmd_run(args) -> int:
    config = options.load_config(args, options.RUN_SHORTCUTS, pipeline=True)
    check_run_folders(config)
    args.output_folders = [config.pipeline.output_dir, config.pipeline.serving_dir, config.data.prepared_dir]
    from visiontune.pipeline import local_runner

    with stopped_run(config.pipeline.output_dir):
        summary = local_runner.run(config, force_prepare=args.prepare)
    print_summary(summary, args.json)
    return 0 if summary.pushed or not args.fail_if_not_pushed else 3


@contextlib.contextmanager
def stopped_run(output_dir: str) -> Iterator[None]:
    """Ctrl-C in a pipeline run says what it left: ML Metadata keeps every finished component."""
    kept = Interrupted(f"the components that finished are kept in {output_dir}: the same command again "
                       "reuses them (cached)")
    try:
        yield
    except Interrupted:
        raise  # ingest said what it left
    except KeyboardInterrupt:
        raise kept from None
    except Exception as e:
        if was_interrupted(e):  # in Beam's wrapper (ImageExampleGen, Transform)
            raise kept from None
        raise


def check_run_folders(config) -> None:
    """The run's output folders can be made and written, and a prepared dataset has an eval split."""
    from visiontune.components import prepare

    data = config.data
    folders = [("pipeline.output_dir", config.pipeline.output_dir),
               ("pipeline.serving_dir", config.pipeline.serving_dir)]
    if data.example_gen == "tfrecords":
        folders.append(("data.prepared_dir", data.prepared_dir))
    for key, path in folders:
        if path:
            options.check_output_folder(key, path)
    # Without a source, the prepared dataset is used as it is (with one, an
    # eval_fraction of 0 is refused as the config loads).
    if data.example_gen == "tfrecords" and not data.source and prepare.is_prepared(data.prepared_dir):
        counts = prepare.load_result(data.prepared_dir).counts
        if not sum(counts.get("eval", {}).values()):
            raise UserError(f"data.prepared_dir: {data.prepared_dir} has no eval split (prepared with "
                            "data.eval_fraction 0?); the Trainer validates on it: prepare it again with "
                            "an eval_fraction above 0")


def cmd_demo(args) -> int:
    options.check_output_folder("--output-dir", args.output_dir)
    args.output_folders = [args.output_dir]
    from visiontune.pipeline import demo

    with stopped_run(args.output_dir):
        summary = demo.run_demo(args.output_dir, overrides=args.overrides)
    print_summary(summary, args.json)
    return 0


def print_summary(summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.message())


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="convert images (folders or CSV-labelled) to TFRecords")
    options.add_config_args(p, options.PREPARE_SHORTCUTS)
    p.add_argument("--quiet", "-q", action="store_true", help="no line saying how many images and workers")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("run", help="run the pipeline locally (LocalDagRunner, SQLite metadata)")
    options.add_config_args(p, options.RUN_SHORTCUTS)
    p.add_argument("--prepare", action="store_true",
                   help="re-run ingest even if prepared_dir already holds a dataset")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.add_argument("--fail-if-not-pushed", action="store_true",
                   help="exit with status 3 when the model was not blessed and pushed")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the whole pipeline on built-in data (no downloads)")
    p.add_argument("--output-dir", default="outputs/demo", help="where everything goes")
    options.add_set_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
