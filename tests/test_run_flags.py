"""``visiontune run``'s own flags: the shortcut flags, ``--json``, ``--prepare``, and data that changed.

The shortcut flags are checked on a cached re-run of the shared GTSRB run
(``first_run`` in conftest.py): the YAML file points everywhere else, so only
flags that win over it (and over ``--set``) find the cached components and the
pushed model.  Preparing runs on the small shapes dataset and stops before any
component runs (see ``_prepare_argv``).
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.conftest import folder_files, gtsrb_config, latest_states, write_shape_tree
from visiontune import cli, configs, features
from visiontune.cli import options
from visiontune.pipeline import local_runner, report

ACCURACY = "sparse_categorical_accuracy"


def _json(out: str):
    return json.loads(out[out.index("{\n"):])


@pytest.mark.e2e
@pytest.mark.shared
def test_shortcut_flags_win_over_the_file_and_set_and_json_prints_the_summary(first_run, gtsrb_slice,
                                                                              tmp_path, capsys, caplog):
    """Also: a report that cannot be written is a warning; the run still succeeds."""
    config, first = first_run
    root, train, test_csv, _ = gtsrb_slice
    # The file: every setting a flag gives below is wrong in it.
    elsewhere = tmp_path / "elsewhere"
    wrong = gtsrb_config(root, train, test_csv)
    data = configs.to_dict(wrong)
    data["pipeline"].update(output_dir=str(elsewhere / "run"), serving_dir=str(elsewhere / "serving"),
                            model_name="wrong")
    data["data"].update(source=str(tmp_path), labels_csv="nothing.csv", test_source=str(tmp_path),
                        test_labels_csv=str(tmp_path / "nothing.csv"), example_gen="tfrecords",
                        prepared_dir=str(elsewhere / "prepared"))
    data["model"].update(backbone="mobilenet", alpha=0.25, weights="none", image_size=96)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    flags = {"--output-dir": config.pipeline.output_dir, "--serving-dir": config.pipeline.serving_dir,
             "--model-name": config.pipeline.model_name, "--source": config.data.source,
             "--labels-csv": config.data.labels_csv, "--test-source": config.data.test_source,
             "--test-labels-csv": config.data.test_labels_csv, "--example-gen": "images",
             "--prepared-dir": config.data.prepared_dir, "--backbone": "mobilenet_v2",
             "--weights": config.model.weights, "--image-size": "48"}
    argv = ["run", "--config", str(config_file), "--set", "model.image_size=64",
            "--set", "model.alpha=0.35", "--json", "--fail-if-not-pushed"]
    for flag, value in flags.items():
        argv += [flag, str(value)]
    assert set(flags) == {flag for flag, _, _ in options.RUN_SHORTCUTS}  # every shortcut flag

    serving_before = folder_files(config.pipeline.serving_dir)
    report_dir = os.path.join(config.pipeline.output_dir, report.REPORT_DIR)
    aside = report_dir + ".aside"
    os.rename(report_dir, aside)
    try:
        with open(report_dir, "w") as f:  # a file where the report folder goes: it cannot be written
            f.write("in the way\n")
        capsys.readouterr()
        code = cli.main(argv)
        out, err = capsys.readouterr()
    finally:
        os.remove(report_dir)
        os.rename(aside, report_dir)

    assert code == 0, err[-3000:]
    summary = _json(out)
    assert summary["pushed"] and summary["pushed_dir"] == first.pushed_dir
    assert summary["model_dir"] == first.model_dir
    assert summary["metrics"][ACCURACY] == pytest.approx(first.metrics[ACCURACY])
    assert [c["name"] for c in summary["per_class"]] == first.classes
    states = latest_states(local_runner.metadata_path(config))
    assert all(states[c] == "CACHED" for c in ("ImageExampleGen", "Transform", "Trainer")), states
    assert folder_files(config.pipeline.serving_dir) == serving_before
    assert not elsewhere.exists()
    saved = json.load(open(os.path.join(config.pipeline.output_dir, features.RUN_SUMMARY_FILE)))
    assert saved == summary
    # The report could not be written: one warning, and the run's outcome stands.
    warnings = [r for r in caplog.records if r.name == "visiontune.report" and r.levelname == "WARNING"]
    assert [r.getMessage().startswith(f"could not write the run report into {report_dir}: FileExistsError")
            for r in warnings] == [True], caplog.text
    assert "Traceback" not in err


def _prepare_argv(source, prepared, tmp_path, *extra):
    """``visiontune run`` reading TFRecords prepared from ``source``.

    ``evaluation.split: test`` with no test set stops the run with exit status
    2 as the pipeline is built, after the dataset is prepared (or found prepared)
    and before any component runs: what these tests check costs no training.
    """
    argv = ["run", "--example-gen", "tfrecords", "--source", source, "--prepared-dir", str(prepared),
            "--output-dir", str(tmp_path / "run"), "--serving-dir", str(tmp_path / "serving"),
            "--weights", "none"]
    for setting in ("data.workers=1", "data.num_shards=1", "evaluation.split=test", *extra):
        argv += ["--set", setting]
    return argv


def _prepared(prepared):
    """(summary.json's bytes and mtime, the split counts) of a prepared folder."""
    path = os.path.join(prepared, features.SUMMARY_FILE)
    with open(path, "rb") as f:
        text = f.read()
    counts = json.loads(text)["counts"]
    return (text, os.stat(path).st_mtime_ns), {split: sum(c.values()) for split, c in counts.items()}


def test_run_prepares_again_when_the_data_settings_change_or_prepare_is_given(tmp_path, capsys):
    source = write_shape_tree(str(tmp_path / "images"), per_class=6, size=24)
    prepared = tmp_path / "prepared"

    def run(*args):
        capsys.readouterr()
        code = cli.main(_prepare_argv(source, prepared, tmp_path, *args))
        err = capsys.readouterr().err
        assert code == 2 and "no test set was prepared" in err, err[-2000:]
        return _prepared(prepared)

    stamp, counts = run("data.eval_fraction=0.25")
    assert counts["train"] + counts["eval"] == 18 and counts["eval"] < counts["train"]
    # The same settings: the prepared dataset is used as it is.
    assert run("data.eval_fraction=0.25") == (stamp, counts)
    # Another eval fraction must not silently reuse the old split.
    stamp2, counts2 = run("data.eval_fraction=0.5")
    assert stamp2 != stamp and counts2["eval"] > counts["eval"]
    # --prepare: prepared again, though nothing changed.
    args = _prepare_argv(source, prepared, tmp_path, "data.eval_fraction=0.5") + ["--prepare"]
    assert cli.main(args) == 2
    stamp3, counts3 = _prepared(prepared)
    assert stamp3[1] != stamp2[1] and counts3 == counts2


def test_prepare_flag_is_refused_with_images_in(tmp_path, capsys):
    source = write_shape_tree(str(tmp_path / "images"), per_class=2, size=24)
    assert cli.main(["run", "--prepare", "--source", source, "--output-dir", str(tmp_path / "run"),
                     "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "--prepare: only with data.example_gen 'tfrecords'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
