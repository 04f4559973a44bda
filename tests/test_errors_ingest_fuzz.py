"""A bounded fuzz test of ingest: random bytes as images, through ``visiontune prepare``.

Every file ends either in the dataset (and decodes with TensorFlow) or as a
line of ``rejects.csv`` with a reason: never both, never neither, never a
crash, never a hang (the command runs under a time limit).  The files are
drawn from a seeded generator: random bytes, image headers with random
bodies, real images cut, bit-flipped or with bytes inserted, and headers that
declare enormous images; their extensions often lie.  ``VISIONTUNE_FUZZ_SEED``
draws another set; a failure prints the seed that found it.  About 200 files
of a few hundred bytes: seconds.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

SEED = int(os.environ.get("VISIONTUNE_FUZZ_SEED", "14"))
FILES = 200
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "PPM", "TIFF", "WEBP"]
EXTENSIONS = [".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ppm", ".tif", ".webp", ".txt", ""]
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"P6\n", b"II*\x00", b"MM\x00*",
         b"RIFF\x00\x01\x00\x00WEBPVP8 "]


def _image(rng: np.random.Generator, fmt: str) -> bytes:
    side = int(rng.integers(1, 24)), int(rng.integers(1, 24))
    mode = str(rng.choice(["RGB", "L", "RGBA", "P"])) if fmt in ("PNG", "GIF", "TIFF", "WEBP") else "RGB"
    pixels = rng.integers(0, 256, (side[1], side[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header (with a right CRC) declares ``width`` x ``height`` over a tiny IDAT."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _fuzzed(rng: np.random.Generator) -> bytes:
    kind = int(rng.integers(9))
    if kind == 0:  # noise
        return bytes(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8))
    if kind == 1:  # an image header, then noise
        return bytes(rng.choice(MAGIC)) + bytes(rng.integers(0, 256, int(rng.integers(0, 800)), dtype=np.uint8))
    if kind == 2:  # empty
        return b""
    if kind == 3:  # enormous, declared in the header
        if rng.integers(2):
            return _png_declaring(int(rng.integers(20000, 2 ** 31 - 1)), int(rng.integers(20000, 2 ** 31 - 1)))
        return b"P6\n%d %d\n255\n" % (rng.integers(20000, 10 ** 9), rng.integers(20000, 10 ** 9)) + b"\0" * 30
    data = _image(rng, str(rng.choice(FORMATS)))
    if kind == 4:  # cut
        return data[:int(rng.integers(0, len(data)))]
    if kind == 5:  # bits flipped
        flipped = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
        return bytes(flipped)
    if kind == 6:  # bytes inserted
        at = int(rng.integers(len(data)))
        return data[:at] + bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8)) + data[at:]
    return data  # kinds 7, 8: a real image (often under another format's extension)


@pytest.mark.skipif(not sys.platform.startswith("linux") and not sys.platform == "darwin",
                    reason="POSIX file names")
def test_every_fuzzed_file_is_in_the_dataset_or_a_reject(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(SEED)
    src = tmp_path / "src"
    listed = set()
    for label in ("a", "b"):
        (src / label).mkdir(parents=True)
        for i in range(2):  # each class keeps some training images whatever the draw
            (src / label / f"good{i}.png").write_bytes(_image(rng, "PNG"))
            listed.add(f"{label}/good{i}.png")
    for i in range(FILES):
        name = f"{['a', 'b'][i % 2]}/{i:03d}{rng.choice(EXTENSIONS)}"
        (src / name).write_bytes(_fuzzed(rng))
        listed.add(name)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "visiontune.cli", "prepare", "--source", str(src), "--output",
                          str(out), "--eval-fraction", "0", "--workers", "1", "--quiet", "--set",
                          "data.num_shards=2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"seed {SEED}: {run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, f"seed {SEED}: {run.stderr[-3000:]}"

    written = {}
    for name in sorted(os.listdir(out / "train")):
        for record in tf.data.TFRecordDataset(str(out / "train" / name)):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            filename = feature["filename"].bytes_list.value[0].decode()
            assert filename not in written, f"seed {SEED}: {filename} written twice"
            written[filename] = feature["image"].bytes_list.value[0]
    with open(out / "rejects.csv", newline="", encoding="utf-8") as f:
        rejects = {os.path.relpath(row["file"], str(src)).replace(os.sep, "/"): row["reason"]
                   for row in csv.DictReader(f)}

    assert not set(written) & set(rejects), f"seed {SEED}: both written and rejected"
    assert set(written) | set(rejects) == listed, f"seed {SEED}: lost {sorted(listed - set(written) - set(rejects))}"
    assert all(reason.strip() for reason in rejects.values())
    for filename, image in written.items():  # what is written, TensorFlow reads
        tf.io.decode_image(image, channels=3, expand_animations=False)
    assert len(written) >= 4 and len(rejects) >= FILES // 4, (len(written), len(rejects))  # both outcomes drawn
