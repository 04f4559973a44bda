"""What a user can get wrong, through the real command line: exit status 2 and one line.

The line names the file, key or value and the problem; no traceback, no
internal temporary folder (``.NAME.tmp-*``), nothing left behind.  Ctrl-C
stops a command with one line saying what it left, exit status 130.  Images
are a few pixels wide: these tests run on shared 2-core machines.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from PIL import Image

from tests.slow_encoding import slow_encoding_env, wait_until_encoding
from visiontune.cli import interrupts
from visiontune.errors import disk_problem

VISIONTUNE = [sys.executable, "-m", "visiontune.cli"]
LINUX = sys.platform.startswith("linux")


def _run(args, cwd, timeout=180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(VISIONTUNE + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd), **kwargs)


def _one_line(result: subprocess.CompletedProcess, command: str, status: int = 2) -> str:
    """The one line a refused command printed (asserting there is nothing else)."""
    assert result.returncode == status, result.stdout + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"visiontune {command}: "), lines[0]
    assert ".tmp-" not in lines[0] and ".old-" not in lines[0], lines[0]
    assert len(lines[0]) < 1000, lines[0][:3000]
    return lines[0]


def _png(path, seed=0, side=4) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.effect_noise((side, side), 40 + seed).convert("RGB").save(str(path), format="PNG")


def _images(tmp, per_class=3) -> str:
    """A class-per-folder tree: classes a and b."""
    for label in ("a", "b"):
        for i in range(per_class):
            _png(tmp / "images" / label / f"{i}.png", seed=i)
    return str(tmp / "images")


def _flat(tmp, csv_bytes: bytes) -> str:
    """Four images in one folder, labelled by ``labels.csv`` (``csv_bytes``)."""
    for i in range(1, 5):
        _png(tmp / "flat" / f"{i}.png", seed=i)
    (tmp / "flat" / "labels.csv").write_bytes(csv_bytes)
    return str(tmp / "flat")


def _prepared_without_eval(tmp) -> str:
    from visiontune.components import prepare
    from visiontune.configs import DataConfig

    out = str(tmp / "prepared")
    prepare.prepare_dataset(DataConfig(source=_images(tmp), eval_fraction=0.0, num_shards=1, workers=1),
                            out, progress=False)
    return out


def _prepare_images(*extra):
    """The arguments (a function of tmp_path) of ``prepare`` of a small tree into ``out``, then ``extra``."""
    return lambda t: ["prepare", "--source", _images(t), "--output", t / "out", *extra]


def _below_a_file(tmp) -> str:
    (tmp / "afile").write_text("not a folder")
    return str(tmp / "afile" / "out")


# (id, arguments (a function of tmp_path), words of the one line)
CASES = [
    ("labels_csv_in_latin1", lambda t: [
        "prepare", "--source", _flat(t, "Filename;ClassId\n1.png;café\n2.png;thé\n3.png;café\n4.png;thé\n"
                                        .encode("latin-1")),
        "--labels-csv", "labels.csv", "--output", t / "out"],
     "labels.csv line 2: not UTF-8 text (byte 0xe9); save the CSV as UTF-8"),
    ("labels_csv_with_a_nul_byte", lambda t: [
        "prepare", "--source", _flat(t, b"Filename;ClassId\n1.png;a\n2.png;b\x00\n3.png;a\n4.png;b\n"),
        "--labels-csv", "labels.csv", "--output", t / "out"],
     "labels.csv line 3: not a readable CSV: line contains NUL"),
    ("config_not_utf8", lambda t: [
        "prepare", "--config", _write(t / "config.yaml", b"data:\n  source: caf\xe9\n"), "--output", t / "out"],
     "config.yaml:2: cannot read config: not UTF-8 text (byte 0xe9); save it as UTF-8"),
    ("config_alias_bomb", lambda t: ["prepare", "--output", t / "out", "--config", _write(t / "config.yaml", (
        "data:\n  classes: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"  {key}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for key, a, b in (
            ("prepared_dir", "a", "b"), ("csv_delimiter", "b", "c"), ("filename_column", "c", "d"),
            ("label_column", "d", "e"), ("test_source", "e", "f"), ("source", "f", "g")))).encode())],
     "config.yaml:4: data.csv_delimiter: got [[[...], [...], [...], [...], [...], [...], ...], "),
    ("config_is_a_folder", lambda t: ["prepare", "--config", t, "--output", t / "out"],
     "cannot read config: Is a directory"),
    ("set_without_a_key", _prepare_images("--set", "=5"),
     "--set '=5': expected section.key=value, e.g. training.batch_size=16"),
    ("set_without_a_value", _prepare_images("--set", "data.eval_fraction"),
     "--set 'data.eval_fraction': expected section.key=value"),
    ("set_with_an_empty_key", _prepare_images("--set", "data..eval_fraction=0.5"),
     "--set 'data..eval_fraction=0.5': expected section.key=value"),
    ("set_below_a_value", lambda t: ["prepare", "--output", t / "out", "--set", "data.source.x=1"],
     "data.source: got {'x': 1}, expected a string"),
    ("set_below_a_value_set_before", lambda t: ["prepare", "--output", t / "out", "--set", "data.source=images",
                                                "--set", "data.source.x=1"],
     "--set 'data.source.x=1': data.source is a value, not a section"),
    ("set_unknown_section", _prepare_images("--set", "datta.source=x"),
     "datta: unknown setting(s) datta (did you mean data?)"),
    ("split_group_regex_invalid", _prepare_images("--set", "data.split_group_regex=(["),
     "data.split_group_regex: got '([', which is not a valid regular expression"),
    ("output_below_a_file", lambda t: ["prepare", "--source", _images(t), "--output", _below_a_file(t)],
     "data.prepared_dir: {tmp}/afile/out: cannot be a folder: {tmp}/afile is a file"),
    ("run_output_below_a_file", lambda t: ["run", "--source", _images(t), "--output-dir", _below_a_file(t)],
     "pipeline.output_dir: {tmp}/afile/out: cannot be a folder: {tmp}/afile is a file"),
    ("run_serving_dir_below_a_file", lambda t: ["run", "--source", _images(t), "--output-dir", t / "run",
                                                "--serving-dir", _below_a_file(t)],
     "pipeline.serving_dir: {tmp}/afile/out: cannot be a folder"),
    ("run_without_an_eval_split", lambda t: ["run", "--source", _images(t), "--output-dir", t / "run",
                                             "--set", "data.eval_fraction=0"],
     "data.eval_fraction: got 0, expected a number in (0, 1) to run the pipeline"),
    ("compare_without_an_eval_split", lambda t: [
        "compare", "--backbones", "mobilenet_v2", "--set", f"data.source={_images(t)}", "--set",
        "data.eval_fraction=0", "--output-dir", t / "compare"],
     "data.eval_fraction: got 0, expected a number in (0, 1) to run the pipeline"),
    ("demo_output_below_a_file", lambda t: ["demo", "--output-dir", _below_a_file(t)],
     "--output-dir: {tmp}/afile/out: cannot be a folder: {tmp}/afile is a file"),
    ("report_output_below_a_file", lambda t: ["report", t / "run", "--output", _below_a_file(t)],
     "--output: {tmp}/afile/out: cannot be a folder: {tmp}/afile is a file"),
    ("run_on_prepared_data_without_an_eval_split", lambda t: [
        "run", "--set", "data.example_gen=tfrecords", "--prepared-dir", _prepared_without_eval(t),
        "--output-dir", t / "run"],
     "data.prepared_dir: {tmp}/prepared has no eval split"),
]
if LINUX:
    CASES.append(("output_where_no_folder_can_be", lambda t: [
        "prepare", "--source", _images(t), "--output", "/proc/visiontune-none/out"],
        "/proc/visiontune-none/out: cannot create the output folder: No such file or directory"))


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("arguments, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_mistake_is_one_line_and_status_2(tmp_path, arguments, words):
    args = arguments(tmp_path)
    before = sorted(os.listdir(tmp_path))
    line = _one_line(_run(args + (["--quiet"] if args[0] == "prepare" else []), cwd=tmp_path), args[0])
    assert words.replace("{tmp}", str(tmp_path)) in line, line
    assert sorted(os.listdir(tmp_path)) == before, "something was written"


# ----------------------------------------------------------------------------- folders one cannot write


def _namespace_mounts() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in its own namespaces."""
    if not LINUX or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


NAMESPACES = _namespace_mounts()


def _in_namespace(script: str, cwd) -> subprocess.CompletedProcess:
    """``script`` (sh) in new user and mount namespaces, where it may mount a tmpfs of its own."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=str(cwd))


@pytest.mark.skipif(not NAMESPACES and (not LINUX or os.geteuid() == 0),
                    reason="needs unshare -rm (a read-only tmpfs) or a user that folder permissions stop")
def test_a_folder_one_cannot_write_is_refused_before_any_work(tmp_path):
    source = _images(tmp_path)
    (tmp_path / "locked").mkdir()
    command = " ".join(VISIONTUNE + ["prepare", "--source", source, "--output", str(tmp_path / "locked" / "out"),
                                     "--quiet"])
    if NAMESPACES:  # read-only even to root, as a read-only mount is
        result = _in_namespace(f"mount -t tmpfs -o ro tmpfs {tmp_path / 'locked'} && exec {command}", tmp_path)
        why = "is on a read-only file system"
    else:
        os.chmod(tmp_path / "locked", 0o555)
        result = subprocess.run(command.split(), capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
        os.chmod(tmp_path / "locked", 0o755)
        why = "is not writable by this user"
    line = _one_line(result, "prepare")
    assert f"data.prepared_dir: {tmp_path}/locked/out: cannot write there: {tmp_path}/locked {why}" in line
    assert os.listdir(tmp_path / "locked") == []


def _big_images(tmp) -> str:
    """40 noise images of 40x40: about 200 KB of shards, more than the full disks below hold."""
    for label in ("a", "b"):
        for i in range(20):
            _png(tmp / "big" / label / f"{i}.png", seed=i, side=40)
    return str(tmp / "big")


FULL_DISKS = ["tmpfs", "file_size_limit"]


@pytest.mark.skipif(not LINUX, reason="tmpfs and RLIMIT_FSIZE")
@pytest.mark.parametrize("disk", FULL_DISKS)
def test_a_full_disk_is_one_line_and_the_previous_dataset_stays(tmp_path, disk):
    """Two real full disks: a 64 KiB tmpfs (ENOSPC, in a namespace of our own) and ``ulimit -f``.

    The file size limit (EFBIG; SIGXFSZ ignored, as a shell's ``ulimit -f``
    with a trap does) needs no privilege and fails the same writes; the tmpfs
    is the disk itself filling up.
    """
    small, big = _images(tmp_path), _big_images(tmp_path)
    prepare = VISIONTUNE + ["prepare", "--eval-fraction", "0.3", "--workers", "1", "--quiet"]
    if disk == "tmpfs":
        if not NAMESPACES:
            pytest.skip("unshare -rm cannot mount a tmpfs here")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        out = mnt / "out"
        script = textwrap.dedent(f"""\
            mount -t tmpfs -o size=64k tmpfs {mnt} || exit 99
            {' '.join(prepare)} --source {small} --output {out} > /dev/null || exit 98
            cp {out}/summary.json {tmp_path}/before.json
            {' '.join(prepare)} --source {big} --output {out}
            status=$?
            cp {out}/summary.json {tmp_path}/after.json
            ls -A {mnt} > {tmp_path}/listing.txt
            exit $status
            """)
        result = _in_namespace(script, tmp_path)
        assert result.returncode not in (98, 99), result.stderr[-3000:]
        words = "No space left on device; free some space, or choose a folder on another disk"
        listing = (tmp_path / "listing.txt").read_text().split()
        before, after = (tmp_path / "before.json").read_text(), (tmp_path / "after.json").read_text()
    else:
        out = tmp_path / "out"
        subprocess.run(prepare + ["--source", small, "--output", str(out)], check=True, capture_output=True,
                       timeout=180, cwd=str(tmp_path))
        before = (out / "summary.json").read_text()

        def limit_file_size():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

        result = subprocess.run(prepare + ["--source", big, "--output", str(out), "--set", "data.num_shards=1"],
                                capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
                                preexec_fn=limit_file_size)
        words = "File too large; a file would be larger than this process may write (ulimit -f)"
        listing = os.listdir(tmp_path)
        listing = [n for n in listing if n.startswith(".")]
        after = (out / "summary.json").read_text()
    line = _one_line(result, "prepare")
    assert line == f"visiontune prepare: error: {out}: cannot write: {words}" + line.split(words)[1], line
    assert line.endswith(f"; {out} is left as it was"), line
    assert after == before  # the previous dataset, untouched
    assert [n for n in listing if n.startswith(".")] == []  # no temporary folder left behind


@pytest.mark.skipif(not NAMESPACES, reason="needs unshare -rm to mount a tmpfs")
@pytest.mark.parametrize("size", ["64k", "400k"])  # full as ML Metadata's database grows / as examples are written
def test_a_full_disk_during_run_is_one_error_line(tmp_path, size):
    big, mnt = _big_images(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    run = VISIONTUNE + ["run", "--source", big, "--output-dir", str(mnt / "run"), "--serving-dir",
                        str(mnt / "serving"), "--set", "data.workers=1", "--weights", "none", "--image-size", "32"]
    result = _in_namespace(f"mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99\n{' '.join(run)}", tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # Besides the progress lines ("[1/9] ImageExampleGen FAILED after ...: RuntimeError: ..."): one line.
    errors = [line for line in result.stderr.splitlines() if not re.match(r"\[\d+/\d+\] |running pipeline ", line)]
    assert errors == [f"visiontune run: error: {mnt / 'run'}: cannot write: No space left on device; free some "
                      "space, or choose a folder on another disk"], result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == errors[0]


# ----------------------------------------------------------------------------- Ctrl-C



@pytest.mark.skipif(not LINUX, reason="process groups and /proc")
@pytest.mark.parametrize("workers, to", [(1, "group"), (2, "group"), (2, "process")])
def test_ctrl_c_during_prepare_stops_with_one_line_and_keeps_the_previous_dataset(tmp_path, workers, to):
    """SIGINT to the process group, as a terminal's Ctrl-C sends it, or to the command alone.

    With Beam's worker processes (workers 2) the group's SIGINT reaches them
    too: they ignore it (else each printed its own KeyboardInterrupt
    traceback), and the command stops them.
    """
    source = _images(tmp_path, per_class=30)
    out = tmp_path / "out"
    _run(["prepare", "--source", source, "--output", out, "--quiet"], cwd=tmp_path).check_returncode()
    before = (out / "summary.json").read_bytes()
    pids, env = slow_encoding_env(tmp_path)  # every process of the command that encodes says so, slowly
    proc = subprocess.Popen(VISIONTUNE + ["prepare", "--source", source, "--output", str(out), "--quiet",
                                          "--workers", str(workers), "--set", "data.num_shards=2"],
                            env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert wait_until_encoding(proc, pids), proc.communicate()[1][-3000:]
        if to == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the test fails
            os.killpg(proc.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = _one_line(result, "prepare", status=130)
    assert line == f"visiontune prepare: stopped (Ctrl-C): {out} is left as it was, no temporary folder stays"
    assert (out / "summary.json").read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_ctrl_c_is_raised_again_when_a_library_swallows_it():
    """AutoGraph swallowed a KeyboardInterrupt while converting the Trainer's step: the run went on."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    swallowed = []
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with interrupts.delivered(retry_seconds=0.2):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                swallowed.append("once")  # as a library's broad except would
            time.sleep(5)  # the work going on
    assert swallowed == ["once"] and time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_is_not_raised_again_once_handled():
    with interrupts.delivered(retry_seconds=0.1):
        pass
    time.sleep(0.3)  # a retry would raise KeyboardInterrupt here
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------- disk failures in their wrappers


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_found_inside_beams_wrapper_and_nothing_else_is():
    """/dev/full: every write fails with ENOSPC.  Beam re-raises it as a RuntimeError holding its text."""
    import apache_beam as beam

    def write(_):
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 65536)

    with pytest.raises(Exception) as error:
        with beam.Pipeline(runner="DirectRunner") as pipeline:
            _ = pipeline | beam.Create([1]) | beam.Map(write)
    assert not isinstance(error.value, OSError)  # wrapped
    assert disk_problem(error.value, ["/data/out"]) == (
        "/data/out: cannot write: No space left on device; free some space, or choose a folder on another disk")

    # A file inside the output, or inside a temporary folder beside it, is named by the output.
    for name in ("/data/out/train/x.tfrecord", "/data/.out.tmp-abc123/train/x.tfrecord"):
        assert disk_problem(OSError(28, "No space left on device", name), ["/data/out"]).startswith("/data/out: ")
    # TensorFlow's file system: "PATH; strerror".
    assert disk_problem(RuntimeError("PermissionDeniedError: /srv/models; Permission denied"), ["/data/out"]) \
        .startswith("/srv/models: cannot write: Permission denied; ")
    # Not the disk: a bug, left to its traceback.
    assert disk_problem(RuntimeError("no luck")) is None
    assert disk_problem(FileNotFoundError(2, "No such file or directory", "/data/x")) is None


def test_transform_names_a_missing_image_feature():
    """What reaches Transform when a split had no examples (SchemaGen then infers no features)."""
    from visiontune.components import transform
    from visiontune.errors import UserError

    with pytest.raises(UserError, match=r"^Transform: the examples have no 'image' feature \(they have none\): "
                                        "a split without examples"):
        transform.preprocessing_fn({}, {"image_size": 32, "classes": ["a", "b"]})


def test_library_errors_wait_for_the_outcome():
    """Beam logs a worker's failure (with its traceback) before raising it: shown only if we do not say it."""
    import io
    import logging
    import threading

    from visiontune import cli

    for said in (True, False):
        held, hook = cli._HeldErrors(), threading.excepthook
        handler = logging.StreamHandler(io.StringIO())
        handler.setFormatter(cli._QuietFormatter("%(levelname)s %(name)s: %(message)s"))
        held.hold(handler)
        ours = logging.LogRecord("visiontune.progress", logging.INFO, __file__, 1, "[1/9] Trainer ...", None, None)
        beams = logging.LogRecord("apache_beam.runners.common", logging.ERROR, __file__, 1, "OSError: [Errno 28]",
                                  None, None)
        assert held.filter(ours) and not held.filter(beams)
        thread = threading.Thread(target=lambda: 1 / 0, name="beam_control_read")
        thread.start()
        thread.join()
        held.release(show=not said)
        assert threading.excepthook is hook  # put back
        shown = handler.stream.getvalue()
        if said:  # our one line says it: their records go
            assert shown == ""
        else:  # success, or a bug's traceback: shown as they would have been
            assert "ERROR apache_beam.runners.common: OSError: [Errno 28]" in shown
            assert "Exception in thread beam_control_read:" in shown and "ZeroDivisionError" in shown
        assert held.held == []
