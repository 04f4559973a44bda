"""TF Serving's config messages that ``tensorflow-serving-api`` does not ship, and a strict reader for them.

``tensorflow_model_server --batching_parameters_file`` reads a text-format ``BatchingParameters``
(``tensorflow_serving/servables/tensorflow/session_bundle_config.proto``) and
``--monitoring_config_file`` a ``MonitoringConfig`` (``tensorflow_serving/config/monitoring_config.proto``).
The pip package holds neither, so both are built here from descriptors with TF Serving's package, field
names, numbers and types: the same file means the same thing to both servers, and a file written here
(``MESSAGE_TO_TEXT``) is one TF Serving reads.  They live in a descriptor pool of their own, so they never
clash with a ``tensorflow_serving`` build that does register them.
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

PACKAGE = "tensorflow.serving"
_F = descriptor_pb2.FieldDescriptorProto

# (message, [(field, number, type or message type name, repeated)]), as in TF Serving's .proto files.
_MESSAGES = {
    "BatchingParameters": [
        ("max_batch_size", 1, ".google.protobuf.Int64Value", False),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value", False),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value", False),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value", False),
        ("thread_pool_name", 5, ".google.protobuf.StringValue", False),
        ("allowed_batch_sizes", 6, _F.TYPE_INT64, True),
        ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, False),
    ],
    "PrometheusConfig": [
        ("enable", 1, _F.TYPE_BOOL, False),
        ("path", 2, _F.TYPE_STRING, False),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, f".{PACKAGE}.PrometheusConfig", False),
    ],
}


@functools.lru_cache(maxsize=None)
def message_class(name: str):
    """The generated message class of one of ``_MESSAGES`` (e.g. ``message_class("BatchingParameters")()``)."""
    return _classes()[name]


@functools.lru_cache(maxsize=None)
def _classes():
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(name="visiontune/tf_serving_configs.proto", package=PACKAGE,
                                              syntax="proto3", dependency=[wrappers_pb2.DESCRIPTOR.name])
    for message, fields in _MESSAGES.items():
        proto = file.message_type.add(name=message)
        for field, number, kind, repeated in fields:
            entry = proto.field.add(name=field, number=number, json_name=field,
                                    label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if isinstance(kind, str):
                entry.type, entry.type_name = _F.TYPE_MESSAGE, kind
            else:
                entry.type = kind
    pool.Add(file)
    factory = message_factory.MessageFactory(pool)
    return {name: factory.GetPrototype(pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name in _MESSAGES}


def parse(name: str, text: str):
    """Parses a text-format message strictly; raises ValueError (one line) for unknown fields or bad values."""
    message = message_class(name)()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        message = " ".join(str(e).split())
        if 'Expected "{"' in message:   # `max_batch_size: 8` for a wrapper field
            message += ' (wrapped values are written as max_batch_size { value: 8 })'
        raise ValueError(message) from None
    return message


def read(name: str, path: str):
    """Reads a text-format file; raises ValueError naming the file and the problem, in one line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse(name, text)
    except ValueError as e:
        raise ValueError(f"{path}: not a text-format {name}: {e}") from None


def to_text(message) -> str:
    return text_format.MessageToString(message)
