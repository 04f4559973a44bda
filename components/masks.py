"""Segmentation masks at ingest: pairing images with masks, checking and encoding masks.

A mask is one value per pixel (CDnet2014: 0 background, 255 foreground,
50/85/170 void).  Those values are what the Transform maps to classes, so a
mask must reach the examples exactly as it was drawn:

* palette PNGs (CDnet ships mode ``P``) keep their palette *indices*; converting
  to RGB or grayscale would replace them with whatever colours the palette
  holds;
* every mask is re-encoded as a single-channel 8-bit PNG (lossless; TF's
  ``decode_png`` reads it without a palette step);
* a colour mask whose channels differ has no single value per pixel and is
  rejected, as is a mask whose size differs from its image's.

Like the rest of ingest's worker code this imports Pillow and NumPy only.
"""

from __future__ import annotations

import io
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple


class MaskRejected(Exception):
    """The image/mask pair cannot go into the dataset; the message is the reason."""


def mask_name(image_name: str, mask_regex: str, mask_template: str) -> Optional[str]:
    """The mask file name for an image file name, or None when the regex does not match."""
    match = re.match(mask_regex, image_name)
    if not match:
        return None
    return match.expand(mask_template)


class LocalFolders:
    """The folder operations ``list_pairs`` needs, on the local disk (``remote_listing`` has the URL ones)."""

    join = staticmethod(os.path.join)
    isdir = staticmethod(os.path.isdir)
    isfile = staticmethod(os.path.isfile)
    normpath = staticmethod(os.path.normpath)

    @staticmethod
    def listdir(folder: str) -> List[str]:
        return sorted(os.listdir(folder))

    @staticmethod
    def relpath(path: str, source: str) -> str:
        return os.path.relpath(path, source).replace(os.sep, "/")


def list_pairs(source: str, image_dir: str, mask_dir: str, mask_regex: str, mask_template: str,
               is_listed, folders=LocalFolders) -> Tuple[List[Tuple[str, str, str]], List[Tuple[str, str]]]:
    """(image path, relpath, mask path) per image under ``source/image_dir``, and rejects.

    Rejects: images whose name the regex does not match or whose mask is missing,
    and masks that no image claims (so a renamed image cannot silently drop
    its mask).  ``is_listed(name)`` filters hidden and non-image files.
    ``folders`` lists and tests paths: the local disk, or a URL filesystem.
    """
    fs = folders
    image_root = fs.join(source, image_dir)
    mask_root = fs.join(source, mask_dir)
    for root, what in ((image_root, "segmentation.image_dir"), (mask_root, "segmentation.mask_dir")):
        if not fs.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder ({what} under {source})")
    pairs: List[Tuple[str, str, str]] = []
    rejects: List[Tuple[str, str]] = []
    claimed = set()
    for name in fs.listdir(image_root):
        path = fs.join(image_root, name)
        if not fs.isfile(path) or not is_listed(name):
            continue
        wanted = mask_name(name, mask_regex, mask_template)
        if wanted is None:
            rejects.append((path, f"file name does not match segmentation.mask_regex {mask_regex!r}: "
                                  "cannot tell which mask belongs to it"))
            continue
        mask_path = fs.join(mask_root, wanted)
        if not fs.isfile(mask_path):
            rejects.append((path, f"no mask: expected {mask_path} (segmentation.mask_template "
                                  f"{mask_template!r})"))
            continue
        claimed.add(fs.normpath(mask_path))
        pairs.append((path, fs.relpath(path, source), mask_path))
    for name in fs.listdir(mask_root):
        path = fs.join(mask_root, name)
        if fs.isfile(path) and is_listed(name) and fs.normpath(path) not in claimed:
            rejects.append((path, "mask without an image (no file in "
                                  f"{image_root} maps to it through segmentation.mask_template)"))
    return pairs, rejects


def mask_values(img) -> "numpy.ndarray":  # noqa: F821 - numpy imported lazily
    """``[h, w]`` uint8 mask values of a decoded Pillow image, or ``MaskRejected``."""
    import numpy as np

    mode = img.mode
    if mode in ("L", "P"):
        return np.asarray(img, dtype=np.uint8)  # P: the palette indices, not the colours
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode in ("LA", "PA"):
        return np.asarray(img.getchannel(0), dtype=np.uint8)
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise MaskRejected(f"mask is a colour image ({mode} with differing channels): "
                               "expected one value per pixel")
        return rgb[..., 0]
    if mode.startswith("I"):
        values = np.asarray(img.convert("I"), dtype=np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 255:
            raise MaskRejected(f"mask values outside 0-255 ({mode}): expected 8-bit class values")
        return values.astype(np.uint8)
    raise MaskRejected(f"mask has unsupported pixel mode {mode}")


def encode_mask(values) -> bytes:
    """A single-channel 8-bit PNG of ``values`` (lossless, deterministic)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(values, mode="L").save(out, format="PNG")
    return out.getvalue()


def value_to_class(class_values: Sequence[Sequence[int]]) -> Dict[int, int]:
    return {int(v): i for i, values in enumerate(class_values) for v in values}


def classes_present(values, class_values: Sequence[Sequence[int]]) -> List[int]:
    """Indices of the classes with at least one pixel in the mask."""
    import numpy as np

    found = set(int(v) for v in np.unique(values))
    return [i for i, vs in enumerate(class_values) if found.intersection(int(v) for v in vs)]


def lookup_table(class_values: Sequence[Sequence[int]], void_id: int) -> List[int]:
    """256 entries: mask value -> class index, ``void_id`` for void and unlisted values."""
    mapping = value_to_class(class_values)
    return [mapping.get(v, void_id) for v in range(256)]


def check_class_values(class_values: Sequence[Sequence[int]], void_values: Iterable[int]) -> List[str]:
    """Problems with a value mapping, as messages (empty when it is usable)."""
    problems = []
    seen: Dict[int, int] = {}
    for i, values in enumerate(class_values):
        if not values:
            problems.append(f"segmentation.class_values[{i}] is empty")
        for v in values:
            if not 0 <= int(v) <= 255:
                problems.append(f"segmentation.class_values[{i}]: {v} is not a mask value (0-255)")
            elif int(v) in seen:
                problems.append(f"mask value {v} is in class_values[{seen[int(v)]}] and class_values[{i}]")
            seen.setdefault(int(v), i)
    for v in void_values:
        if int(v) in seen:
            problems.append(f"mask value {v} is both void and class {seen[int(v)]}")
    return problems
