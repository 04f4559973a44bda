"""``visiontune demo``: the whole pipeline on data that ships with the install.

No download and no ``../shared``: scikit-learn bundles 1,797 real handwritten
digits (8x8, 10 classes).  They are written out as a class-per-folder tree of
PNGs, exactly what a user would point ``visiontune prepare`` at, and the
pipeline runs end to end on them, MobileNetV2-0.35 trained from scratch
(``weights: none``: no ImageNet weights can be had offline) at 32 px.
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

from visiontune import configs

# The demo's settings; ``visiontune demo --set key=value`` overrides them.
DEMO_SETTINGS = {
    "pipeline": {"name": "visiontune-demo", "model_name": "digits", "beam_workers": 1},
    "data": {"eval_fraction": 0.25, "num_shards": 2},
    "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": "none", "image_size": 32,
              "head": {"dense_units": [64], "dropout": 0.2}},
    "training": {
        "batch_size": 32,
        "warmup": {"epochs": 0},
        # From scratch, every layer (BatchNorm too) trains from the first step.
        "fine_tune": {"epochs": 12, "learning_rate": 0.003, "backbone": "all"},
        "augmentation": {"translation": 0.08},
        "early_stopping_patience": 0,
        "reduce_lr_patience": 2,
    },
    "evaluation": {"min_accuracy": 0.5, "top_k": 3},
}
DIGIT_SIZE = 32


def write_digit_images(folder: str) -> int:
    """Writes scikit-learn's digits as ``folder/<digit>/<index>.png``; returns the count."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        class_dir = os.path.join(folder, str(label))
        os.makedirs(class_dir, exist_ok=True)
        # Values are 0-16; white digits on black, upscaled smoothly as a scan would be.
        image = Image.fromarray(np.uint8(pixels * (255 / 16))).resize(
            (DIGIT_SIZE, DIGIT_SIZE), Image.BICUBIC).convert("RGB")
        image.save(os.path.join(class_dir, f"{i:04d}.png"))
    return len(digits.images)


def demo_config(output_dir: str, overrides: Sequence[str] = ()) -> configs.Config:
    output_dir = os.path.abspath(output_dir)
    raw = copy.deepcopy(DEMO_SETTINGS)
    configs.deep_merge(raw, {
        "data": {"source": os.path.join(output_dir, "images"),
                 "prepared_dir": os.path.join(output_dir, "prepared")},
        "pipeline": {"output_dir": os.path.join(output_dir, "run"),
                     "serving_dir": os.path.join(output_dir, "serving")},
    })
    configs.deep_merge(raw, configs.apply_overrides({}, overrides))
    config = configs.from_dict(configs.Config, raw, where="demo")
    configs.validate(config)
    return config


def run_demo(output_dir: str, overrides: Sequence[str] = ()):
    from visiontune.pipeline import local_runner

    config = demo_config(output_dir, overrides)
    if not os.path.isdir(config.data.source):
        count = write_digit_images(config.data.source)
        print(f"wrote {count} digit images to {config.data.source}")
    return local_runner.run(config)
