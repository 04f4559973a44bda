"""Tensors in TF Serving's REST JSON and gRPC ``TensorProto`` forms.

Follows TF Serving's REST API (``tensorflow_serving/util/json_tensor.cc``):

* Row format: ``{"instances": [...]}``, one entry per example.  Each entry is
  an object of named inputs, or, when the signature has one input, the bare
  value.  Answer: ``{"predictions": [...]}``, per example an object of named
  outputs, or the bare value when there is one output.
* Columnar format: ``{"inputs": {name: batch}}`` (or the bare batch for one
  input).  Answer: ``{"outputs": {name: batch}}`` (or the bare batch).
* Binary strings travel as ``{"b64": "..."}``.  String outputs come back as
  ``{"b64": ...}`` when their name ends in ``_bytes`` (TF Serving's rule) or
  when they are not valid UTF-8 (which JSON cannot carry), else as strings.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from visiontune.serving.model_server import invalid

ROW, COLUMNAR = "row", "columnar"


# ---------------------------------------------------------------- JSON -> numpy

def parse_json_body(body: bytes) -> Dict[str, Any]:
    """A REST request body -> its JSON object (TF Serving's "JSON Parse error" otherwise)."""
    import json

    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"JSON Parse error: {e}") from None
    except RecursionError:
        raise invalid("JSON Parse error: nested too deeply") from None
    if not isinstance(request, dict):
        raise invalid("JSON Parse error: the request body must be a JSON object")
    return request


def decode_b64(obj: Mapping) -> bytes:
    """``{"b64": "..."}`` -> its bytes (padding optional, as TF Serving accepts)."""
    value = obj.get("b64")
    if len(obj) != 1 or not isinstance(value, str):
        raise invalid('a binary value must be an object {"b64": "<base64 string>"} and nothing else')
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid(f"Unable to base64 decode: {e}") from None


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and "b64" in value


def _strings(value: Any):
    """Nested JSON values -> nested lists of bytes."""
    if isinstance(value, list):
        return [_strings(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    if _is_b64(value):
        return decode_b64(value)
    raise invalid(f"expected a string or {{\"b64\": ...}} for a string input, got {type(value).__name__}: "
                  f"{str(value)[:50]}")


def to_array(value: Any, dtype, name: str) -> np.ndarray:
    """One input's JSON value -> numpy array of the signature's dtype (rectangular)."""
    if dtype.name == "string":
        nested = _strings(value)
        array = np.empty(_shape(nested, name), dtype=object)
        array[...] = nested
        return array
    try:
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind in "US":
            raise ValueError("not all values are numbers")
        if dtype.is_integer and array.dtype.kind == "f":
            raise ValueError("floats given for an integer input")
        return array.astype(dtype.as_numpy_dtype)
    except (ValueError, TypeError) as e:
        raise invalid(f"input {name!r}: cannot be read as a {dtype.name} tensor "
                      f"(ragged or wrong type: {e})") from None


def _shape(nested, name: str) -> Tuple[int, ...]:
    """Shape of a nested list of bytes; rejects ragged lists (TF Serving does too)."""
    if not isinstance(nested, list):
        return ()
    inner = {_shape(v, name) for v in nested}
    if len(inner) > 1:
        raise invalid(f"input {name!r}: all values must have the same shape (ragged list)")
    return (len(nested),) + (inner.pop() if inner else ())


def parse_predict_request(body: Any, input_specs: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], str]:
    """A decoded JSON body -> (numpy inputs by name, ROW or COLUMNAR)."""
    if not isinstance(body, dict):
        raise invalid("JSON request body must be an object with 'instances' or 'inputs'")
    if ("instances" in body) == ("inputs" in body):
        raise invalid("JSON request body must have exactly one of 'instances' (row format) and "
                      "'inputs' (columnar format)")
    names = list(input_specs)
    if "inputs" in body:
        inputs = body["inputs"]
        if len(names) == 1 and not (isinstance(inputs, dict) and not _is_b64(inputs)
                                    and set(inputs) == set(names)):
            inputs = {names[0]: inputs}
        if not isinstance(inputs, dict) or _is_b64(inputs):
            raise invalid(f"'inputs' must be an object of named inputs {names}")
        _check_names(inputs, names)
        return {k: to_array(v, input_specs[k].dtype, k) for k, v in inputs.items()}, COLUMNAR

    instances = body["instances"]
    if not isinstance(instances, list):
        raise invalid("'instances' must be a list")
    if not instances:
        raise invalid("'instances' is empty")
    columns: Dict[str, list] = {n: [] for n in names}
    for i, instance in enumerate(instances):
        if isinstance(instance, dict) and not _is_b64(instance):
            _check_names(instance, names, f"instance {i}: ")
            for k, v in instance.items():
                columns[k].append(v)
        elif len(names) == 1:
            columns[names[0]].append(instance)
        else:
            raise invalid(f"instance {i}: the signature has several inputs {names}; each instance "
                          "must be an object naming them")
    return {k: to_array(v, input_specs[k].dtype, k) for k, v in columns.items()}, ROW


def _check_names(given: Iterable[str], expected: Iterable[str], where: str = "") -> None:
    given, expected = set(given), set(expected)
    if given != expected:
        raise invalid(f"{where}input names {sorted(given)} do not match the signature's inputs "
                      f"{sorted(expected)}")


# ---------------------------------------------------------------- numpy -> JSON

def _json_strings(nested, force_b64: bool):
    if isinstance(nested, list):
        return [_json_strings(v, force_b64) for v in nested]
    if not force_b64:
        try:
            return nested.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(nested).decode("ascii")}


def to_json_value(name: str, array: np.ndarray):
    if array.dtype == object or array.dtype.kind == "S":
        return _json_strings(array.tolist(), name.endswith("_bytes"))
    return array.tolist()


def make_predict_response(outputs: Mapping[str, np.ndarray], fmt: str) -> Dict[str, Any]:
    values = {k: to_json_value(k, np.asarray(v)) for k, v in outputs.items()}
    if fmt == COLUMNAR:
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    sizes = {k: (np.shape(v)[0] if np.ndim(v) else None) for k, v in outputs.items()}
    batch = set(sizes.values())
    if len(batch) != 1 or None in batch:
        raise invalid(f"outputs have different batch sizes {sizes}; use the columnar format "
                      "('inputs') for this signature")
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    names = list(values)
    return {"predictions": [dict(zip(names, row)) for row in zip(*(values[n] for n in names))]}


# ---------------------------------------------------------------- TensorProto

def from_tensor_proto(proto, spec, name: str) -> np.ndarray:
    import tensorflow as tf

    if proto.dtype != spec.dtype.as_datatype_enum:
        raise invalid(f"Expects arg {name!r} to be {spec.dtype.name} but "
                      f"{tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else 'an invalid type'} "
                      "is provided")
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
        raise invalid(f"input {name!r}: malformed TensorProto: {e}") from None


def to_tensor_proto(array: np.ndarray, dtype: Optional[Any] = None):
    import tensorflow as tf

    return tf.make_tensor_proto(array, dtype=dtype)
