"""``visiontune compare``: the same data and settings on several backbones, one comparison report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from visiontune.cli import options

_DESCRIPTION = """\
Runs the config's pipeline once per backbone, with the same data and
hyperparameters, and writes compare.html (self-contained), compare.json and
compare.md (a Markdown table) into the output dir: weights used, input size,
total and trainable parameters, time per step and per epoch, total training
time, accuracy, macro-F1 and per-class F1 on evaluation.split, SavedModel size,
single-image prediction latency.

Every backbone is a run of the same pipeline with one metadata database
(OUTPUT_DIR/pipeline), so ExampleGen, StatisticsGen, SchemaGen and Transform
run once per input size and are reused (cached) by the other backbones; run
compare again into the same folder and finished backbones are not retrained.

A backbone is NAME[:KEY=VALUE]..., e.g.

  mobilenet_v2:alpha=0.35:weights=../shared/weights/mobilenet_v2_..._0.35_224_no_top.h5
  mobilenet:alpha=0.25:weights=../shared/weights/mobilenet_2_5_224_tf_no_top.h5
  efficientnet_b0                      (imagenet; none if unreachable)
  resnet50v2:weights=none:image_size=128:label=r50v2_128

KEY without a dot is a model setting (alpha, weights, image_size, contrast,
...); a dotted KEY is any setting (training.batch_size=16); label=NAME names
the row.  Unset alpha/weights: the config's own when NAME is the config's
backbone at its alpha, else alpha 1.0 and weights imagenet.  Weights that
cannot be used (imagenet with no network and no Keras cache file, an .h5 that
does not fit) fall back to none, and the table says so.

Blessed models are pushed to OUTPUT_DIR/serving/MODEL_NAME_LABEL/; each is
blessed on evaluation.min_accuracy alone (max_regression is lifted: the
baseline would be whichever backbone ran before; so no baseline is evaluated).
"""


def command_line(args) -> str:
    """The command as a user would retype it (for the report and BENCHMARKS.md)."""
    words = ["visiontune", "compare"]
    if args.config:
        words += ["--config", args.config]
    words += ["--backbones", ",".join(args.backbones)]
    for item in args.overrides:
        words += ["--set", item]
    if args.output_dir:
        words += ["--output-dir", args.output_dir]
    if args.latency_runs != 50:
        words += ["--latency-runs", str(args.latency_runs)]
    return " ".join(shlex.quote(w) for w in words)


def cmd_compare(args) -> int:
    # Refused before any backbone starts (each would fail the same way): what the pipeline needs.
    options.load_config(args, pipeline=True)
    if args.output_dir:
        options.check_output_folder("--output-dir", args.output_dir)
        args.output_folders = [args.output_dir]
    from visiontune.pipeline import compare

    specs = compare.parse_backbones(args.backbones)
    data = compare.run_comparison(args.config, specs, overrides=options.overrides(args),
                                  output_dir=args.output_dir, latency_runs=args.latency_runs,
                                  command=command_line(args))
    print(compare.render_markdown(data))
    for name in (compare.HTML_FILE, compare.JSON_FILE, compare.MARKDOWN_FILE):
        print(os.path.join(data["output_dir"], name))
    failed = [r["label"] for r in data["rows"] if r.get("error")]
    if failed:
        print(f"failed: {', '.join(failed)} (see the table)", file=sys.stderr)
        return 3
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="train the same config on several backbones and compare them in one report",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("--backbones", "-b", action="append", required=True, metavar="SPEC,SPEC,...",
                   help="backbones to compare, comma-separated (repeatable); see above")
    options.add_set_arg(p, "override a setting for every backbone, e.g. training.fine_tune.epochs=10")
    p.add_argument("--output-dir", "-o", default="",
                   help="where the runs and the report go (default: 'compare' beside the config's "
                        "pipeline.output_dir)")
    p.add_argument("--latency-runs", type=int, default=50,
                   help="single-image calls timed per backbone (0: skip the latency measurement)")
    p.set_defaults(func=cmd_compare)
