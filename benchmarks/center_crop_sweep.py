"""Inference centre crop: one trained model's accuracy at several ``model.center_crop_fraction``.

The crop acts at inference only, so a trained model can be scored at any
fraction without training again: the classifier is rebuilt from the config
with each fraction, the trained weights are loaded into it, and it is run
over the run's transformed split(s) (the pixels the Evaluator and
``serving_default`` feed it).  Appends one row per split to BENCHMARKS.md.

    .venv/bin/python benchmarks/center_crop_sweep.py [--set ...] [--model-dir DIR] [--splits test,eval]

``--model-dir`` defaults to the newest model of the config's last run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402
import _transformed  # noqa: E402

MARKER = "<!-- center_crop_sweep rows -->"


def sweep(config, model_dir: str, split: str, fractions):
    """Accuracy at each fraction over ``split``'s transformed examples; and the example count."""
    import numpy as np

    from visiontune.components import model as model_lib, prepare, trainer

    classes = prepare.read_classes(config.data.prepared_dir)
    size = config.model.image_size
    files = _transformed.split_files(config.pipeline.output_dir, split,
                                     tempfile.mkdtemp(prefix="center_crop_sweep_"))
    ds = trainer.create_dataset(files, training=False, image_size=size, batch_size=64)
    models = []
    for fraction in fractions:
        model_cfg = dataclasses.replace(config.model, center_crop_fraction=fraction)
        model = model_lib.create_model(model_cfg, len(classes), config.training.augmentation,
                                       config.training.seed)
        model.load_weights(os.path.join(model_dir, "variables", "variables")).expect_partial()
        models.append(model)
    hits, count = np.zeros(len(fractions)), 0
    for pixels, labels in ds:
        count += len(labels)
        for k, model in enumerate(models):
            hits[k] += int(np.sum(model(pixels, training=False).numpy().argmax(-1) == labels.numpy()))
    return hits / max(count, 1), count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(common.REPO, "configs", "gtsrb.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--model-dir", default="", help="a Trainer model (Format-Serving) folder")
    parser.add_argument("--fractions", default="1,0.95,0.9,0.875,0.85,0.8,0.75")
    parser.add_argument("--splits", default="test,eval")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from visiontune import configs
    from visiontune.pipeline import local_runner, results

    config = configs.load_config(args.config, args.overrides)
    model_dir = args.model_dir or results.summarize_run(local_runner.metadata_path(config)).model_dir
    fractions = [float(f) for f in args.fractions.split(",")]
    command = " ".join(["benchmarks/center_crop_sweep.py"] + [f"--set {o}" for o in args.overrides]
                       + ([f"--model-dir {args.model_dir}"] if args.model_dir else []))
    for split in args.splits.split(","):
        accuracy, count = sweep(config, model_dir, split, fractions)
        best = max(range(len(fractions)), key=lambda k: accuracy[k])
        cells = " / ".join((f"**{a:.4f}**" if k == best else f"{a:.4f}") for k, a in enumerate(accuracy))
        row = (f"| {common.today()} | `{command}` | {args.note or '-'} | {common.machine()} | "
               f"{split} ({count}) | {' / '.join(map(str, fractions))} | {cells} |")
        print(row)
        if not args.no_write:
            common.insert_row(MARKER, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
