"""Checking one image file with Pillow and re-encoding it into bytes TensorFlow decodes right.

The pipeline's Transform and Trainer only ever see bytes TensorFlow can decode
(PNG or JPEG).  Formats TF cannot read (GTSRB's PPM, BMP, TIFF, WebP, CMYK
JPEG) and images whose pixels are not plain RGB (alpha, palette, grayscale,
16 bit, EXIF rotation) are normalised here, once, to a lossless PNG; files TF
already decodes to upright RGB keep their original bytes.  A file that cannot
be used raises ``ImageRejected`` with the reason, which becomes a row of
``rejects.csv`` instead of killing a Beam job halfway through training data.

Pillow is more lenient than TensorFlow's decoders (libpng, libjpeg), which
Transform runs on every kept byte: a PNG with a bad CRC in a critical chunk,
no IEND or an unfinished zlib stream, or a JPEG without its end-of-image
marker, opens in Pillow and fails ``tf.io.decode_image`` later, killing the
whole Transform.  ``tf_decoder_problem`` checks those rules on the raw bytes
(chunk CRCs with ``zlib.crc32``, the zlib stream, the JPEG marker sequence),
so ingest rejects such files without importing TensorFlow.

Serving clients call ``encode_image`` too (``serving.images``), so a model sees
the same pixels in production as in training.  This runs in ingest's worker
processes: Pillow and NumPy only, no TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple

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
    if "://" in path:
        return _read_remote(path, max_file_bytes)
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


def _read_remote(url: str, max_file_bytes: int) -> bytes:
    """A file on a filesystem TensorFlow knows (``gs://``...): its size checked before it is read."""
    import tensorflow as tf

    try:
        size = tf.io.gfile.stat(url).length
        if size == 0:
            raise ImageRejected("empty file (0 bytes)")
        if size > max_file_bytes:
            raise ImageRejected(f"file too large: {size} bytes > data.max_file_bytes={max_file_bytes}")
        with tf.io.gfile.GFile(url, "rb") as f:
            return f.read()
    except tf.errors.OpError as e:
        raise ImageRejected(f"cannot read file: {e.message}") from None


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


# --------------------------------------------------------------------------
# What TensorFlow's decoders refuse that Pillow reads
# --------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libpng refuses a critical chunk (upper-case first letter) with a bad CRC, and
# any critical chunk it does not know; ancillary ones it skips, as TF does.
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
_INFLATE_PIECE = 1 << 16  # compressed bytes per inflate call: bounds the memory held
_TF_REFUSES = "TensorFlow's decoder refuses it"


def tf_decoder_problem(raw: bytes, image_format: str) -> Optional[str]:
    """Why TensorFlow's decoder would refuse a PNG or JPEG that Pillow decoded, or None.

    Matches what ``tf.io.decode_image`` (libpng, libjpeg-turbo) refuses and
    Pillow accepts (tested against TensorFlow in ``tests/test_ingest_faults.py``).
    Costs a CRC and an inflate of a PNG's bytes, a marker scan of a JPEG's.
    """
    if image_format == "PNG" and raw.startswith(_PNG_SIGNATURE):
        return _png_problem(memoryview(raw))
    if image_format in ("JPEG", "MPO") and raw.startswith(b"\xff\xd8"):
        return _jpeg_problem(raw)
    return None


def _png_problem(raw: memoryview) -> Optional[str]:
    pos, size = len(_PNG_SIGNATURE), len(raw)
    inflater = zlib.decompressobj()
    while True:
        if pos + 8 > size:
            return f"truncated image: the PNG ends before its IEND chunk ({_TF_REFUSES})"
        length = int.from_bytes(raw[pos:pos + 4], "big")
        kind = bytes(raw[pos + 4:pos + 8])
        name = kind.decode("latin-1")
        end = pos + 8 + length
        if end + 4 > size:
            return f"truncated image: the PNG's {name!r} chunk runs past the end of the file ({_TF_REFUSES})"
        if not kind[0] & 0x20:  # critical
            if kind not in _PNG_CRITICAL:
                return f"corrupt image: unknown critical PNG chunk {name!r} ({_TF_REFUSES})"
            if zlib.crc32(raw[pos + 4:end]) != int.from_bytes(raw[end:end + 4], "big"):
                return f"corrupt image: bad CRC in the PNG's {name!r} chunk ({_TF_REFUSES})"
        if kind == b"IDAT" and not inflater.eof:
            try:
                for start in range(pos + 8, end, _INFLATE_PIECE):
                    inflater.decompress(raw[start:min(end, start + _INFLATE_PIECE)])
                    if inflater.eof:
                        break
            except zlib.error as e:
                return f"corrupt image: the PNG's compressed pixels are damaged ({e}; {_TF_REFUSES})"
        if kind == b"IEND":
            break
        pos = end + 4
    if not inflater.eof:
        return f"truncated image: the PNG's compressed pixels end early ({_TF_REFUSES})"
    return None


def _jpeg_problem(raw: bytes) -> Optional[str]:
    """Walks the JPEG's markers to its end-of-image marker, as libjpeg does."""
    truncated = f"truncated image: the JPEG ends before its end-of-image marker ({_TF_REFUSES})"
    pos, size = 2, len(raw)
    while True:
        pos = raw.find(b"\xff", pos)  # libjpeg skips (with a warning) bytes before a marker
        while 0 <= pos < size and raw[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos < 0 or pos >= size:
            return truncated
        marker = raw[pos]
        pos += 1
        if marker == 0xD9:  # EOI: TF stops here, whatever follows (MPO's other images)
            return None
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # stuffed byte, TEM, RSTn: no length
        if pos + 2 > size:
            return truncated
        pos += (raw[pos] << 8) | raw[pos + 1]
        if pos > size:
            return truncated
        if marker == 0xDA:  # SOS: entropy-coded data up to the next real marker
            while True:
                pos = raw.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= size:
                    return truncated
                following = raw[pos + 1]
                if following == 0xFF:  # fill byte
                    pos += 1
                elif following < 0xC0 or 0xD0 <= following <= 0xD7:
                    # FF00 (a stuffed FF), RSTn, or no marker at all: libjpeg
                    # discards those at a restart (and Pillow, on the same
                    # libjpeg, refused the file if it could not).
                    pos += 2
                else:
                    break


def encode_image(path: str, max_file_bytes: int, max_pixels: int) -> Tuple[bytes, str, int, int]:
    """(encoded bytes, "png"/"jpeg", height, width) of an image fit for TF.

    Serving clients call this too, so a model sees the same pixels in production
    as in training.  Raises ``ImageRejected`` with the reason for a bad file.
    """
    from PIL import ImageOps
    raw = _read_checked(path, max_file_bytes)
    with _strict_pillow():
        img = _open_checked(raw, max_pixels)
        # Whether kept or re-encoded: a file TF's decoder refuses is damaged.
        problem = tf_decoder_problem(raw, img.format)
        if problem:
            raise ImageRejected(problem)
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


def encode_example(path: str, relpath: str, label: str, mask_path: str, max_file_bytes: int,
                   max_pixels: int, class_values: Optional[Sequence] = None
                   ) -> Tuple[Optional[bytes], Optional[str], List[str]]:
    """One listed image as ``(serialized tf.Example, None, labels)`` or ``(None, reason, [])``.

    ``labels`` are what the image counts for: its class name, or with
    ``class_values`` (segmentation) the indices of the classes in its mask.
    Any failure is this file's, never the run's: it becomes a reject reason.
    """
    from visiontune.components.example_records import serialize_example
    try:
        encoded, fmt, height, width = encode_image(path, max_file_bytes, max_pixels)
        if class_values is None:
            return serialize_example(encoded, fmt, relpath, height, width, label), None, [label]
        mask_png, values = encode_mask_file(mask_path, height, width, max_file_bytes, max_pixels)
        example = serialize_example(encoded, fmt, relpath, height, width, mask=mask_png)
        return example, None, [str(i) for i in masks.classes_present(values, class_values)]
    except (ImageRejected, masks.MaskRejected) as e:
        return None, str(e), []
    except Exception as e:  # noqa: BLE001 - any other failure is this file's, not the run's
        return None, f"cannot process image: {_describe(e)}", []
