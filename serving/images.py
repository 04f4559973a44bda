"""Image bytes the way a serving client sends them.

``serving_default`` decodes with TensorFlow, which reads PNG, JPEG, GIF and
BMP.  A client holding another format (GTSRB's PPM, TIFF, WebP...) converts it
losslessly to PNG first, exactly as ``visiontune prepare`` does for training
data, so the model sees the same pixels in training and in production.
"""

from __future__ import annotations

import io

TF_DECODABLE = {"PNG", "JPEG", "GIF", "BMP"}


def encode_for_serving(path: str) -> bytes:
    """The file's bytes if TensorFlow can decode them, else a lossless RGB PNG."""
    from PIL import Image, ImageOps

    with open(path, "rb") as f:
        raw = f.read()
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format in TF_DECODABLE and image.mode == "RGB" and not image.getexif().get(0x0112):
                return raw
            image = ImageOps.exif_transpose(image).convert("RGB")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue()
    except OSError as e:
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None
