"""Warm-up of a loaded version before it is AVAILABLE: the model's own requests, as TF Serving replays them.

TF Serving reads ``assets.extra/tf_serving_warmup_requests`` (a TFRecord file
of ``tensorflow.serving.PredictionLog``; ``components/warmup_requests.py``
writes ours from eval images) when it loads a version, runs every request
once, and only then serves the version; a request that fails fails the load.
:func:`warm_up` does the same for the built-in server, in the loader thread
(``ModelManager._load``), so the version joins the served set, and reports
AVAILABLE, only once its requests ran:

* ``predict_log``, ``classify_log``, ``regress_log`` and ``multi_inference_log``
  requests run on the signature they name (the model name in them is ignored,
  as TF Serving ignores it); other log types fail the load, as in TF Serving;
* at most 1,000 records (TF Serving's limit), each run once (TF Serving's
  default ``num_request_iterations``);
* a file that is not TFRecord, a record that is not a ``PredictionLog``, or a
  request that fails: the version fails to load (``END``, with the error),
  which is what real TF Serving would do with the same export.

Warm-up requests run straight on the signature, not through
:meth:`ModelManager.predict`: ``--max-instances`` and ``--max-pixels`` are
limits on clients, not on the model's own requests.

A model without the file (exports older than the file, other SavedModels)
gets the previous warm-up: one synthetic 8x8 image through
``serving_default`` when it takes ``image_bytes``; a failure there is only
logged (the request is our guess, not the model's).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Mapping, Sequence

from visiontune import features
from visiontune.serving import classify, tensors
from visiontune.serving.model_server import Servable, ServingError, Signature, invalid, tf_error_message

log = logging.getLogger("visiontune.serving")

MAX_RECORDS = 1000   # TF Serving's WarmupConsts::kMaxNumRecords


def requests_path(saved_model_dir: str) -> str:
    return os.path.join(saved_model_dir, features.METADATA_DIR, features.WARMUP_REQUESTS_FILE)


class _Direct:
    """What :mod:`classify` needs of a ``ModelManager`` (``predict``), running straight on the signature."""

    @staticmethod
    def predict(servable: Servable, signature: Signature, inputs: Mapping[str, object],
                output_filter: Sequence[str] = ()) -> Dict[str, object]:
        import tensorflow as tf

        if set(inputs) != set(signature.inputs):
            raise invalid(f"inputs {sorted(inputs)} do not match signature {signature.name!r}'s "
                          f"{sorted(signature.inputs)}")
        unknown = [o for o in output_filter if o not in signature.outputs]
        if unknown:
            raise invalid(f"output tensor alias not found in signature: {', '.join(unknown)}")
        try:
            result = signature.function(**{k: tf.convert_to_tensor(v, dtype=signature.inputs[k].dtype)
                                           for k, v in inputs.items()})
        except tf.errors.OpError as e:
            raise invalid(tf_error_message(e)) from None
        return {k: v.numpy() for k, v in result.items() if not output_filter or k in output_filter}


def _predict(servable: Servable, request) -> None:
    signature = servable.signature(request.model_spec.signature_name)
    inputs = {}
    for name, proto in request.inputs.items():
        if name not in signature.inputs:
            raise invalid(f"input {name!r} is not in signature {signature.name!r}'s {sorted(signature.inputs)}")
        inputs[name] = tensors.from_tensor_proto(proto, signature.inputs[name], name)
    _Direct.predict(servable, signature, inputs, list(request.output_filter))


def run_request(servable: Servable, prediction_log) -> str:
    """Runs one ``PredictionLog``'s request on ``servable``; its log type. Raises ServingError if it fails."""
    kind = prediction_log.WhichOneof("log_type")
    if kind == "predict_log":
        _predict(servable, prediction_log.predict_log.request)
    elif kind in ("classify_log", "regress_log"):
        request = getattr(prediction_log, kind).request
        run = classify.classify if kind == "classify_log" else classify.regress
        run(_Direct, servable, request.model_spec.signature_name, classify.serialized_examples(request.input))
    elif kind == "multi_inference_log":
        classify.multi_inference_response(_Direct, servable, prediction_log.multi_inference_log.request)
    else:
        raise ServingError("UNIMPLEMENTED", f"Unsupported log_type for warmup: {kind}")
    return kind


def replay(servable: Servable, path: str) -> int:
    """Runs every request of the warm-up file at ``path``; how many. Raises ValueError naming the failure."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    count = 0
    try:
        for record in tf.data.TFRecordDataset(path):
            if count >= MAX_RECORDS:
                raise ValueError(f"{path}: Number of warmup records exceeds the maximum ({MAX_RECORDS})")
            prediction_log = prediction_log_pb2.PredictionLog()
            try:
                prediction_log.ParseFromString(record.numpy())
            except Exception:  # protobuf's DecodeError
                raise ValueError(f"{path}: record {count + 1} is not a tensorflow.serving.PredictionLog") from None
            try:
                run_request(servable, prediction_log)
            except ServingError as e:
                raise ValueError(f"{path}: warm-up request {count + 1} "
                                 f"({prediction_log.WhichOneof('log_type')}) failed: {e.code}: {e.message}") from None
            count += 1
    except tf.errors.DataLossError as e:
        raise ValueError(f"{path}: {tf_error_message(e)}. Please verify your warmup data is in TFRecord "
                         "format.") from None
    return count


def _synthetic(servable: Servable) -> None:
    """The fallback: one tiny image through ``serving_default`` (so the first client does not pay for
    graph initialisation); our guess at a request, so a failure is logged, not a load failure."""
    import tensorflow as tf

    sig = servable.signatures.get(features.SERVING_DEFAULT)
    if sig is None or list(sig.inputs) != [features.IMAGE_BYTES_INPUT]:
        return
    try:
        png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8))
        sig.function(image_bytes=tf.reshape(png, [1]))
    except Exception as e:  # a warm-up failure is not a load failure
        log.warning("version %d: warm-up failed: %s", servable.version, e)


def warm_up(servable: Servable) -> None:
    """The model's warm-up requests when it has them (failures fail the load), else the synthetic one."""
    path = requests_path(servable.path)
    if not os.path.exists(path):
        _synthetic(servable)
        return
    count = replay(servable, path)
    log.info("version %d: replayed %d warm-up requests from %s", servable.version, count, path)
