"""Pixel counts of encoded images read from their headers, before anything is decoded.

The serving signatures decode with ``tf.io.decode_image`` (BMP, GIF, JPEG,
PNG).  A 1 MB PNG can declare 16000x16000 pixels and cost 780 MB to decode,
so the built-in server reads the size each header declares and refuses an
image over ``--max-pixels`` with a 400 before TensorFlow sees it.

Only the header is parsed (a GIF's frame descriptors too: TensorFlow's GIF
decoder reads every frame and sizes its output by the largest).  Bytes that
are none of the four formats count as 0 pixels: TensorFlow refuses them
itself, with its own INVALID_ARGUMENT message.
"""

from __future__ import annotations

import struct
from typing import Optional


def _png(data: bytes) -> Optional[int]:
    # 8-byte signature, then the IHDR chunk: length, "IHDR", width, height (big-endian).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width * height


def _jpeg(data: bytes) -> Optional[int]:
    """Walks the markers to the first start-of-frame (SOF0-SOF15 but DHT, JPG and DAC)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:   # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width * height
        if marker == 0xDA or length < 2:   # scan data before any frame header: not a valid JPEG
            return None
        i += 2 + length
    return None


def _bmp(data: bytes) -> Optional[int]:
    if len(data) < 26:
        return None
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:           # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<hh", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(width) * abs(height)


def _gif(data: bytes) -> Optional[int]:
    """The largest of: the canvas, max frame width x max frame height, the frames' total area."""
    if len(data) < 13:
        return None
    width, height, packed = struct.unpack("<HHB", data[6:11])
    i = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
    max_w = max_h = total = 0
    while i < len(data):
        block = data[i]
        if block == 0x3B:           # trailer
            break
        if block == 0x21:           # extension: label, then sub-blocks
            i += 2
        elif block == 0x2C:         # image descriptor
            if i + 10 > len(data):
                break
            w, h, flags = struct.unpack("<HHB", data[i + 5:i + 10])
            max_w, max_h, total = max(max_w, w), max(max_h, h), total + w * h
            i += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1   # + LZW minimum code size
        else:
            break
        while i < len(data) and data[i]:   # sub-blocks until the empty one
            i += data[i] + 1
        i += 1
    return max(width * height, max_w * max_h, total)


def declared_pixels(data: bytes) -> int:
    """Pixels the image's header declares (0 for bytes that are not BMP, GIF, JPEG or PNG)."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            pixels = _png(data)
        elif data[:3] == b"\xff\xd8\xff":
            pixels = _jpeg(data)
        elif data[:3] == b"GIF":            # what TensorFlow and giflib check
            pixels = _gif(data)
        elif data[:2] == b"BM":
            pixels = _bmp(data)
        else:
            pixels = None
    except struct.error:
        pixels = None
    return pixels or 0
