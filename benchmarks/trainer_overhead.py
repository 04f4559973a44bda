"""Trainer overhead: images/s of the pipeline's training loop against a plain model.fit.

Both train the same model (the GTSRB config's MobileNetV2-0.35 with its
augmentation and head, ``--size`` px, 5 flower classes), on the same
``create_dataset`` batches of the transformed flowers (built once, as in
``input_pipeline.py``), with the same batch size, strategy
(``strategy.create_strategy``), optimizer and compile settings:

* **trainer**: ``components.trainer.fit_phases`` — what ``run_fn`` runs — with
  its callbacks (EpochTimer, TensorBoard, ReduceLROnPlateau, EarlyStopping)
  and the resume state written after every epoch and phase;
* **plain**: ``model.compile`` + ``model.fit`` with no callbacks.

Each run is ``--epochs`` epochs of ``--steps`` steps (warm-up phase: backbone
frozen, ``--phase fine_tune`` for all layers trainable) with the same
``--val-batches`` validation batches; a fresh model per run, compile and
tracing included on both sides; rounds alternate the order.
Target: trainer images/s >= 0.95x plain.

    .venv/bin/python benchmarks/trainer_overhead.py [--rounds 3] [--epochs 4] [--steps 10] [--no-write]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import _perf_common as common  # noqa: E402

TITLE = "Trainer overhead: fit_phases vs plain model.fit"
INTRO = """
Training images/s of the Trainer's `fit_phases` (all its callbacks and checkpoints) vs plain
`model.compile` + `model.fit`, same model (MobileNetV2-0.35, GTSRB head and
augmentation), same `create_dataset` batches of transformed flowers, batch
32, default (CPU) strategy, same validation batches; fresh model per run,
rounds alternating the order; median of the per-round ratios.  "epochs 2+":
from the start of epoch 2 to the end of training, after every callback's
`on_train_end` (steady state); "whole run": compile + tracing + all epochs +
the Trainer's end-of-phase checkpoint.  Target: ratio >= 0.95.

    .venv/bin/python benchmarks/trainer_overhead.py
"""
HEADER = ("| date | command | machine | load 1/5 min | phase | trainer img/s epochs 2+ (whole run) | "
          "plain img/s epochs 2+ (whole run) | ratio epochs 2+ (per round) | ratio whole run (per round) "
          "| target >= 0.95 |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--phase", choices=["warmup", "fine_tune"], default="warmup")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "visiontune-bench"))
    parser.add_argument("--per-callback", action="store_true",
                        help="profile instead: epochs 2+ cost of each of the Trainer's callbacks alone")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    common.require(common.FLOWERS)
    common.require(common.MOBILENET_V2_035)

    import tf_keras
    from input_pipeline import transformed_flowers

    from visiontune import configs
    from visiontune.components import model as model_lib, strategy as strategy_lib, trainer

    transformed = transformed_flowers(args.size, args.work_dir)
    train_files = sorted(glob.glob(os.path.join(transformed, "train*.gz")))
    eval_files = sorted(glob.glob(os.path.join(transformed, "eval*.gz")))
    other = "fine_tune" if args.phase == "warmup" else "warmup"
    config = configs.load_config(os.path.join(common.REPO, "configs", "gtsrb.yaml"), [
        f"model.image_size={args.size}", f"model.weights={common.MOBILENET_V2_035}",
        f"training.batch_size={args.batch_size}", f"training.steps_per_epoch={args.steps}",
        f"training.{args.phase}.epochs={args.epochs}", f"training.{other}.epochs=0"])
    train_cfg = config.training
    phase = getattr(train_cfg, args.phase)
    num_classes = 5
    strategy, strategy_desc = strategy_lib.create_strategy(train_cfg.tpu)
    # As run_fn: one-hot labels when the config smooths them (the GTSRB config does).
    kw = dict(image_size=args.size, batch_size=args.batch_size, seed=train_cfg.seed, num_classes=num_classes,
              one_hot=train_cfg.label_smoothing > 0)
    train_ds = trainer.create_dataset(train_files, training=True, **kw)
    eval_ds = trainer.create_dataset(eval_files, training=False, **kw).take(args.val_batches)
    # Fill both caches first: neither side should pay for reading the files.
    for _ in train_ds:
        pass
    for _ in eval_ds:
        pass
    images = args.epochs * args.steps * args.batch_size

    def new_model():
        tf_keras.utils.set_random_seed(train_cfg.seed)
        with strategy.scope():
            return model_lib.create_model(config.model, num_classes, train_cfg.augmentation, train_cfg.seed)

    class Stamps(tf_keras.callbacks.Callback):
        """Wall clock at each epoch's start and at the end of training (after every other callback)."""

        def __init__(self):
            super().__init__()
            self.begins, self.end = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self.begins.append(time.perf_counter())

        def on_train_end(self, logs=None):
            self.end = time.perf_counter()

    def steady(stamps):
        """Images/s from the start of epoch 2 to the end of training (no tracing)."""
        return (args.epochs - 1) * args.steps * args.batch_size / (stamps.end - stamps.begins[1])

    def run_trainer(tmp):
        model = new_model()
        stamps = Stamps()
        state, logs = os.path.join(tmp, "state"), os.path.join(tmp, "logs")
        start = time.perf_counter()
        with strategy.scope():
            trainer.fit_phases(model, config, train_ds, eval_ds, state, logs, extra_callbacks=[stamps])
        wall = time.perf_counter() - start
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        return images / wall, steady(stamps)

    def run_plain(_tmp):
        model = new_model()
        stamps = Stamps()
        top_k = max(1, min(config.evaluation.top_k, num_classes))
        start = time.perf_counter()
        with strategy.scope():
            model_lib.apply_fine_tune_policy(model, phase.backbone, phase.layers,
                                             freeze_batch_norm=model.pretrained_backbone)
            trainer._compile(model, train_cfg, phase, top_k)
            model.fit(train_ds, validation_data=eval_ds, epochs=args.epochs,
                      steps_per_epoch=args.steps, verbose=2, callbacks=[stamps])
        return images / (time.perf_counter() - start), steady(stamps)

    if args.per_callback:
        return per_callback(args, config, train_cfg, phase, num_classes, strategy, new_model,
                            train_ds, eval_ds)

    runs = {"trainer": run_trainer, "plain": run_plain}
    rates = {k: [] for k in runs}  # whole run: compile, tracing, every epoch
    steadies = {k: [] for k in runs}  # epochs 2+
    ratios, steady_ratios, loads = [], [], []
    with tempfile.TemporaryDirectory(prefix="vt-trainer-") as tmp:
        for r in range(args.rounds):
            order = ["trainer", "plain"] if r % 2 == 0 else ["plain", "trainer"]
            for name in order:
                whole, steady_rate = runs[name](tmp)
                rates[name].append(whole)
                steadies[name].append(steady_rate)
            ratios.append(rates["trainer"][-1] / rates["plain"][-1])
            steady_ratios.append(steadies["trainer"][-1] / steadies["plain"][-1])
            loads.append(os.getloadavg()[0])
            print(f"round {r}: whole run trainer {rates['trainer'][-1]:.1f} / plain {rates['plain'][-1]:.1f} "
                  f"img/s ({ratios[-1]:.3f}); epochs 2+ trainer {steadies['trainer'][-1]:.1f} / plain "
                  f"{steadies['plain'][-1]:.1f} img/s ({steady_ratios[-1]:.3f}); load {loads[-1]:.1f}",
                  flush=True)
    ratio = common.median(ratios)
    steady_ratio = common.median(steady_ratios)
    report = {"rates": rates, "steady_rates": steadies, "ratios": ratios, "steady_ratios": steady_ratios,
              "ratio": ratio, "steady_ratio": steady_ratio, "strategy": strategy_desc,
              "phase": args.phase, "load": loads}
    print(json.dumps(report, indent=2))
    row = (f"| {common.today()} | `{common.command()}` | {common.machine()} | {common.load()} | "
           f"{args.phase} ({phase.backbone}), {args.epochs}x{args.steps} steps | "
           f"{common.median(steadies['trainer']):.1f} ({common.median(rates['trainer']):.1f}) | "
           f"{common.median(steadies['plain']):.1f} ({common.median(rates['plain']):.1f}) | "
           f"{steady_ratio:.3f} ({', '.join(f'{x:.2f}' for x in steady_ratios)}) | "
           f"{ratio:.3f} ({', '.join(f'{x:.2f}' for x in ratios)}) | "
           f"{'met' if steady_ratio >= 0.95 else 'missed'} (epochs 2+) |")
    print(row)
    if not args.no_write:
        common.append_rows(TITLE, INTRO, HEADER, [row])
    return 0


CALLBACK_TITLE = "Trainer overhead by callback"
CALLBACK_INTRO = """
Where the Trainer's steady-state overhead goes: one compiled (already traced)
model, `model.fit` of `--epochs` x `--steps` steps again and again with no
callback or with one of the Trainer's callbacks alone (or all of them, as
`trainer._callbacks` builds them), rounds alternating the order; slowdown =
median of per-round (time with / time without) - 1.

    .venv/bin/python benchmarks/trainer_overhead.py --per-callback
"""
CALLBACK_HEADER = ("| date | command | machine | load 1/5 min | none s/fit | EpochTimer | resume state | "
                   "TensorBoard | ReduceLROnPlateau+EarlyStopping | all (trainer._callbacks) |")


def per_callback(args, config, train_cfg, phase, num_classes, strategy, new_model, train_ds, eval_ds):

    from visiontune.components import model as model_lib, trainer, training_state

    train_ds = train_ds.repeat()  # as fit_phases with steps capped: epochs x steps never run out
    model = new_model()
    top_k = max(1, min(config.evaluation.top_k, num_classes))
    with strategy.scope():
        model_lib.apply_fine_tune_policy(model, phase.backbone, phase.layers,
                                         freeze_batch_norm=model.pretrained_backbone)
        trainer._compile(model, train_cfg, phase, top_k)
        model.fit(train_ds, validation_data=eval_ds, epochs=1, steps_per_epoch=args.steps, verbose=0)

    def variants(tmp):
        cbs = trainer._callbacks(train_cfg, os.path.join(tmp, "logs"))
        # The resume state, written after every epoch, as fit_phases adds it (after the others).
        def saver(name, watched):
            writer = training_state.StateWriter(os.path.join(tmp, name))
            return training_state.EpochStateSaver(writer, args.phase, [], watched, 0)

        by_type = {type(c).__name__: c for c in cbs}
        return {"none": [], "EpochTimer": [by_type["EpochTimer"]],
                "resume state": [saver("state", [])],
                "TensorBoard": [by_type["TensorBoard"]],
                "ReduceLROnPlateau+EarlyStopping": [c for n, c in by_type.items()
                                                    if n in ("ReduceLROnPlateau", "EarlyStopping")],
                "all": cbs + [saver("state-all", cbs)]}

    names = list(variants(tempfile.gettempdir()))
    times = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            with tempfile.TemporaryDirectory(prefix="vt-cb-") as tmp:
                cbs = variants(tmp)[name]
                start = time.perf_counter()
                with strategy.scope():
                    model.fit(train_ds, validation_data=eval_ds, epochs=args.epochs,
                              steps_per_epoch=args.steps, verbose=0, callbacks=cbs)
                times[name].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names)
              + f", load {loads[-1]:.1f}", flush=True)
    slow = {n: common.median([t / base for t, base in zip(times[n], times["none"])]) - 1 for n in names}
    print(json.dumps({"times": times, "slowdown": slow, "load": loads}, indent=2))
    row = (f"| {common.today()} | `{common.command()}` | {common.machine()} | {common.load()} | "
           f"{common.median(times['none']):.2f} | "
           + " | ".join(f"{slow[n] * 100:+.0f}%" for n in names[1:]) + " |")
    print(row)
    if not args.no_write:
        common.append_rows(CALLBACK_TITLE, CALLBACK_INTRO, CALLBACK_HEADER, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
