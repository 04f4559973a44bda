"""Planning a comparison: every backbone's config and the weights it will really use, before anything trains.

A backbone whose ``imagenet`` weights cannot be had (no network and no Keras
cache file), or whose ``.h5`` file does not fit it, is planned with
``weights: none`` and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visiontune.pipeline.compare_specs import BackboneSpec, CompareError

logger = logging.getLogger("visiontune.compare")

PIPELINE_DIR = "pipeline"  # pipeline.output_dir of every backbone's run (one metadata DB)
SERVING_DIR = "serving"
DOWNLOAD_TIMEOUT_S = 30
NO_IMAGENET = "no ImageNet weights reachable"


@dataclasses.dataclass
class Plan:
    """One backbone's run: its settings and the weights it will really use."""

    spec: BackboneSpec
    label: str
    config: Any  # configs.Config
    weights_requested: str
    weights_note: str  # what the table shows
    weights_fallback: bool


class _Unreachable(Exception):
    pass


@contextlib.contextmanager
def _watch_keras_downloads(timeout: float = DOWNLOAD_TIMEOUT_S):
    """Wraps Keras' ``get_file``: notes a cache hit, bounds and tags a failed download."""
    from tf_keras.src.utils import data_utils

    original = data_utils.get_file
    seen: Dict[str, Any] = {}

    def get_file(fname=None, origin=None, *args, **kwargs):
        home = kwargs.get("cache_dir") or os.environ.get("KERAS_HOME") or os.path.join(
            os.path.expanduser("~"), ".keras")
        subdir = kwargs.get("cache_subdir", "datasets")
        seen["cached"] = bool(fname) and any(
            os.path.exists(os.path.join(d, subdir, fname)) for d in (home, "/tmp/.keras"))
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            return original(fname, origin, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception on URL failures
            raise _Unreachable(f"{origin}: {e}") from e
        finally:
            socket.setdefaulttimeout(old)

    data_utils.get_file = get_file
    try:
        yield seen
    finally:
        data_utils.get_file = original


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's first line, cut to ``limit`` characters (for the table and the log)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def probe_weights(model_cfg) -> Tuple[str, str, bool]:
    """(weights to train with, note for the table, fell back?) for a model config.

    Builds the headless backbone once with the requested weights: ``imagenet``
    that Keras can neither find in its cache nor download, or an ``.h5`` file
    that does not fit the architecture, falls back to ``none``.  A file that
    does not exist is an error (a typo, not a missing download).
    """
    import tf_keras

    from visiontune.components import backbones

    weights = model_cfg.weights or "none"
    if weights.lower() == "none":
        return "none", "none", False
    size = backbones.input_size(model_cfg.backbone, model_cfg.image_size)
    if weights.lower() != "imagenet" and "://" not in weights and not os.path.isfile(weights):
        raise CompareError(f"{model_cfg.backbone}: weights {weights}: no such file")
    try:
        with _watch_keras_downloads() as seen:
            backbones.create_backbone(model_cfg.backbone, size, weights, model_cfg.alpha)
    except _Unreachable:
        return "none", f"none ({NO_IMAGENET})", True
    except Exception as e:  # noqa: BLE001 - Keras says why the weights do not fit
        what = "ImageNet weights do" if weights.lower() == "imagenet" else f"{os.path.basename(weights)} does"
        return "none", f"none ({what} not fit: {first_line(e)})", True
    finally:
        tf_keras.backend.clear_session()
    if weights.lower() == "imagenet":
        return "imagenet", "imagenet (Keras cache)" if seen.get("cached") else "imagenet (downloaded)", False
    return weights, f"file {os.path.basename(weights)}", False


def default_output_dir(config) -> str:
    """``compare`` beside the config's run folder (``outputs/gtsrb/run`` -> ``outputs/gtsrb/compare``)."""
    return os.path.join(os.path.dirname(os.path.abspath(config.pipeline.output_dir)), "compare")


def _label(spec: BackboneSpec, config) -> str:
    from visiontune.components import backbones

    if spec.label:
        return spec.label
    label = spec.name
    if backbones.get_backbone(spec.name).has_alpha:
        label += f"_{config.model.alpha:g}"
    if spec.given("model.image_size"):
        label += f"_{config.model.image_size}px"
    return label


def _load_for(spec: BackboneSpec, config_path: Optional[str], overrides: Sequence[str]):
    """The config with one backbone's settings; a refused setting names the backbone."""
    from visiontune import configs

    try:
        return configs.load_config(config_path, overrides)
    except configs.ConfigError as e:
        raise CompareError(f"{spec.name}: {e}") from None


def plan_comparison(config_path: Optional[str], specs: Sequence[BackboneSpec],
                    overrides: Sequence[str], output_dir: str, probe: bool = True) -> List[Plan]:
    """Every backbone's config, checked (names, sizes, weights) before anything trains.

    Settings a spec does not give: the config's ``model.alpha`` and
    ``model.weights`` when the spec names the config's own backbone at the
    config's alpha; otherwise alpha 1.0 and ``imagenet``.
    """
    from visiontune import configs
    from visiontune.components import backbones

    base = configs.load_config(config_path, overrides)
    if base.task != "classification":
        raise CompareError(f"compare supports classification configs; this one is task: {base.task}")
    plans: List[Plan] = []
    labels: Dict[str, int] = {}
    for spec in specs:
        try:
            backbone = backbones.get_backbone(spec.name)
        except ValueError as e:
            raise CompareError(str(e)) from None
        per = [f"model.backbone={spec.name}"] + [f"{k}={v}" for k, v in spec.settings]
        config = _load_for(spec, config_path, list(overrides) + per)
        inherit = spec.name == base.model.backbone and (
            not backbone.has_alpha or config.model.alpha == base.model.alpha)
        if not inherit:
            defaults = [f"{k}={v}" for k, v in (("model.alpha", "1.0"), ("model.weights", "imagenet"))
                        if not spec.given(k)]
            per = per[:1] + defaults + per[1:]
        config = _load_for(spec, config_path, list(overrides) + per)
        try:
            size = backbones.input_size(spec.name, config.model.image_size)
        except ValueError as e:
            raise CompareError(str(e)) from None
        label = _label(spec, config)
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:
            label = f"{label}_{labels[label]}"
        requested = config.model.weights
        weights, note, fallback = probe_weights(config.model) if probe else (requested, requested, False)
        model_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{base.pipeline.model_name}_{label}")
        config = _load_for(spec, config_path, list(overrides) + per + [
            f"model.weights={weights}",
            f"model.image_size={size}",
            f"pipeline.output_dir={os.path.join(output_dir, PIPELINE_DIR)}",
            f"pipeline.serving_dir={os.path.join(output_dir, SERVING_DIR)}",
            f"pipeline.model_name={model_name}",
            # Blessed on the accuracy floor alone: the baseline is whichever backbone ran before.
            "evaluation.max_regression=1.0",
        ])
        plans.append(Plan(spec=spec, label=label, config=config, weights_requested=requested,
                          weights_note=note, weights_fallback=fallback))
        logger.info("%s: %s px, weights %s", label, size, note)
    return plans

