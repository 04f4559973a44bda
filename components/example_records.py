"""``tf.train.Example`` bytes, written by hand so that ingest's Beam workers need no TensorFlow.

Importing TensorFlow in every worker would cost seconds and hundreds of MB per
process.  The Example format is five nested length-delimited protobuf fields,
written here byte-identical to TensorFlow's own
``SerializeToString(deterministic=True)`` (``tests/test_prepare.py`` checks it
against TF).  The TFRecord framing around each record is Beam's
(``components.ingest_beam``).
"""

from __future__ import annotations

from typing import Optional

from visiontune import features

# --------------------------------------------------------------------------
# tf.train.Example wire format
# --------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    return _field(1, _field(1, value))  # Feature.bytes_list { value: ... }


def _int64_feature(value: int) -> bytes:
    return _field(3, _field(1, _varint(value)))  # Feature.int64_list { packed value }


def serialize_example(image: bytes, image_format: str, filename: str, height: int,
                      width: int, label: Optional[str] = None, mask: Optional[bytes] = None) -> bytes:
    """The bytes of ``tf.train.Example(...).SerializeToString(deterministic=True)``.

    Importing TensorFlow in every worker would cost seconds and hundreds of MB
    per process; the Example format is five nested length-delimited fields.
    Map entries are written in sorted key order, as protobuf's deterministic
    mode does, so the bytes match TensorFlow's own serialisation (tested).
    """
    fields = {
        features.FILENAME_KEY: _bytes_feature(filename.encode("utf-8")),
        features.HEIGHT_KEY: _int64_feature(height),
        features.IMAGE_KEY: _bytes_feature(image),
        features.IMAGE_FORMAT_KEY: _bytes_feature(image_format.encode("ascii")),
        features.WIDTH_KEY: _int64_feature(width),
    }
    if label is not None:
        fields[features.LABEL_KEY] = _bytes_feature(label.encode("utf-8"))
    if mask is not None:
        fields[features.MASK_KEY] = _bytes_feature(mask)
    entries = b"".join(_field(1, _field(1, key.encode("utf-8")) + _field(2, value))
                       for key, value in sorted(fields.items()))
    return _field(1, entries)  # Example.features { feature: map entries }
