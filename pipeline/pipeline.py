"""The visiontune TFX pipeline, independent of the orchestrator that runs it.

ImageExampleGen (or ImportExampleGen) -> StatisticsGen -> SchemaGen -> ExampleValidator -> Transform
-> Trainer -> Resolver (latest blessed model) -> Evaluator -> Pusher.

Without a regression gate (``evaluation.max_regression`` 1, as ``visiontune
compare`` runs) there is no Resolver and the Evaluator scores the new model
alone: the baseline's evaluation would decide nothing, and leaving it out
halves the Evaluator's time and lets a re-run reuse the Evaluator (cached).

Module code is referenced by dotted path (``visiontune.components.trainer.run_fn``)
rather than uploaded as a module file, so the same definition runs locally and
inside a container image that has this package installed.  Because TFX cannot
fingerprint code it does not upload, a hash of the module sources goes into
``custom_config``: editing the Trainer invalidates the cached Trainer output.

With images in (``data.example_gen: images``) the class list is an output of
ImageExampleGen, and Transform, the Trainer and the Evaluator read it at run
time (``components.class_aware``); with TFRecords in it is given here.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional, Sequence

from tfx import v1 as tfx
from tfx.proto import example_gen_pb2

from visiontune import configs, features
from visiontune.components import backbones, class_aware, evaluation, ingest_plan, masks, pusher
from visiontune.components.image_example_gen import ImageExampleGen

COMPONENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "components")
TRANSFORM_FN = "visiontune.components.transform.preprocessing_fn"
TRAINER_FN = "visiontune.components.trainer.run_fn"
SPLITS_TRAINING = ("train", "eval")
# Settings only the Evaluator reads; they stay out of the Trainer's cache key.
BLESSING_SETTINGS = ("min_accuracy", "max_regression")
RESOLVER_ID = "latest_blessed_model_resolver"  # the baseline: only with a regression gate


def code_fingerprint(*module_names: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(module_names):
        with open(os.path.join(COMPONENTS_DIR, f"{name}.py"), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def example_splits(has_test: bool) -> List[str]:
    return list(SPLITS_TRAINING) + (["test"] if has_test else [])


def create_pipeline(
    config: configs.Config,
    classes: Optional[Sequence[str]] = None,
    *,
    pipeline_root: str,
    has_test_split: bool = False,
    metadata_connection_config=None,
    beam_pipeline_args: Optional[List[str]] = None,
    trainer_state_root: Optional[str] = None,
    component_beam_args: Optional[List[str]] = None,
    ingest_beam_args: Optional[List[str]] = None,
    cloud_training: Optional[Dict[str, Any]] = None,
    endpoint_push: Optional[Dict[str, Any]] = None,
) -> tfx.dsl.Pipeline:
    """Builds the pipeline over ``config.data.source``'s images, or the TFRecords in ``data.prepared_dir``.

    ``classes``: the class order of TFRecords (``data.example_gen: tfrecords``);
    with images, ImageExampleGen finds them at run time.  ``has_test_split``:
    whether the TFRecords have a test split (images: whether ``data.test_source`` is set).

    The defaults build the local pipeline.  For Google Cloud (``pipeline.vertex_runner``):

    * ``component_beam_args``: Beam options (DataflowRunner) given to the Beam-powered
      components only (ExampleGen, StatisticsGen, Transform, Evaluator), not to the
      pipeline, so that no other step's container receives them;
    * ``ingest_beam_args``: Beam options of ImageExampleGen alone, after the others
      (locally: its own worker count);
    * ``cloud_training``: extra Trainer ``custom_config`` entries
      (``ENABLE_VERTEX_KEY``, ``VERTEX_REGION_KEY``, ``TRAINING_ARGS_KEY``); the
      Trainer then runs as a Vertex AI Training job through TFX's Google Cloud extension;
    * ``endpoint_push``: ``custom_config`` of TFX's Google Cloud Pusher; a second
      Pusher (``endpoint_pusher``) deploys the blessed model to a Vertex AI Endpoint.
    """
    images = config.data.example_gen == "images"
    image_size = backbones.input_size(config.model.backbone, config.model.image_size)
    segmentation = configs.segmentation_settings(config)
    if images:
        has_test_split = bool(config.data.test_source)
    if config.evaluation.split == "test" and not has_test_split:
        raise configs.ConfigError("evaluation.split is 'test' but no test set was prepared "
                                  "(set data.test_source)")

    class_list = None  # a channel: the classes ingest found, read at run time
    if images:
        config_dict = configs.to_dict(config)
        example_gen = ImageExampleGen(
            data=config_dict["data"],
            segmentation=config_dict["segmentation"] if segmentation is not None else None)
        class_list = example_gen.outputs["classes"]
        classes = None
    else:
        if classes is None:
            raise ValueError("create_pipeline: classes are required with data.example_gen 'tfrecords'")
        classes = list(classes)
        example_gen = tfx.components.ImportExampleGen(
            input_base=config.data.prepared_dir,
            input_config=example_gen_pb2.Input(splits=[
                example_gen_pb2.Input.Split(name=s, pattern=f"{s}/*") for s in example_splits(has_test_split)]))
    if segmentation is not None:  # the classes come from the settings, whatever the input
        class_list, classes = None, ingest_plan.segmentation_classes(config.data, segmentation)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"],
                                          infer_feature_shape=True)
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"])

    transform_config = {"image_size": image_size, "code_version": code_fingerprint("transform")}
    if classes is not None:
        transform_config["classes"] = classes
    if segmentation is not None:
        transform_config.update(task="segmentation", mask_lookup=masks.lookup_table(
            segmentation.class_values, features.VOID_ID))
    transform = class_aware.Transform(
        classes=class_list,
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        preprocessing_fn=TRANSFORM_FN,
        custom_config=transform_config,
        # Only what the Trainer reads (the Evaluator reads ExampleGen's examples),
        # and no statistics of the transformed data: nothing reads them.
        splits_config=tfx.proto.SplitsConfig(analyze=["train"], transform=list(SPLITS_TRAINING)),
        disable_statistics=True)

    config_dict = configs.to_dict(config)
    # The deployment settings are not the Trainer's business (and leaving them out
    # keeps the Trainer's cache key what it was before they existed).
    config_dict.pop("vertex", None)
    # Nor are the blessing thresholds (the Evaluator's): raising min_accuracy must
    # re-judge the trained model, not train it again.
    for key in BLESSING_SETTINGS:
        config_dict["evaluation"].pop(key, None)
    trainer_config = {
        "config": config_dict,
        "state_root": trainer_state_root or os.path.join(pipeline_root, "trainer_state"),
        "code_version": code_fingerprint("transform", "trainer", "training_state", "model", "backbones",
                                         "signatures", "strategy", "segmentation_model", "tflite_export",
                                         "warmup_requests"),
    }
    if classes is not None:
        trainer_config["classes"] = classes
    trainer_class = class_aware.Trainer
    if cloud_training:
        trainer_config.update(cloud_training)
        from visiontune.components import class_aware_vertex  # heavy: Google Cloud libraries
        trainer_class = class_aware_vertex.Trainer
    trainer = trainer_class(
        classes=class_list,
        run_fn=TRAINER_FN,
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        schema=schema_gen.outputs["schema"],
        train_args=tfx.proto.TrainArgs(splits=["train"]),
        eval_args=tfx.proto.EvalArgs(splits=["eval"]),
        custom_config=trainer_config)

    model_resolver = None
    if evaluation.has_regression_gate(config.evaluation):
        model_resolver = tfx.dsl.Resolver(
            strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
            model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
            model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
        ).with_id(RESOLVER_ID)

    evaluator = class_aware.Evaluator(
        classes=class_list,
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=model_resolver.outputs["model"] if model_resolver else None,
        eval_config=(evaluation.create_segmentation_eval_config(config.evaluation, len(classes))
                     if segmentation is not None
                     else evaluation.create_eval_config(
                         config.evaluation, None if classes is None else len(classes))),
        example_splits=[config.evaluation.split])

    pusher_component = pusher.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=os.path.join(config.pipeline.serving_dir, config.pipeline.model_name))))
    components = [example_gen, statistics_gen, schema_gen, example_validator, transform,
                  trainer] + ([model_resolver] if model_resolver else []) + [evaluator, pusher_component]

    if endpoint_push:
        components.append(tfx.extensions.google_cloud_ai_platform.Pusher(
            model=trainer.outputs["model"],
            model_blessing=evaluator.outputs["blessing"],
            custom_config=endpoint_push).with_id("endpoint_pusher"))

    if component_beam_args:
        for component in (example_gen, statistics_gen, transform, evaluator):
            component.with_beam_pipeline_args(list(component_beam_args))
    if ingest_beam_args and images:
        example_gen.with_beam_pipeline_args(list(ingest_beam_args))  # appended: these win

    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline.name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=config.pipeline.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=beam_pipeline_args or [],
    )
