"""``visiontune report``: the HTML report of a finished (or stopped) run."""

from __future__ import annotations

import argparse

from visiontune.cli import options


def cmd_report(args) -> int:
    if args.output:
        options.check_output_folder("--output", args.output)
        args.output_folders = [args.output]
    from visiontune.pipeline import report

    index = report.write_report(args.run, report_dir=args.output or "",
                                max_eval_examples=args.max_eval_examples)
    print(index)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write a run's HTML report (curves, per-class table, confusion matrix, mistakes)",
        description="Builds OUTPUT_DIR/report/index.html (self-contained, images embedded) and the "
                    "PNGs beside it from the run's own artifacts: ML Metadata, TFMA's results, the "
                    "Trainer's history. `visiontune run` writes it at the end of every run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_OUTPUT_DIR",
                   help="the run's output dir (pipeline.output_dir), its metadata.sqlite, "
                        "or the run's YAML config")
    p.add_argument("--output", "-o", default="", help="report folder (default: OUTPUT_DIR/report)")
    p.add_argument("--max-eval-examples", type=int, default=1000,
                   help="evaluation examples searched for misclassified images (0: all)")
    p.set_defaults(func=cmd_report)
