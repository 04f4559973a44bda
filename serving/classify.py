"""TF Serving's Classify, Regress and MultiInference over the built-in server.

What a client sends is TF Serving's ``Input``: serialized ``tf.Example``s
(``example_list``), or examples plus one ``context`` example whose features
every example gets (``example_list_with_context``; serialized as context then
example, as TF Serving concatenates them, so an example's own feature wins).
Over REST the examples are JSON (``tensorflow_serving/util/json_tensor.cc``)::

    POST /v1/models/M[/versions/V]:classify
    {"signature_name": "classification", "context": {...},
     "examples": [{"image": {"b64": "..."}}, ...]}
    -> {"results": [[["class", score], ...], ...]}      (:regress -> {"results": [value, ...]})

A feature's value is a value or a list of them: strings and ``{"b64": ...}``
are a ``bytes_list``, integers an ``int64_list``, other numbers a ``float_list``.

The signature must have the method TF Serving requires (``tensorflow/serving/classify``
or ``.../regress``), with TF Serving's input and output keys; a missing signature name
means ``serving_default``, and the errors are TF Serving's, with a hint naming the
model's classification signature (``visiontune`` models: ``classification``;
``serving_default`` stays the image-bytes predict signature).  Requests run through
:meth:`ModelManager.predict`, so ``--max-instances``, ``--max-pixels`` and the
model-call batching apply as for ``:predict``.

MultiInference runs each task's signature on the same examples (TF Serving runs
them in one session call; the answers are the same).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from visiontune import features
from visiontune.serving import tensors
from visiontune.serving.model_server import ModelManager, Servable, ServingError, Signature, invalid

# (class name, score) per class, per example: a ClassificationResult's content.
Classifications = List[List[Tuple[bytes, float]]]


# ---------------------------------------------------------------- inputs

def serialized_examples(input_proto) -> List[bytes]:
    """A ``tensorflow.serving.Input`` -> serialized ``tf.Example``s (context first, as TF Serving does)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples]
    if kind == "example_list_with_context":
        with_context = input_proto.example_list_with_context
        context = with_context.context.SerializeToString()
        return [context + e.SerializeToString() for e in with_context.examples]
    return []


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}.get(
        type(value), "number")


def _add_value(feature, name: str, value) -> None:
    if isinstance(value, dict):
        kind, add = "bytes_list", tensors.decode_b64(value)
    elif isinstance(value, str):
        try:
            kind, add = "bytes_list", value.encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate ("\ud800") that JSON let through
            raise invalid(f"Feature: {name} has a string that is not valid Unicode") from None
    elif isinstance(value, bool) or value is None or isinstance(value, list):
        raise invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
    elif isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise invalid(f"Feature: {name} has element {value}, outside int64")
        kind, add = "int64_list", value
    else:
        kind, add = "float_list", float(value)
    current = feature.WhichOneof("kind")
    if current is not None and current != kind:
        raise invalid(f"Feature: {name} mixes {current} and {kind} values")
    getattr(feature, kind).value.append(add)


def _example(value, where: str):
    """One JSON object -> ``tf.Example`` (TF Serving's MakeExampleFromJsonObject)."""
    from tensorflow.core.example import example_pb2

    if not isinstance(value, dict):
        raise invalid(f"{where}: Example must be JSON object but got JSON {_json_type(value)}")
    example = example_pb2.Example()
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_value(feature, name, item)
    return example


def examples_from_json(request: Mapping, method: str) -> List[bytes]:
    """A REST ``:classify``/``:regress`` body -> serialized examples."""
    if "examples" not in request:
        raise invalid(f"When method is {method}, key 'examples' is expected and was not found")
    examples = request["examples"]
    if not isinstance(examples, list):
        raise invalid("Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid("'examples' value is an empty array")
    context = b""
    if "context" in request:
        context = _example(request["context"], "context").SerializeToString()
    return [context + _example(e, f"examples[{i}]").SerializeToString() for i, e in enumerate(examples)]


# ---------------------------------------------------------------- running signatures

def _named_signature(servable: Servable, signature_name: Optional[str], method: str, kind: str) -> Signature:
    """The signature a Classify/Regress request names, checked as TF Serving checks it."""
    name = signature_name or features.SERVING_DEFAULT
    defs = servable.signature_defs
    if name not in defs or name not in servable.signatures:
        raise invalid(f"No signature was found with the name: {name}")
    if defs[name].method_name != method:
        others = sorted(n for n, d in defs.items() if d.method_name == method)
        hint = (f"this model's {kind} signature is {others[0]!r}: name it as signature_name" if others
                else f"this model has no {kind} signature")
        raise invalid(f"Expected {kind} signature method_name to be {method}. Was: {defs[name].method_name} "
                      f"({hint})")
    signature = servable.signatures[name]
    if list(signature.inputs) != [features.CLASSIFY_INPUTS]:
        raise ServingError("FAILED_PRECONDITION", f"No {kind} inputs found in SignatureDef {name!r}: it must "
                                                  f"have one input named {features.CLASSIFY_INPUTS!r}")
    return signature


def _run(manager: ModelManager, servable: Servable, signature: Signature, examples: Sequence[bytes],
         outputs: Sequence[str]) -> Dict[str, object]:
    import numpy as np

    if not examples:
        raise invalid("Input is empty.")
    array = np.empty(len(examples), dtype=object)
    array[:] = list(examples)
    return manager.predict(servable, signature, {features.CLASSIFY_INPUTS: array}, list(outputs))


def _matrix(outputs: Mapping, key: str, strings: bool, count: int):
    """A ``classes`` (strings) or ``scores`` output, checked as TF Serving checks it; None when absent."""
    value = outputs.get(key)
    if value is None:
        return None
    if value.ndim != 2:
        raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {list(value.shape)}")
    ok = value.dtype.kind in "OS" if strings else value.dtype.name == "float32"
    if not ok:
        raise invalid(f"Expected {key} Tensor of DT_{'STRING' if strings else 'FLOAT'}. Got: {value.dtype.name}")
    if value.shape[0] != count:
        raise invalid(f"Expected {key} output batch size of {count}. Got: {value.shape[0]}")
    return value


def classify(manager: ModelManager, servable: Servable, signature_name: Optional[str],
             examples: Sequence[bytes]) -> Classifications:
    """Runs a classification signature: per example, (class name, score) per class, in the signature's order."""
    signature = _named_signature(servable, signature_name, features.CLASSIFY_METHOD, "classification")
    wanted = [k for k in (features.CLASSES_OUTPUT, features.SCORES_OUTPUT) if k in signature.outputs]
    if not wanted:
        raise ServingError("FAILED_PRECONDITION", "Expected classification signature outputs to contain at "
                                                  'least one of "classes" or "scores"')
    outputs = _run(manager, servable, signature, examples, wanted)
    classes = _matrix(outputs, features.CLASSES_OUTPUT, True, len(examples))
    scores = _matrix(outputs, features.SCORES_OUTPUT, False, len(examples))
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid(f"Tensors class and score should match in dim_size(1). Got {classes.shape[1]} vs. "
                      f"{scores.shape[1]}")
    width = (classes if classes is not None else scores).shape[1]
    return [[(bytes(classes[i, c]) if classes is not None else b"",
              float(scores[i, c]) if scores is not None else 0.0) for c in range(width)]
            for i in range(len(examples))]


def regress(manager: ModelManager, servable: Servable, signature_name: Optional[str],
            examples: Sequence[bytes]) -> List[float]:
    """Runs a regression signature (``visiontune`` models have none: TF Serving's error says so)."""
    signature = _named_signature(servable, signature_name, features.REGRESS_METHOD, "regression")
    if "outputs" not in signature.outputs:
        raise ServingError("FAILED_PRECONDITION", "No regression outputs found in SignatureDef: it must have "
                                                  "an output named 'outputs'")
    value = _run(manager, servable, signature, examples, ["outputs"])["outputs"]
    if value.ndim not in (1, 2) or (value.ndim == 2 and value.shape[1] != 1):
        raise invalid("Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                      f"{list(value.shape)}")
    if value.dtype.name != "float32":
        raise invalid(f"Expected output Tensor of DT_FLOAT. Got: {value.dtype.name}")
    if value.shape[0] != len(examples):
        raise invalid(f"Input batch size did not match output batch size: {len(examples)} vs. {value.shape[0]}")
    return [float(v) for v in value.reshape(-1)]


# ---------------------------------------------------------------- REST

def _request(body: bytes) -> Tuple[Dict, Optional[str]]:
    request = tensors.parse_json_body(body)
    signature_name = request.get("signature_name")
    if signature_name is not None and not isinstance(signature_name, str):
        raise invalid("'signature_name' must be a string")
    return request, signature_name


def classify_json(manager: ModelManager, name: str, version: Optional[int], label: Optional[str], body: bytes):
    request, signature_name = _request(body)
    servable = manager.servable(name, version, label)
    result = classify(manager, servable, signature_name, examples_from_json(request, "classify"))
    return {"results": [[[c.decode("utf-8", "replace"), s] for c, s in row] for row in result]}


def regress_json(manager: ModelManager, name: str, version: Optional[int], label: Optional[str], body: bytes):
    request, signature_name = _request(body)
    servable = manager.servable(name, version, label)
    return {"results": regress(manager, servable, signature_name, examples_from_json(request, "regress"))}


# ---------------------------------------------------------------- gRPC messages

def _model_spec(spec, name: str, signature_name: str, version: int) -> None:
    """TF Serving's MakeModelSpec: the request's model name, the signature used, the version that answered."""
    spec.name = name
    spec.signature_name = signature_name or features.SERVING_DEFAULT
    spec.version.value = version


def fill_classifications(result, rows: Classifications) -> None:
    for row in rows:
        classifications = result.classifications.add()
        for label, score in row:
            classifications.classes.add(label=label.decode("utf-8", "replace"), score=score)


def classification_response(manager: ModelManager, servable: Servable, request):
    from tensorflow_serving.apis import classification_pb2

    rows = classify(manager, servable, request.model_spec.signature_name, serialized_examples(request.input))
    response = classification_pb2.ClassificationResponse()
    _model_spec(response.model_spec, request.model_spec.name, request.model_spec.signature_name,
                servable.version)
    fill_classifications(response.result, rows)
    return response


def regression_response(manager: ModelManager, servable: Servable, request):
    from tensorflow_serving.apis import regression_pb2

    values = regress(manager, servable, request.model_spec.signature_name, serialized_examples(request.input))
    response = regression_pb2.RegressionResponse()
    _model_spec(response.model_spec, request.model_spec.name, request.model_spec.signature_name,
                servable.version)
    for value in values:
        response.result.regressions.add(value=value)
    return response


def multi_inference_response(manager: ModelManager, servable: Servable, request):
    """TF Serving's MultiInference checks, then each task's signature on the request's examples."""
    from tensorflow_serving.apis import inference_pb2

    if not request.tasks:
        raise invalid("MultiInferenceRequest has no tasks")
    names = set()
    for task in request.tasks:
        if not task.model_spec.name:
            raise invalid("Found ModelSpec with an empty model name.")
        if task.model_spec.name != request.tasks[0].model_spec.name:
            raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        signature_name = task.model_spec.signature_name or features.SERVING_DEFAULT
        if signature_name in names:
            raise invalid(f"Duplicate evaluation of signature: {signature_name}")
        names.add(signature_name)
        if task.method_name not in (features.CLASSIFY_METHOD, features.REGRESS_METHOD):
            raise ServingError("UNIMPLEMENTED", f"Unsupported signature method_name: {task.method_name}")
    examples = serialized_examples(request.input)
    response = inference_pb2.MultiInferenceResponse()
    for task in request.tasks:
        result = response.results.add()
        _model_spec(result.model_spec, task.model_spec.name, task.model_spec.signature_name, servable.version)
        if task.method_name == features.CLASSIFY_METHOD:
            fill_classifications(result.classification_result,
                                 classify(manager, servable, task.model_spec.signature_name, examples))
        else:
            for value in regress(manager, servable, task.model_spec.signature_name, examples):
                result.regression_result.regressions.add(value=value)
    return response
