"""Tests for components.prepare: layouts, image normalisation, rejects, splits, determinism.

Images are generated with Pillow in tmp_path and kept a few pixels wide:
these tests run on shared 2-core machines.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import random

import numpy as np
import pytest
import tensorflow as tf  # noqa: E402  (after the module under test: it must not need TF at import)
from PIL import Image, features as pil_features

from visiontune.components import example_records, prepare
from visiontune.components.image_listing import natural_key
from visiontune.components.prepare import PrepareError, prepare_dataset, read_classes
from visiontune.configs import DataConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("VISIONTUNE_SHARED", os.path.join(REPO, "..", "shared"))
GTSRB = os.path.join(SHARED, "datasets", "gtsrb")

FEATURE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "image_format": tf.io.FixedLenFeature([], tf.string),
    "filename": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.string),
}


# ----------------------------------------------------------------------------- helpers


def _config(source, **kwargs) -> DataConfig:
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("num_shards", 2)
    kwargs.setdefault("eval_fraction", 0.0)
    return DataConfig(source=str(source), **kwargs)


def _save(path, img: Image.Image, fmt: str = None, **kwargs) -> bytes:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img.save(str(path), format=fmt, **kwargs)
    with open(str(path), "rb") as f:
        return f.read()


def _rgb(width=6, height=4, color=(200, 30, 40)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def _noise(width, height, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _records(output_dir, split):
    """All Examples of a split, parsed with tf.data as the pipeline will."""
    files = sorted(tf.io.gfile.glob(os.path.join(str(output_dir), split, "*.tfrecord")))
    dataset = tf.data.TFRecordDataset(files).map(
        lambda record: tf.io.parse_single_example(record, FEATURE_SPEC))
    out = []
    for example in dataset.as_numpy_iterator():
        out.append({
            "image": example["image"],
            "image_format": example["image_format"].decode(),
            "filename": example["filename"].decode(),
            "height": int(example["height"]),
            "width": int(example["width"]),
            "label": example["label"].decode(),
        })
    return out


def _by_name(records):
    return {r["filename"]: r for r in records}


def _decode(record) -> np.ndarray:
    return tf.io.decode_image(record["image"], expand_animations=False).numpy()


def _rejects_csv(output_dir):
    with open(os.path.join(str(output_dir), "rejects.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "reason"]
    return {os.path.basename(path): reason for path, reason in rows[1:]}


def _shard_bytes(output_dir):
    out = {}
    for split in sorted(os.listdir(str(output_dir))):
        folder = os.path.join(str(output_dir), split)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as f:
                    out[f"{split}/{name}"] = f.read()
    return out


# ----------------------------------------------------------------------------- formats


def test_folder_tree_normalises_every_format(tmp_path):
    src = tmp_path / "src"
    jpeg_bytes = _save(src / "a" / "photo.jpg", _noise(16, 8), "JPEG", quality=90)
    png_bytes = _save(src / "a" / "plain.png", _rgb(), "PNG")
    _save(src / "a" / "sign.ppm", _rgb(5, 7, (10, 20, 30)), "PPM")
    _save(src / "a" / "nested" / "deeper" / "gray.png", Image.new("L", (3, 2), 77), "PNG")
    rgba = Image.new("RGBA", (4, 2), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    _save(src / "b" / "alpha.png", rgba, "PNG")
    _save(src / "b" / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    _save(src / "b" / "palette.gif", palette, "GIF")
    _save(src / "b" / "palette_transparent.png", palette, "PNG", transparency=1)
    _save(src / "b" / "gray.jpg", Image.new("L", (8, 8), 128), "JPEG")
    _save(src / "b" / "bitmap.bmp", _rgb(3, 3), "BMP")
    _save(src / "b" / "scan.tif", _rgb(3, 3), "TIFF")
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    deep.putpixel((0, 0), 4096)
    _save(src / "b" / "deep16.png", deep, "PNG")
    if pil_features.check("webp"):
        _save(src / "b" / "web.webp", _rgb(3, 5), "WEBP", lossless=True)
    # Stored 32 wide x 16 high, top half red; EXIF 6 = "rotate 90 clockwise to view".
    rotated = Image.new("RGB", (32, 16), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 32, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(src / "a" / "rotated.jpg", rotated, "JPEG", quality=95, exif=exif.tobytes())

    result = prepare_dataset(_config(src), output_dir=str(tmp_path / "out"), progress=False)

    assert result.rejects == []
    assert result.classes == ["a", "b"]
    records = _by_name(_records(tmp_path / "out", "train"))
    assert result.counts["train"] == {"a": 5, "b": len(records) - 5}
    assert _records(tmp_path / "out", "eval") == []
    for name, record in records.items():
        pixels = _decode(record)
        assert pixels.shape == (record["height"], record["width"], 3), name
        assert record["label"] == name.split("/")[0]
        assert record["image_format"] == ("jpeg" if name == "a/photo.jpg" else "png"), name

    # RGB JPEG and RGB PNG keep their original bytes.
    assert records["a/photo.jpg"]["image"] == jpeg_bytes
    assert records["a/plain.png"]["image"] == png_bytes
    # PPM became a lossless PNG of the same pixels.
    assert (_decode(records["a/sign.ppm"]) == (10, 20, 30)).all()
    assert (records["a/sign.ppm"]["height"], records["a/sign.ppm"]["width"]) == (7, 5)
    assert (_decode(records["a/nested/deeper/gray.png"]) == 77).all()
    alpha = _decode(records["b/alpha.png"])
    assert tuple(alpha[0, 0]) == (255, 255, 255) and tuple(alpha[0, 1]) == (0, 0, 255)
    assert np.abs(_decode(records["b/cmyk.jpg"]).astype(int) - (255, 0, 0)).max() < 40
    assert (_decode(records["b/palette.gif"]) == (0, 255, 0)).all()
    assert (_decode(records["b/palette_transparent.png"]) == 255).all()
    assert (np.abs(_decode(records["b/gray.jpg"]).astype(int) - 128) < 3).all()
    deep16 = _decode(records["b/deep16.png"])
    assert tuple(deep16[0, 0]) == (16, 16, 16) and tuple(deep16[1, 1]) == (255, 255, 255)
    # EXIF orientation applied: now 16 wide x 32 high, red on the right.
    turned = records["a/rotated.jpg"]
    assert (turned["height"], turned["width"]) == (32, 16)
    pixels = _decode(turned).astype(int)
    assert pixels.shape == (32, 16, 3)
    assert pixels[16, 13, 0] > 200 and pixels[16, 13, 2] < 60  # right: red
    assert pixels[16, 2, 2] > 200 and pixels[16, 2, 0] < 60  # left: blue


def test_features_read_back_with_tf_data(tmp_path):
    src = tmp_path / "src"
    _save(src / "cat" / "one.png", _rgb(6, 4), "PNG")
    _save(src / "dog" / "two.png", _rgb(2, 2), "PNG")
    out = tmp_path / "out"
    prepare_dataset(_config(src), output_dir=str(out), progress=False)

    record = _by_name(_records(out, "train"))["cat/one.png"]
    assert record["filename"] == "cat/one.png"
    assert (record["height"], record["width"]) == (4, 6)
    assert record["label"] == "cat"
    assert record["image_format"] == "png"
    assert tf.io.decode_png(record["image"]).shape == (4, 6, 3)
    assert read_classes(str(out)) == ["cat", "dog"]
    assert sorted(os.listdir(out)) == ["classes.txt", "eval", "rejects.csv", "summary.json", "train"]
    assert sorted(os.listdir(out / "train")) == [f"images-0000{i}-of-00002.tfrecord" for i in range(2)]


def test_hand_written_example_matches_tensorflow():
    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    values = dict(image=b"\x89PNG" + bytes(range(256)) * 3, image_format=b"png",
                  filename="dir/é.png".encode(), height=300, width=2 ** 40, label=b"10")
    example = tf.train.Example(features=tf.train.Features(
        feature={k: feature(v) for k, v in values.items()}))
    ours = example_records.serialize_example(values["image"], "png", "dir/é.png", 300, 2 ** 40, "10")
    assert ours == example.SerializeToString(deterministic=True)


def test_shards_match_tensorflow_writer(tmp_path):
    """A prepared shard is, byte for byte, what tf.io.TFRecordWriter writes for its records."""
    src = tmp_path / "src"
    for label in ("a", "b"):
        (src / label).mkdir(parents=True)
        for i in range(3):
            _save(src / label / f"{i}.png", _rgb(8 + i, 9))
    prepare_dataset(DataConfig(source=str(src), eval_fraction=0.0, num_shards=1, workers=1),
                    str(tmp_path / "out"), progress=False)
    (shard,) = (tmp_path / "out" / "train").glob("*.tfrecord")
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
    assert len(records) == 6
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as theirs:
        for r in records:
            theirs.write(r)
    assert shard.read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()


# ----------------------------------------------------------------------------- CSV labels


@pytest.mark.parametrize("delimiter", [";", ","])
def test_csv_labels_with_custom_columns(tmp_path, delimiter):
    src = tmp_path / "src"
    _save(src / "00007" / "x.ppm", _rgb(3, 3), "PPM")
    _save(src / "00007" / "y.ppm", _rgb(3, 3), "PPM")
    _save(src / "pool" / "z.png", _rgb(2, 2), "PNG")
    # Per-folder CSVs naming files next to themselves (GTSRB train layout).
    for folder, rows in {"00007": [("x.ppm", "7"), ("y.ppm", "7"), ("gone.ppm", "7")]}.items():
        with open(src / folder / f"GT-{folder}.csv", "w", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["Width", "Path", "Class"])
            writer.writerows([("3", name, label) for name, label in rows])
    # A CSV in a side folder naming a file relative to the source root.
    os.makedirs(src / "meta")
    with open(src / "meta" / "GT-extra.csv", "w", newline="") as f:
        f.write(delimiter.join(["Path", "Class"]) + "\n" + delimiter.join(["pool/z.png", "12"]) + "\n")

    data = _config(src, labels_csv="*/GT-*.csv", csv_delimiter=delimiter,
                   filename_column="Path", label_column="Class")
    out = tmp_path / "out"
    result = prepare_dataset(data, output_dir=str(out), progress=False)

    assert result.classes == ["7", "12"]
    assert result.counts["train"] == {"7": 2, "12": 1}
    records = _by_name(_records(out, "train"))
    assert sorted(records) == ["00007/x.ppm", "00007/y.ppm", "pool/z.png"]
    assert records["pool/z.png"]["label"] == "12"
    rejects = _rejects_csv(out)
    assert list(rejects) == ["gone.ppm"]
    assert "not found" in rejects["gone.ppm"] and "GT-00007.csv line 4" in rejects["gone.ppm"]


def test_csv_listing_resolves_links_duplicates_and_non_files(tmp_path):
    """A file listed twice (once through a link) is written once; broken links and folders are not found."""
    src = tmp_path / "src"
    _save(src / "a.png", _rgb(), "PNG")
    _save(src / "sub" / "b.png", _rgb(5, 5), "PNG")
    os.symlink(src / "a.png", src / "alias.png")
    os.symlink(src / "missing.png", src / "broken.png")
    os.makedirs(src / "folder.png")
    _save(src / "c.png", _rgb(3, 3), "PNG")
    (src / "labels.csv").write_text("Filename;ClassId\na.png;1\nalias.png;2\nbroken.png;1\n"
                                    "folder.png;1\nsub/b.png;1\n./sub/../a.png;1\nc.png;3\n")
    out = tmp_path / "out"
    result = prepare_dataset(_config(src, labels_csv="labels.csv"), str(out), progress=False)
    assert result.counts["train"] == {"1": 2, "3": 1}
    assert sorted(_by_name(_records(out, "train"))) == ["a.png", "c.png", "sub/b.png"]
    rejects = _rejects_csv(out)
    assert "listed again in" in rejects["alias.png"] and "with label '1'" in rejects["alias.png"]
    assert "listed again in" in rejects["a.png"]  # ./sub/../a.png, the same file again
    assert "not found" in rejects["broken.png"] and "not found" in rejects["folder.png"]


def test_csv_missing_column_names_the_columns_it_has(tmp_path):
    src = tmp_path / "src"
    _save(src / "a.png", _rgb(), "PNG")
    (src / "labels.csv").write_text("Filename,ClassId\na.png,1\n")
    with pytest.raises(PrepareError) as error:
        prepare_dataset(_config(src, labels_csv="labels.csv"), str(tmp_path / "out"), progress=False)
    message = str(error.value)
    assert "labels.csv" in message and "'Filename'" in message and "Filename,ClassId" in message


def test_csv_absolute_path_and_unmatched_glob(tmp_path):
    src = tmp_path / "src"
    _save(src / "a.png", _rgb(), "PNG")
    labels = tmp_path / "elsewhere" / "labels.csv"
    os.makedirs(labels.parent)
    _save(src / "b.png", _rgb(), "PNG")
    labels.write_text("Filename;ClassId\na.png;3\nb.png;4\n")
    result = prepare_dataset(_config(src, labels_csv=str(labels)), str(tmp_path / "out"), progress=False)
    assert result.counts["train"] == {"3": 1, "4": 1}
    with pytest.raises(PrepareError, match="no labels CSV matches"):
        prepare_dataset(_config(src, labels_csv="*/GT-*.csv"), str(tmp_path / "out2"), progress=False)


# ----------------------------------------------------------------------------- rejects


def test_bad_files_are_rejected_with_reasons_and_the_rest_written(tmp_path):
    src = tmp_path / "src"
    _save(src / "a" / "good.png", _rgb(), "PNG")
    _save(src / "a" / "good.jpg", _rgb(8, 8), "JPEG")
    (src / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    full = io.BytesIO()
    _noise(32, 32).save(full, "JPEG")
    (src / "a" / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (src / "a" / "empty.png").write_bytes(b"")
    (src / "a" / "notes.txt").write_text("not an image")
    _save(src / "a" / "heavy.png", _noise(48, 48), "PNG")  # ~7 kB of noise
    _save(src / "a" / "huge.png", Image.new("RGB", (100, 100)), "PNG")  # few bytes, 10k pixels
    _save(src / "b" / "fine.png", _rgb(), "PNG")
    _save(src / "c" / "unlisted.png", _rgb(), "PNG")  # class not in data.classes
    (src / "a" / ".hidden.png").write_bytes(b"junk")  # hidden: skipped
    (src / "a" / "labels.csv").write_text("x")  # CSV: skipped
    (src / "README").write_text("top-level file")  # no class folder

    data = _config(src, classes=["a", "b"], max_file_bytes=4000, max_pixels=5000)
    out = tmp_path / "out"
    result = prepare_dataset(data, output_dir=str(out), progress=False)

    assert sorted(_by_name(_records(out, "train"))) == ["a/good.jpg", "a/good.png", "b/fine.png"]
    assert result.counts["train"] == {"a": 2, "b": 1}
    rejects = _rejects_csv(out)
    assert set(rejects) == {"corrupt.png", "truncated.jpg", "empty.png", "notes.txt", "heavy.png",
                            "huge.png", "unlisted.png", "README"}
    assert rejects["corrupt.png"].startswith(("corrupt image", "not an image"))
    assert rejects["truncated.jpg"].startswith("truncated image: image file is truncated")
    assert rejects["empty.png"] == "empty file (0 bytes)"
    assert rejects["notes.txt"].startswith("not an image")
    assert rejects["heavy.png"].startswith("file too large") and "4000" in rejects["heavy.png"]
    assert rejects["huge.png"].startswith("image too large: 100x100")
    assert rejects["unlisted.png"] == "label 'c' is not in data.classes"
    assert "class folder" in rejects["README"]
    assert len(result.rejects) == 8
    summary = result.summary()
    assert "Rejected files: 8" in summary and "rejects.csv" in summary
    assert "Skipped 1 hidden file (names starting with '.': not read)" in summary
    assert json.loads((out / "summary.json").read_text())["rejects"] == 8
    assert json.loads((out / "summary.json").read_text())["hidden"] == {"files": 1, "folders": 0}
    assert prepare.load_result(str(out)).summary() == summary


def test_truncated_png_is_rejected(tmp_path):
    src = tmp_path / "src"
    data = _save(src / "a" / "t.png", _noise(32, 32), "PNG")
    (src / "a" / "t.png").write_bytes(data[: len(data) * 2 // 3])
    _save(src / "a" / "ok.png", _rgb(), "PNG")
    _save(src / "b" / "ok.png", _rgb(), "PNG")
    result = prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)
    (reject,) = result.rejects
    assert reject[0].endswith("t.png") and reject[1].startswith(("truncated image", "corrupt image"))


# ----------------------------------------------------------------------------- errors


def test_clear_errors(tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        prepare_dataset(_config(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    flat = tmp_path / "flat"
    _save(flat / "a.png", _rgb(), "PNG")
    with pytest.raises(PrepareError, match="no class folders"):
        prepare_dataset(_config(flat), str(tmp_path / "out"), progress=False)
    hollow = tmp_path / "hollow"
    os.makedirs(hollow / "a")
    (hollow / "a" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(PrepareError, match="no images found"):
        prepare_dataset(_config(hollow), str(tmp_path / "out"), progress=False)
    with pytest.raises(PrepareError, match="prepared_dir"):
        prepare_dataset(_config(hollow), progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_refuses_to_replace_a_folder_that_is_not_a_prepared_dataset(tmp_path):
    src = tmp_path / "src"
    _tiny_pngs(src, ["x.png", "y.png"])
    precious = tmp_path / "precious"
    os.makedirs(precious)
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        prepare_dataset(_config(src), str(precious), progress=False)
    with pytest.raises(PrepareError, match="contains the data source"):
        prepare_dataset(_config(src), str(tmp_path), progress=False)
    assert (precious / "thesis.tex").exists()


# ----------------------------------------------------------------------------- splits


def _tiny_pngs(root, names, labels=("a", "b")):
    """Tiny PNGs named ``names``, in the class folders ``labels`` in turn."""
    for i, name in enumerate(names):
        _save(root / labels[i % len(labels)] / name, _rgb(2, 2), "PNG")


def _split_of(out):
    return {r["filename"]: split for split in ("train", "eval") for r in _records(out, split)}


def test_split_is_stable_when_files_are_added(tmp_path):
    src = tmp_path / "src"
    _tiny_pngs(src, [f"img{i:03d}.png" for i in range(30)])
    data = _config(src, eval_fraction=0.5, num_shards=3)
    before = _split_of(prepare_dataset(data, str(tmp_path / "out1"), progress=False).output_dir)
    assert set(before.values()) == {"train", "eval"}

    _tiny_pngs(src, [f"new{i:03d}.png" for i in range(30)])
    after = _split_of(prepare_dataset(data, str(tmp_path / "out2"), progress=False).output_dir)

    assert len(after) == 60
    assert {name: after[name] for name in before} == before
    for name, split in after.items():  # the documented rule, so other tools can reproduce it
        fraction = (int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 11) / 2 ** 53
        assert split == ("eval" if fraction < 0.5 else "train")


def test_empty_split_still_gets_one_shard_and_test_split_is_optional(tmp_path):
    src = tmp_path / "src"
    _tiny_pngs(src, ["x.png", "y.png", "z.png"])
    out = tmp_path / "out"
    result = prepare_dataset(_config(src, num_shards=8), str(out), progress=False)
    assert sorted(os.listdir(out / "train")) == [f"images-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert os.listdir(out / "eval") == ["images-00000-of-00001.tfrecord"]
    assert os.path.getsize(out / "eval" / "images-00000-of-00001.tfrecord") == 0
    assert not (out / "test").exists() and "test" not in result.counts

    test_src = tmp_path / "test"
    _tiny_pngs(test_src, ["t.png"])
    result = prepare_dataset(_config(src, test_source=str(test_src)), str(out), progress=False)
    assert result.counts["test"] == {"a": 1, "b": 0}
    assert _records(out, "test")[0]["filename"] == "a/t.png"


# ----------------------------------------------------------------------------- classes


def test_natural_class_order(tmp_path):
    names = ["10", "2", "1", "class10", "class2", "banana", "Apple"]
    src = tmp_path / "src"
    for name in names:
        _save(src / name / "x.png", _rgb(2, 2), "PNG")
    out = tmp_path / "out"
    result = prepare_dataset(_config(src), str(out), progress=False)
    expected = ["1", "2", "10", "Apple", "banana", "class2", "class10"]
    assert result.classes == expected
    assert (out / "classes.txt").read_text() == "".join(f"{c}\n" for c in expected)
    assert read_classes(str(out)) == expected
    assert list(result.counts["train"]) == expected
    assert sorted(["a10b", "a2b", "a2a"], key=natural_key) == ["a2a", "a2b", "a10b"]

    given = ["class2", "1", "10", "2", "banana", "Apple", "class10", "unused"]
    result = prepare_dataset(_config(src, classes=given), str(out), progress=False)
    assert read_classes(str(out)) == given and result.counts["train"]["unused"] == 0
    assert "no training images: unused" in result.summary()


def test_read_classes_without_prepare(tmp_path):
    with pytest.raises(PrepareError, match="classes.txt"):
        read_classes(str(tmp_path))


# ----------------------------------------------------------------------------- determinism


def _mixed_tree(src, count=24):
    rnd = random.Random(0)
    for i in range(count):
        label = f"c{i % 3}"
        if i % 4 == 0:
            _save(src / label / f"{i}.ppm", _noise(5, 4, seed=i), "PPM")
        elif i % 4 == 1:
            _save(src / label / f"{i}.jpg", _noise(8, 8, seed=i), "JPEG")
        elif i % 4 == 2:
            _save(src / label / f"{i}.png", Image.new("L", (3, 3), rnd.randrange(256)), "PNG")
        else:
            (src / label / f"{i}.png").write_bytes(b"broken")


def test_same_inputs_give_identical_shards_with_one_or_two_workers(tmp_path):
    src = tmp_path / "src"
    _mixed_tree(src)
    data = _config(src, eval_fraction=0.3, num_shards=3)
    out = tmp_path / "out"
    first = prepare_dataset(data, str(out), progress=False)
    shards_first = _shard_bytes(out)
    prepare_dataset(data, str(out), progress=False)  # re-run replaces in place
    assert _shard_bytes(out) == shards_first
    two = prepare_dataset(dataclasses.replace(data, workers=2), str(tmp_path / "out2"), progress=False)
    assert _shard_bytes(tmp_path / "out2") == shards_first
    assert two.counts == first.counts and two.rejects == first.rejects
    assert (out / "rejects.csv").read_bytes() == (tmp_path / "out2" / "rejects.csv").read_bytes()
    assert sum(len(v) > 0 for v in shards_first.values()) >= 3
    assert len(first.rejects) == 6
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == []


def test_rerun_replaces_output_and_failed_run_leaves_old_one(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    _tiny_pngs(src, ["x.png", "y.png", "z.png"], labels=("a", "b", "c"))
    out = tmp_path / "out"
    prepare_dataset(_config(src), str(out), progress=True)
    assert "prepare" in capsys.readouterr().err  # progress bar on stderr
    assert read_classes(str(out)) == ["a", "b", "c"]

    os.remove(src / "c" / "z.png")
    os.rmdir(src / "c")

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(prepare, "_write_metadata", boom)
    with pytest.raises(RuntimeError):
        prepare_dataset(_config(src), str(out), progress=False)
    assert read_classes(str(out)) == ["a", "b", "c"]  # old dataset untouched
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # temp folder removed

    monkeypatch.undo()
    result = prepare_dataset(_config(src), str(out), progress=False)
    assert read_classes(str(out)) == ["a", "b"] and result.counts["train"] == {"a": 1, "b": 1}
    assert json.loads((out / "summary.json").read_text())["counts"]["train"] == {"a": 1, "b": 1}


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not os.path.isdir(GTSRB),
                    reason=f"GTSRB not found at {GTSRB} (set VISIONTUNE_SHARED to the shared/ folder)")
def test_gtsrb_three_classes_with_test_set(tmp_path):
    wanted = {"0", "1", "2"}
    test_csv = tmp_path / "GT-test-subset.csv"
    with open(os.path.join(GTSRB, "test", "GT-final_test.csv"), newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    subset = [r for r in rows[1:] if r[-1] in wanted][:12]
    with open(test_csv, "w", newline="") as f:
        csv.writer(f, delimiter=";").writerows([rows[0]] + subset)

    data = DataConfig(source=os.path.join(GTSRB, "train"), labels_csv="*/GT-*.csv",
                      test_source=os.path.join(GTSRB, "test", "Images"),
                      test_labels_csv=str(test_csv), classes=["0", "1", "2"],
                      eval_fraction=0.3, num_shards=2, workers=1)
    out = tmp_path / "out"
    result = prepare_dataset(data, str(out), progress=False)

    # Other classes are rejected by label, never silently dropped; nothing else is rejected.
    assert all(reason.endswith("is not in data.classes") for _, reason in result.rejects)
    assert {c: result.counts["train"][c] + result.counts["eval"][c] for c in wanted} == \
        {"0": 40, "1": 40, "2": 40}
    assert 0 < sum(result.counts["eval"].values()) < 60
    assert sum(result.counts["test"].values()) == len(subset)
    train = _records(out, "train")
    test = _by_name(_records(out, "test"))
    for record in train + list(test.values()):
        assert record["image_format"] == "png" and record["label"] in wanted
        assert _decode(record).shape == (record["height"], record["width"], 3)
    assert all(r["filename"].startswith(f"0000{r['label']}/") for r in train)
    name, label = subset[0][0], subset[0][-1]
    assert test[name]["label"] == label
    with Image.open(os.path.join(GTSRB, "test", "Images", name)) as ppm:
        assert (_decode(test[name]) == np.asarray(ppm.convert("RGB"))).all()


def test_split_group_regex_keeps_a_group_on_one_side():
    """Frames of one GTSRB track (``CLASS/TRACK_FRAME.ppm``) never straddle train and eval."""
    from visiontune.components.image_listing import split_fraction, split_key

    regex = r"^(\d+/\d+)_"
    tracks = {}
    for track in range(40):
        keys = {split_key(f"00007/{track:05d}_{frame:05d}.ppm", regex) for frame in range(30)}
        assert len(keys) == 1
        tracks[track] = split_fraction(keys.pop()) < 0.3
    assert 0 < sum(tracks.values()) < len(tracks)  # both splits get whole tracks
    # No match: the path itself decides, as without a regex.
    assert split_key("other/file.png", regex) == "other/file.png"
    assert split_key("00007/00001_00002.ppm", "") == "00007/00001_00002.ppm"
