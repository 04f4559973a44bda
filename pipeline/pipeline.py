"""The visiontune TFX pipeline, independent of the orchestrator that runs it.

ImportExampleGen -> StatisticsGen -> SchemaGen -> ExampleValidator -> Transform
-> Trainer -> Resolver (latest blessed model) -> Evaluator -> Pusher.

Module code is referenced by dotted path (``visiontune.components.trainer.run_fn``)
rather than uploaded as a module file, so the same definition runs locally and
inside a container image that has this package installed.  Because TFX cannot
fingerprint code it does not upload, a hash of the module sources goes into
``custom_config``: editing the Trainer invalidates the cached Trainer output.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional, Sequence

from tfx import v1 as tfx
from tfx.proto import example_gen_pb2

from visiontune import configs, features
from visiontune.components import backbones, evaluation, masks, pusher

COMPONENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "components")
TRANSFORM_FN = "visiontune.components.transform.preprocessing_fn"
TRAINER_FN = "visiontune.components.trainer.run_fn"
SPLITS_TRAINING = ("train", "eval")


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
    classes: Sequence[str],
    *,
    pipeline_root: str,
    has_test_split: bool = False,
    metadata_connection_config=None,
    beam_pipeline_args: Optional[List[str]] = None,
    trainer_state_root: Optional[str] = None,
    component_beam_args: Optional[List[str]] = None,
    cloud_training: Optional[Dict[str, Any]] = None,
    endpoint_push: Optional[Dict[str, Any]] = None,
) -> tfx.dsl.Pipeline:
    """Builds the pipeline over the prepared TFRecords in ``config.data.prepared_dir``.

    The defaults build the local pipeline.  For Google Cloud (``pipeline.vertex_runner``):

    * ``component_beam_args``: Beam options (DataflowRunner) given to the Beam-powered
      components only (ExampleGen, StatisticsGen, Transform, Evaluator), not to the
      pipeline, so that no other step's container receives them;
    * ``cloud_training``: extra Trainer ``custom_config`` entries
      (``ENABLE_VERTEX_KEY``, ``VERTEX_REGION_KEY``, ``TRAINING_ARGS_KEY``); the
      Trainer then runs as a Vertex AI Training job through TFX's Google Cloud extension;
    * ``endpoint_push``: ``custom_config`` of TFX's Google Cloud Pusher; a second
      Pusher (``endpoint_pusher``) deploys the blessed model to a Vertex AI Endpoint.
    """
    classes = list(classes)
    image_size = backbones.input_size(config.model.backbone, config.model.image_size)
    if config.evaluation.split == "test" and not has_test_split:
        raise configs.ConfigError("evaluation.split is 'test' but no test set was prepared "
                                  "(set data.test_source)")

    example_gen = tfx.components.ImportExampleGen(
        input_base=config.data.prepared_dir,
        input_config=example_gen_pb2.Input(splits=[
            example_gen_pb2.Input.Split(name=s, pattern=f"{s}/*") for s in example_splits(has_test_split)]))
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"],
                                          infer_feature_shape=True)
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"])

    segmentation = configs.segmentation_settings(config)
    transform_config = {"image_size": image_size, "classes": classes,
                        "code_version": code_fingerprint("transform")}
    if segmentation is not None:
        transform_config.update(task="segmentation", mask_lookup=masks.lookup_table(
            segmentation.class_values, features.VOID_ID))
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        preprocessing_fn=TRANSFORM_FN,
        custom_config=transform_config)

    config_dict = configs.to_dict(config)
    # The deployment settings are not the Trainer's business (and leaving them out
    # keeps the Trainer's cache key what it was before they existed).
    config_dict.pop("vertex", None)
    trainer_config = {
        "config": config_dict,
        "classes": classes,
        "state_root": trainer_state_root or os.path.join(pipeline_root, "trainer_state"),
        "code_version": code_fingerprint("transform", "trainer", "model", "backbones",
                                         "signatures", "strategy", "segmentation_model"),
    }
    trainer_class = tfx.components.Trainer
    if cloud_training:
        trainer_config.update(cloud_training)
        trainer_class = tfx.extensions.google_cloud_ai_platform.Trainer
    trainer = trainer_class(
        run_fn=TRAINER_FN,
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        schema=schema_gen.outputs["schema"],
        train_args=tfx.proto.TrainArgs(splits=["train"]),
        eval_args=tfx.proto.EvalArgs(splits=["eval"]),
        custom_config=trainer_config)

    model_resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")

    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=model_resolver.outputs["model"],
        eval_config=(evaluation.create_segmentation_eval_config(config.evaluation, len(classes))
                     if segmentation is not None
                     else evaluation.create_eval_config(config.evaluation, len(classes))),
        example_splits=[config.evaluation.split])

    pusher_component = pusher.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=os.path.join(config.pipeline.serving_dir, config.pipeline.model_name))))
    components = [example_gen, statistics_gen, schema_gen, example_validator, transform,
                  trainer, model_resolver, evaluator, pusher_component]

    if endpoint_push:
        components.append(tfx.extensions.google_cloud_ai_platform.Pusher(
            model=trainer.outputs["model"],
            model_blessing=evaluator.outputs["blessing"],
            custom_config=endpoint_push).with_id("endpoint_pusher"))

    if component_beam_args:
        for component in (example_gen, statistics_gen, transform, evaluator):
            component.with_beam_pipeline_args(list(component_beam_args))

    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline.name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=config.pipeline.enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=beam_pipeline_args or [],
    )
