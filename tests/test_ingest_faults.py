"""Inputs that used to slip through ingest: each ends as a reject with a reason, or as one PrepareError.

Files TensorFlow's decoder refuses, link loops, odd class names, CSV paths
leaving the source, hidden files, empty splits, single classes, output
folders that are not ours, and runs stopped by a signal.  Images are a few
pixels wide: these tests run on shared 2-core machines.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import unicodedata
import zlib

import numpy as np
import pytest
import tensorflow as tf  # noqa: E402  (after visiontune: ingest itself must not need TF)
from PIL import Image, ImageFile

from tests.slow_encoding import slow_encoding_env, wait_until_encoding
from visiontune.components import dataset_folder, image_encoding, prepare
from visiontune.components.prepare import PrepareError, prepare_dataset
from visiontune.configs import DataConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers


def _config(source, **kwargs) -> DataConfig:
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("num_shards", 2)
    kwargs.setdefault("eval_fraction", 0.0)
    return DataConfig(source=str(source), **kwargs)


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _noise(width=12, height=10, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _write(path, data: bytes) -> bytes:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "wb") as f:
        f.write(data)
    return data


def _png(img: Image.Image, edit) -> bytes:
    """A PNG of ``img`` whose chunks ``edit([(kind, payload, crc)])`` rewrote (crc None: the right one)."""
    data = _encoded(img, "PNG")
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length], None))
        pos += 12 + length
    out = data[:8]
    for kind, payload, crc in edit(chunks):
        crc = struct.pack(">I", zlib.crc32(kind + payload)) if crc is None else crc
        out += struct.pack(">I", len(payload)) + kind + payload + crc
    return out


def _bad_crc(kind):
    return lambda chunks: [(k, p, b"\0\0\0\0" if k == kind else c) for k, p, c in chunks]


def _jpeg_cut_before_eoi() -> bytes:
    """A JPEG missing its last two bytes (the EOI marker) that Pillow still decodes fully."""
    for seed in range(100):
        data = _encoded(_noise(32, 24 + seed % 5 * 8, seed), "JPEG", quality=95)[:-2]
        if _pillow_decodes(data):
            return data
    raise AssertionError("no JPEG without EOI that Pillow decodes")  # pragma: no cover


def _pillow_decodes(data: bytes) -> bool:
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _tf_decodes(data: bytes) -> bool:
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return False


def _shard_images(output_dir, with_labels=False):
    """(filename, image bytes[, label]) of every example in every shard of every split."""
    out = []
    for split in ("train", "eval", "test"):
        folder = os.path.join(str(output_dir), split)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            for record in tf.data.TFRecordDataset(os.path.join(folder, name)):
                feature = tf.train.Example.FromString(record.numpy()).features.feature
                row = (feature["filename"].bytes_list.value[0].decode(), feature["image"].bytes_list.value[0])
                out.append(row + (feature["label"].bytes_list.value[0].decode(),) if with_labels else row)
    return out


def _ext(data: bytes) -> str:
    return "png" if data.startswith(b"\x89PNG") else "jpg"


def _two_classes(src, names=("x.png", "y.png")):
    for label in ("a", "b"):
        for name in names:
            _write(src / label / name, _encoded(_noise(4, 4, hash((label, name)) % 100), "PNG"))


# ----------------------------------------------------------------------------- 1. TF's decoder


TF_REFUSES = {
    "bad CRC in IDAT": lambda: _png(_noise(), _bad_crc(b"IDAT")),
    "bad CRC in IEND": lambda: _png(_noise(), _bad_crc(b"IEND")),
    "no IEND chunk": lambda: _encoded(_noise(), "PNG")[:-12],
    "zlib stream without its checksum": lambda: _png(
        _noise(), lambda cs: [(k, p[:-4] if k == b"IDAT" else p, c) for k, p, c in cs]),
    "unknown critical chunk": lambda: _png(
        _noise(), lambda cs: cs[:1] + [(b"ABCD", b"xyz", None)] + cs[1:]),
    "grayscale (re-encoded) with bad CRC in IDAT": lambda: _png(_noise(mode="L"), _bad_crc(b"IDAT")),
    "JPEG cut before its EOI marker": _jpeg_cut_before_eoi,
    "JPEG with EOI damaged into RST1": lambda: _encoded(_noise(), "JPEG")[:-1] + b"\xd1",
    "JPEG with EOI replaced by padding": lambda: _encoded(_noise(40, 30), "JPEG")[:-2] + b"\0" * 16,
}
TF_ACCEPTS = {  # odd but fine: kept byte for byte
    "PNG with bad CRC in an ancillary chunk after IDAT": lambda: _png(
        _noise(), lambda cs: cs[:-1] + [(b"tEXt", b"k\0v", b"\0\0\0\0")] + cs[-1:]),
    "PNG with junk after IEND": lambda: _encoded(_noise(), "PNG") + b"junk",
    "PNG split into several IDAT chunks": lambda: _png(_noise(), lambda cs: cs[:1] + [
        (b"IDAT", p[i:i + 7], None) for k, p, _ in cs if k == b"IDAT" for i in range(0, len(p), 7)] + cs[-1:]),
    "progressive JPEG": lambda: _encoded(_noise(), "JPEG", progressive=True),
    "JPEG with restart markers": lambda: _encoded(_noise(), "JPEG", restart_marker_blocks=1),
    "JPEG with junk after EOI": lambda: _encoded(_noise(), "JPEG") + b"junk\xff\xd8",
}


@pytest.mark.parametrize("case", sorted(TF_REFUSES))
def test_tf_decoder_problem_matches_what_tensorflow_refuses(case):
    data = TF_REFUSES[case]()
    assert _pillow_decodes(data), "not a case Pillow lets through"
    assert not _tf_decodes(data)
    fmt = "PNG" if _ext(data) == "png" else "JPEG"
    assert "TensorFlow's decoder refuses it" in image_encoding.tf_decoder_problem(data, fmt)


@pytest.mark.parametrize("case", sorted(TF_ACCEPTS))
def test_tf_decoder_problem_passes_what_tensorflow_reads(case):
    data = TF_ACCEPTS[case]()
    assert _pillow_decodes(data) and _tf_decodes(data)
    fmt = "PNG" if _ext(data) == "png" else "JPEG"
    assert image_encoding.tf_decoder_problem(data, fmt) is None


def _damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` cut, bit-flipped or with a few bytes inserted, past its header."""
    cut = int(rng.integers(len(data) // 2, len(data)))
    kind = int(rng.integers(3))
    if kind == 0:
        return data[:len(data) - int(rng.integers(1, 40))]
    if kind == 1:
        flipped = bytearray(data)
        flipped[cut] ^= 1 << int(rng.integers(8))
        return bytes(flipped)
    return data[:cut] + bytes(rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8)) + data[cut:]


def test_nothing_in_the_shards_fails_tensorflow_decode(tmp_path):
    """Every case above plus 160 randomly damaged files: each shard image decodes with TF."""
    src = tmp_path / "src"
    for i, case in enumerate(sorted(TF_REFUSES)):
        data = TF_REFUSES[case]()
        _write(src / "bad" / f"{i}.{_ext(data)}", data)
    kept = {}
    for i, case in enumerate(sorted(TF_ACCEPTS)):
        data = TF_ACCEPTS[case]()
        kept[f"good/{i}.{_ext(data)}"] = _write(src / "good" / f"{i}.{_ext(data)}", data)
    rng = np.random.default_rng(0)
    for i in range(160):
        fmt, kwargs = [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}),
                       ("JPEG", {"restart_marker_blocks": 1})][i % 4]
        data = _encoded(_noise(16, 12, seed=i), fmt, **kwargs)
        _write(src / "fuzz" / f"{i:03d}.{fmt.lower()}", _damaged(data, rng))

    out = tmp_path / "out"
    result = prepare_dataset(_config(src), str(out), progress=False)

    images = _shard_images(out)
    for filename, image in images:
        tf.io.decode_image(image, channels=3, expand_animations=False)  # raises on any failure
    by_name = dict(images)
    assert not any(name.startswith("bad/") for name in by_name)
    reasons = {os.path.relpath(p, str(src)): r for p, r in result.rejects}
    assert all("TensorFlow's decoder refuses it" in reasons[f"bad/{n}"] for n in os.listdir(src / "bad"))
    assert {name: by_name[name] for name in kept} == kept  # original bytes
    assert sum(name.startswith("fuzz/") for name in by_name) > 20  # damaged files Pillow and TF read


# ----------------------------------------------------------------------------- 2. links


def _link_tree(tmp_path):
    src = tmp_path / "src"
    _two_classes(src)
    outside = tmp_path / "outside"
    _write(outside / "o.png", _encoded(_noise(3, 3), "PNG"))
    return src, outside


LINKS = {
    # name in src/a -> (target relative to src/a, words of the reason)
    "loop_to_source": ("..", "holds the class folder"),
    "loop_to_itself": (".", "holds the class folder"),
    "to_class_b": ("../b", "link into the folder of class 'b'"),
    "image_of_b.png": ("../b/x.png", "link into the folder of class 'b'"),
    "to_outside": ("../../outside", "outside the source folder"),
    "outside.png": ("../../outside/o.png", "outside the source folder"),
    "alias.png": ("x.png", "which is listed itself"),
    "alias_folder": ("../a", "holds the class folder"),
}


@pytest.mark.parametrize("name", sorted(LINKS))
def test_links_never_give_images_another_label(tmp_path, name):
    src, _ = _link_tree(tmp_path)
    target, words = LINKS[name]
    os.symlink(target, src / "a" / name)
    result = prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)

    labels = {name: label for name, _, label in _shard_images(tmp_path / "out", with_labels=True)}
    assert labels == {"a/x.png": "a", "a/y.png": "a", "b/x.png": "b", "b/y.png": "b"}
    assert result.counts["train"] == {"a": 2, "b": 2}
    (reject,) = result.rejects
    assert os.path.basename(reject[0]) in (name, "x.png") and words in reject[1]


def test_linked_class_folders_still_work_but_must_not_overlap(tmp_path):
    src, outside = _link_tree(tmp_path)
    os.symlink(outside, src / "c")  # a class assembled from a link: fine
    os.makedirs(src / ".store")
    _write(src / ".store" / "s.png", _encoded(_noise(5, 5), "PNG"))
    os.symlink("../.store/s.png", src / "b" / "stored.png")  # into a hidden store inside the source
    result = prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)
    assert result.counts["train"] == {"a": 2, "b": 3, "c": 1} and result.rejects == []

    os.symlink("a", src / "kitty")
    with pytest.raises(PrepareError, match="class folders 'a' and 'kitty' are the same folder"):
        prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)


# ----------------------------------------------------------------------------- 3. class names


@pytest.mark.parametrize("bad", ["new\nline", "carriage\rreturn", "tab\there", "bell\x07", "sep\u2028"])
def test_class_folder_names_with_control_characters_are_refused(tmp_path, bad):
    src = tmp_path / "src"
    _two_classes(src)
    _write(src / bad / "z.png", _encoded(_noise(3, 3), "PNG"))
    with pytest.raises(PrepareError, match="control character") as error:
        prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)
    assert repr(bad) in str(error.value)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("first,second", [
    (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")),
    ("cat", "cat "),
    ("cat", " cat"),
])
def test_class_names_alike_up_to_normalisation_or_spaces_are_refused(tmp_path, first, second):
    src = tmp_path / "src"
    for name in (first, second):
        _write(src / name / "z.png", _encoded(_noise(3, 3), "PNG"))
    with pytest.raises(PrepareError, match="differ only by Unicode normalisation") as error:
        prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)
    assert ascii(first) in str(error.value) and ascii(second) in str(error.value)
    # The same in data.classes, and for CSV labels.
    with pytest.raises(PrepareError, match="differ only by"):
        prepare_dataset(_config(src, classes=[first, second]), str(tmp_path / "out"), progress=False)
    flat = tmp_path / "flat"
    _write(flat / "1.png", _encoded(_noise(3, 3), "PNG"))
    _write(flat / "2.png", _encoded(_noise(3, 3), "PNG"))
    (flat / "labels.csv").write_text(f"Filename;ClassId\n1.png;{first}\n2.png;{second}\n", encoding="utf-8")
    if first.strip() == second.strip():
        return  # CSV cells are stripped: the two labels are one
    with pytest.raises(PrepareError, match="differ only by"):
        prepare_dataset(_config(flat, labels_csv="labels.csv"), str(tmp_path / "out"), progress=False)


def test_csv_label_with_a_control_character_is_a_reject(tmp_path):
    src = tmp_path / "src"
    for name in ("1.png", "2.png", "3.png"):
        _write(src / name, _encoded(_noise(3, 3), "PNG"))
    (src / "labels.csv").write_text('Filename;ClassId\n1.png;cat\n2.png;dog\n3.png;"d\x07og"\n')
    result = prepare_dataset(_config(src, labels_csv="labels.csv"), str(tmp_path / "out"), progress=False)
    assert result.classes == ["cat", "dog"]
    (reject,) = result.rejects
    assert reject[0].endswith("3.png") and "control character (U+0007)" in reject[1]


# ----------------------------------------------------------------------------- 4. CSV paths


@pytest.mark.parametrize("row", ["../outside/o.png", "sub/../../outside/o.png", "{outside}/o.png"])
def test_csv_rows_outside_the_source_are_refused(tmp_path, row):
    src = tmp_path / "src"
    outside = tmp_path / "outside"
    _write(outside / "o.png", _encoded(_noise(3, 3), "PNG"))
    for name in ("1.png", "2.png"):
        _write(src / "sub" / name, _encoded(_noise(3, 3), "PNG"))
    row = row.format(outside=outside)
    (src / "labels.csv").write_text(f"Filename;ClassId\nsub/1.png;1\nsub/2.png;2\n{row};1\n")
    result = prepare_dataset(_config(src, labels_csv="labels.csv"), str(tmp_path / "out"), progress=False)
    assert sorted(name for name, _ in _shard_images(tmp_path / "out")) == ["sub/1.png", "sub/2.png"]
    (reject,) = result.rejects
    assert "is outside the source folder" in reject[1] and repr(row) in reject[1]
    assert os.path.normpath(reject[0]) == str(outside / "o.png")


# ----------------------------------------------------------------------------- 5. hidden files


def test_hidden_files_and_folders_are_skipped_but_counted(tmp_path):
    src = tmp_path / "src"
    _two_classes(src)
    _write(src / "a" / ".DS_Store", b"junk")
    _write(src / "b" / "._x.png", b"AppleDouble")
    _write(src / "a" / ".thumbnails" / "t.png", _encoded(_noise(3, 3), "PNG"))
    _write(src / ".git" / "HEAD", b"ref")
    out = tmp_path / "out"
    result = prepare_dataset(_config(src), str(out), progress=False)
    assert result.rejects == [] and result.counts["train"] == {"a": 2, "b": 2}
    assert "Skipped 2 hidden files and 2 hidden folders (names starting with '.': not read)" in result.summary()
    assert json.loads((out / "summary.json").read_text())["hidden"] == {"files": 2, "folders": 2}
    assert prepare.load_result(str(out)).hidden == result.hidden


# ----------------------------------------------------------------------------- 6, 7. empty splits, one class


def _broken(path):
    _write(path, b"\x89PNG\r\n\x1a\n not an image")


def test_empty_splits_are_refused_and_the_previous_dataset_stays(tmp_path):
    src = tmp_path / "src"
    _two_classes(src)
    out = tmp_path / "out"
    prepare_dataset(_config(src), str(out), progress=False)
    before = {n: (out / n).read_bytes() for n in ("classes.txt", "summary.json", "rejects.csv")}

    everything_broken = tmp_path / "broken"
    for label in ("a", "b"):
        _broken(everything_broken / label / "x.png")
    test_broken = tmp_path / "test_broken"
    _broken(test_broken / "a" / "t.png")
    cases = [
        (_config(everything_broken), "no image of the train split could be used: all 2 were rejected"),
        (_config(src, test_source=str(test_broken)), "no image of the test split could be used"),
        (_config(src, eval_fraction=0.01), "the eval split would be empty"),
        (_config(src, eval_fraction=0.99), "the train split would be empty"),
    ]
    for data, message in cases:
        with pytest.raises(PrepareError, match=message) as error:
            prepare_dataset(data, str(out), progress=False)
        assert "\n" not in str(error.value)
        assert {n: (out / n).read_bytes() for n in before} == before
        assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_one_class_and_a_test_source_equal_to_the_source_are_refused(tmp_path):
    src = tmp_path / "src"
    _two_classes(src)
    one = tmp_path / "one"
    _write(one / "cat" / "x.png", _encoded(_noise(3, 3), "PNG"))
    with pytest.raises(PrepareError, match=r"only one class \('cat'\): classification needs at least 2"):
        prepare_dataset(_config(one), str(tmp_path / "out"), progress=False)
    _write(tmp_path / "half" / "a" / "x.png", _encoded(_noise(3, 3), "PNG"))
    _broken(tmp_path / "half" / "b" / "x.png")
    with pytest.raises(PrepareError, match="only class 'a' has training images left"):
        prepare_dataset(_config(tmp_path / "half"), str(tmp_path / "out"), progress=False)
    os.symlink(src, tmp_path / "same")
    for test_source in (str(src), str(tmp_path / "same"), str(src / "a")):
        with pytest.raises(PrepareError, match="test images must not be training images"):
            prepare_dataset(_config(src, test_source=test_source), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
    # One folder with two different label CSVs is a fine layout.
    flat = tmp_path / "flat"
    for name in ("1.png", "2.png", "3.png", "4.png"):
        _write(flat / name, _encoded(_noise(3, 3), "PNG"))
    (flat / "train.csv").write_text("Filename;ClassId\n1.png;a\n2.png;b\n")
    (flat / "test.csv").write_text("Filename;ClassId\n3.png;a\n4.png;b\n")
    result = prepare_dataset(_config(flat, labels_csv="train.csv", test_source=str(flat),
                                     test_labels_csv="test.csv"), str(tmp_path / "out"), progress=False)
    assert result.counts["test"] == {"a": 1, "b": 1}


def test_cli_prints_one_line_and_exits_2_when_every_image_is_rejected(tmp_path):
    for label in ("a", "b"):
        _broken(tmp_path / "src" / label / "x.png")
    run = subprocess.run([sys.executable, "-m", "visiontune.cli", "prepare", "--source", str(tmp_path / "src"),
                          "--output", str(tmp_path / "out"), "--eval-fraction", "0", "--quiet"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (line,) = [line for line in run.stderr.splitlines() if "error:" in line]
    assert "no image of the train split could be used" in line


# ----------------------------------------------------------------------------- 8. output folders


def test_only_our_own_dataset_is_replaced_and_only_our_files_deleted(tmp_path):
    src = tmp_path / "src"
    _two_classes(src)
    looks_like_ours = tmp_path / "looks"
    _write(looks_like_ours / "classes.txt", b"a\nb\n")
    _write(looks_like_ours / "thesis.tex", b"...")
    _write(looks_like_ours / "summary.json", b'{"not": "ours"}')
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        prepare_dataset(_config(src), str(looks_like_ours), progress=False)
    assert sorted(os.listdir(looks_like_ours)) == ["classes.txt", "summary.json", "thesis.tex"]
    assert not prepare.is_prepared(str(looks_like_ours))

    out = tmp_path / "out"
    prepare_dataset(_config(src), str(out), progress=False)
    _write(out / "notes.txt", b"mine")
    _write(out / "plots" / "loss.png", b"mine too")
    _write(out / "test" / "keep.bin", b"")  # old dataset had no test split: test/ is not ours
    with pytest.raises(PrepareError, match="not written by visiontune prepare"):
        prepare_dataset(_config(src), str(out), progress=False)
    os.remove(out / "test" / "keep.bin")
    os.rmdir(out / "test")
    _write(out / "train" / "extra.tfrecord", b"")
    with pytest.raises(PrepareError, match=r"train/extra.tfrecord: not written by visiontune prepare"):
        prepare_dataset(_config(src), str(out), progress=False)
    os.remove(out / "train" / "extra.tfrecord")

    result = prepare_dataset(_config(src, num_shards=1), str(out), progress=False)
    assert (out / "notes.txt").read_bytes() == b"mine" and (out / "plots" / "loss.png").exists()
    assert os.listdir(out / "train") == ["images-00000-of-00001.tfrecord"]  # old 2 shards gone
    assert prepare.is_prepared(str(out)) and result.counts["train"] == {"a": 2, "b": 2}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


# ----------------------------------------------------------------------------- 9. stopped runs

# Loaded by every Python process of the run (the script and Beam's worker processes,
# which inherit PYTHONPATH): a big dataset, in a few seconds, and every process that
# encodes says who it is.
_SLOW_PREPARE = textwrap.dedent("""
    import sys
    from visiontune.components import prepare
    from visiontune.configs import DataConfig

    prepare.prepare_dataset(DataConfig(source=sys.argv[1], workers=2, num_shards=2, eval_fraction=0.0),
                            output_dir=sys.argv[2], progress=False)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, fork and /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_run_leaves_no_temporary_folder_and_no_worker(tmp_path, signum):
    src = tmp_path / "src"
    _two_classes(src, [f"{i:03d}.png" for i in range(40)])
    out = tmp_path / "out"
    prepare_dataset(_config(src), str(out), progress=False)  # the previous dataset
    before = (out / "summary.json").read_bytes()
    (tmp_path / "script.py").write_text(_SLOW_PREPARE)
    pids, env = slow_encoding_env(tmp_path)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "script.py"), str(src), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        encoding = wait_until_encoding(proc, pids)
        # A Beam worker is encoding (the DirectRunner hands each its share of the shards).
        assert encoding and str(proc.pid) not in encoding, proc.communicate()[1].decode()[-2000:]
        assert [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]  # mid-run
        proc.send_signal(signum)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the test fails
            proc.kill()
    assert proc.returncode != 0
    workers = [int(p) for p in os.listdir(pids)]
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if _alive(p)], "worker processes outlived their parent"
    assert (out / "summary.json").read_bytes() == before  # previous dataset untouched
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".out.")]
    if signum == signal.SIGKILL:  # nothing can clean up after SIGKILL: the next run does
        assert leftovers
        prepare_dataset(_config(src), str(out), progress=False)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []
    # SIGINT: Python's KeyboardInterrupt; SIGKILL: Beam's workers report their broken connection as they exit.
    assert "Traceback" not in proc.stderr.read().decode() or signum in (signal.SIGINT, signal.SIGKILL)


@pytest.mark.skipif(dataset_folder.fcntl is None, reason="needs fcntl.flock")
def test_a_run_in_progress_is_not_cleaned_up_by_another(tmp_path):
    src = tmp_path / "src"
    _two_classes(src)
    busy = tmp_path / ".out.tmp-busy"
    busy.mkdir()
    lock = dataset_folder._lock(str(busy))
    try:
        with pytest.raises(PrepareError, match="another visiontune prepare is writing it now"):
            prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)
        assert busy.is_dir()
    finally:
        os.close(lock)
    # A run killed between its two renames: the previous dataset comes back, then is replaced.
    prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)
    os.rename(tmp_path / "out", tmp_path / ".out.old-x")
    _write(busy / "train" / "images-00000-of-00001.tfrecord", b"partial")
    result = prepare_dataset(_config(src), str(tmp_path / "out"), progress=False)
    assert result.counts["train"] == {"a": 2, "b": 2}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_signals_wait_for_the_swap_into_place():
    """SIGINT between the renames that swap a dataset in would leave no output: it waits for them."""
    done, handler = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with dataset_folder.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrived: its handler only noted it
            done.append("renamed")
    assert done == ["renamed"]
    assert signal.getsignal(signal.SIGINT) is handler
