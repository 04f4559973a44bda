"""Checking one image file with Pillow and re-encoding it into bytes TensorFlow decodes right.

The pipeline's Transform and Trainer only ever see bytes TensorFlow can decode
(PNG or JPEG).  Formats TF cannot read (GTSRB's PPM, BMP, TIFF, WebP, CMYK
JPEG) and images whose pixels are not plain RGB (alpha, palette, grayscale,
16 bit, EXIF rotation) are normalised here, once, to a lossless PNG; files TF
already decodes to upright RGB keep their original bytes.  A file that cannot
be used raises ``ImageRejected`` with the reason, which becomes a row of
``rejects.csv`` instead of killing a Beam job halfway through training data.

Serving clients call ``encode_image`` too (``serving.images``), so a model sees
the same pixels in production as in training.  This runs in ingest's worker
processes: Pillow and NumPy only, no TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Iterator, Tuple

from visiontune.components import masks

_EXIF_ORIENTATION = 0x0112
# EXIF orientations other than "upright" (1); other values are invalid and ignored.
_ROTATED = range(2, 9)


class ImageRejected(Exception):
    """A file that cannot go into the dataset; the message is the reason."""


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Pillow settings for checking, restored afterwards.

    Truncated images must raise (Pillow's LOAD_TRUNCATED_IMAGES would pad them
    with grey), and Pillow's own decompression-bomb limit is lifted because
    ``max_pixels`` is checked from the header instead, with a clearer reason.
    """
    from PIL import Image, ImageFile
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/metadata chatter; real problems raise
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _read_checked(path: str, max_file_bytes: int) -> bytes:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageRejected(f"cannot read file: {e.strerror}") from None
    if size == 0:
        raise ImageRejected("empty file (0 bytes)")
    if size > max_file_bytes:
        raise ImageRejected(f"file too large: {size} bytes > data.max_file_bytes={max_file_bytes}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageRejected(f"cannot read file: {e.strerror}") from None


def _open_checked(raw: bytes, max_pixels: int):
    """Opens and fully decodes, checking the pixel count from the header first."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise ImageRejected("not an image (Pillow cannot identify the file format)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad headers
        raise ImageRejected(f"corrupt image header: {_describe(e)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(f"image too large: {width}x{height} = {width * height} pixels > "
                      f"data.max_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, struct.error, EOFError ...
        message = _describe(e)
        kind = "truncated image" if "truncat" in message.lower() else "corrupt image"
        raise ImageRejected(f"{kind}: {message}") from None
    return img


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


def _orientation(img) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a good image
        return 1


def _keeps_original_bytes(img) -> bool:
    """Whether TF already decodes the file to the right RGB pixels, upright.

    Keeping those bytes avoids a lossy JPEG re-encode and keeps the dataset
    small; everything else is normalised to a lossless PNG.
    """
    if img.mode != "RGB" or _orientation(img) in _ROTATED or "transparency" in img.info:
        return False
    return img.format in ("JPEG", "MPO", "PNG")


def _to_rgb(img):
    """RGB pixels: transparency composited onto white, 16-bit scaled to 8-bit."""
    from PIL import Image
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    return img.convert("RGB")


def _high_depth_to_rgb(img):
    """16-bit (or 32-bit) grayscale to 8-bit: Pillow's convert would clip at 255."""
    import numpy as np
    from PIL import Image
    pixels = np.asarray(img.convert("I") if img.mode != "F" else img, dtype=np.float64)
    if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def encode_image(path: str, max_file_bytes: int, max_pixels: int) -> Tuple[bytes, str, int, int]:
    """(encoded bytes, "png"/"jpeg", height, width) of an image fit for TF.

    Serving clients call this too, so a model sees the same pixels in production
    as in training.  Raises ``ImageRejected`` with the reason for a bad file.
    """
    from PIL import ImageOps
    raw = _read_checked(path, max_file_bytes)
    with _strict_pillow():
        img = _open_checked(raw, max_pixels)
        if _keeps_original_bytes(img):
            fmt = "png" if img.format == "PNG" else "jpeg"
            return raw, fmt, img.height, img.width
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - unusable EXIF: keep the stored orientation
            pass
        rgb = _to_rgb(img)
        out = io.BytesIO()
        rgb.save(out, format="PNG")
        return out.getvalue(), "png", rgb.height, rgb.width


def encode_mask_file(path: str, height: int, width: int, max_file_bytes: int, max_pixels: int):
    """(PNG bytes, values) of the mask at ``path`` for an image of ``height`` x ``width``."""
    raw = _read_checked(path, max_file_bytes)
    with _strict_pillow():
        try:
            img = _open_checked(raw, max_pixels)
        except ImageRejected as e:
            raise masks.MaskRejected(f"mask {path}: {e}") from None
        if (img.height, img.width) != (height, width):
            raise masks.MaskRejected(f"mask {path} is {img.width}x{img.height}, its image is "
                                     f"{width}x{height}")
        try:
            values = masks.mask_values(img)
        except masks.MaskRejected as e:
            raise masks.MaskRejected(f"mask {path}: {e}") from None
    return masks.encode_mask(values), values
