"""Image bytes the way a serving client sends them.

``serving_default`` decodes with TensorFlow, which reads PNG and JPEG.  A
client holding another format (GTSRB's PPM, TIFF, WebP...) converts it with
the very function ``visiontune prepare`` uses for training data
(:func:`components.image_encoding.encode_image`), so the model sees the same pixels
in training and in production.
"""

from __future__ import annotations

# A client sends what it is given; the ingest size limits are for datasets.
_NO_LIMIT = 1 << 62


def encode_for_serving(path: str) -> bytes:
    """The file's bytes if TensorFlow can decode them as RGB, else a lossless RGB PNG."""
    from visiontune.components import image_encoding

    try:
        encoded, _, _, _ = image_encoding.encode_image(path, _NO_LIMIT, _NO_LIMIT)
    except image_encoding.ImageRejected as e:
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None
    return encoded
