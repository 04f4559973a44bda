"""``visiontune report``: the HTML report of a real run, checked against the run's own numbers.

The end-to-end tests build it from the shared GTSRB run (``first_run`` in
conftest.py; no second training), from a snapshot of that run's metadata taken
right after it, so later runs into the same output dir do not change what is
checked.  Rendering needs Debian's ``chromium`` (installed by ``.ci/run``).
"""

from __future__ import annotations

import base64
import html.parser
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import GTSRB_CLASSES, MOBILENET_V2_035, gtsrb_settings, latest_states, require_shared
from visiontune import cli
from visiontune.pipeline import report

EMBEDDED_PNG = '<img src="data:image/png;base64,'


class _Tables(html.parser.HTMLParser):
    """Every <table> of a page as rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str):
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def table_with_header(page: str, header):
    found = [t for t in tables(page) if t and t[0] == list(header)]
    assert found, f"no table with header {header}"
    return found[0][1:]


def tfma_figures(evaluation_dir: str):
    """Overall and per-class (by class id) metrics straight from TFMA's output."""
    import tensorflow_model_analysis as tfma

    overall, per_class = {}, {}
    for slice_metrics in tfma.load_metrics(evaluation_dir):
        if slice_metrics.slice_key.single_slice_keys:
            continue
        for kv in slice_metrics.metric_keys_and_values:
            if kv.key.model_name == "baseline" or kv.key.is_diff or not kv.value.HasField("double_value"):
                continue
            if kv.key.sub_key.HasField("class_id"):
                per_class.setdefault(kv.key.sub_key.class_id.value, {})[kv.key.name] = \
                    kv.value.double_value.value
            else:
                overall[kv.key.name] = kv.value.double_value.value
    return overall, per_class


# --------------------------------------------------------------------------- without a run


def test_report_of_a_folder_without_a_run_is_one_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no metadata.sqlite" in err and "Traceback" not in err


def test_confused_pairs_are_most_frequent_first_with_shares():
    matrix = [[5, 3, 0], [1, 6, 0], [0, 3, 1]]
    pairs = report.confused_pairs(matrix, ["a", "b", "c"])
    # Ties in count: the larger share of its true class first.
    assert pairs == [("c", "b", 3, 3 / 4), ("a", "b", 3, 3 / 8), ("b", "a", 1, 1 / 7)]


def test_page_escapes_names_and_lists_rejects_and_missing_parts():
    names = ["<b>stop</b>", "a & b"]
    data = {"output_dir": "/runs/x", "created": "now", "eval_split": "eval", "classes": names,
            "problems": ["training history: no history.json from the Trainer"],
            "counts": {"train": {names[0]: 3, names[1]: 4}, "eval": {names[0]: 1, names[1]: 2}},
            "rejects": [["img/bad.png", "truncated"]],
            "per_class": [{"name": n, "precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 2}
                          for n in names],
            "summary": {"pushed": False, "blessed": False, "pushed_dir": "", "reasons": ["too low"],
                        "metrics": {"sparse_categorical_accuracy": 0.375},
                        "baseline_metrics": {"sparse_categorical_accuracy": 0.5}},
            "model": {"backbone": "vgg16", "image_size": 64, "params": {"total": 1234567}}}
    page = report.render_html(data, {"x.png": b"\x89PNG"})
    assert "<b>stop</b>" not in page and "&lt;b&gt;stop&lt;/b&gt;" in page and "a &amp; b" in page
    rows = table_with_header(page, ["class", "precision", "recall", "F1", "support"])
    assert rows[0] == ["<b>stop</b>", "0.5000", "0.2500", "0.3333", "2"]
    assert table_with_header(page, ["file", "reason"]) == [["img/bad.png", "truncated"]]
    assert ["sparse_categorical_accuracy", "0.3750", "0.5000", "-0.1250"] in \
        table_with_header(page, ["metric", "this model", "baseline", "change"])
    assert "no history.json" in page and "too low" in page and "1,234,567" in page
    assert "not available" in page  # figures that were not built say so


def test_page_escapes_a_script_in_a_class_name():
    evil = "<script>alert('x')</script>"
    data = {"output_dir": "/runs/<script>", "created": "now", "eval_split": "eval", "classes": [evil, "ok"],
            "problems": [], "counts": {"train": {evil: 3, "ok": 4}},
            "per_class": [{"name": n, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for n in (evil, "ok")],
            "confused_pairs": [[evil, "ok", 2, 0.5]],
            "mistakes": {"checked": 7, "total": 7, "wrong": 1,
                         "shown": [{"filename": evil, "true": evil, "predicted": "ok", "confidence": 0.9}]},
            "summary": {"pushed": False, "blessed": False, "pushed_dir": "", "reasons": [evil],
                        "metrics": {}, "baseline_metrics": {}},
            "model": {"backbone": evil}}
    page = report.render_html(data, {})
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(" in page
    assert table_with_header(page, ["class", "train"])[0] == [evil, "3"]
    assert table_with_header(page, ["class", "precision", "recall", "F1", "support"])[0][0] == evil
    assert table_with_header(page, ["true", "predicted", "count", "share of true class"])[0][:2] == [evil, "ok"]
    assert table_with_header(page, ["file", "true", "predicted", "confidence"])[0][:2] == [evil, evil]


# --------------------------------------------------------------------------- from a real run


@pytest.fixture(scope="module")
def built_report(first_run_snapshot, tmp_path_factory):
    """``visiontune report`` of the first run (via the CLI): (report dir, index.html text, report.json)."""
    out = str(tmp_path_factory.mktemp("report"))
    assert cli.main(["report", first_run_snapshot, "--output", out]) == 0
    with open(os.path.join(out, report.INDEX_FILE), encoding="utf-8") as f:
        page = f.read()
    with open(os.path.join(out, report.DATA_FILE), encoding="utf-8") as f:
        data = json.load(f)
    return out, page, data


@pytest.mark.e2e
@pytest.mark.shared
def test_run_writes_its_report_at_the_end(first_run, first_run_snapshot):
    config, summary = first_run
    index = os.path.join(first_run_snapshot, "report", report.INDEX_FILE)  # as the run left it
    assert os.path.exists(index)
    page = open(index, encoding="utf-8").read()
    assert page.count(EMBEDDED_PNG) >= 6
    accuracy = table_with_header(page, ["metric", "value"])
    expected = summary.metrics["sparse_categorical_accuracy"]
    assert ["sparse_categorical_accuracy", f"{expected:.4f}"] in accuracy


@pytest.mark.e2e
@pytest.mark.shared
def test_a_report_of_the_same_outcome_is_kept_and_another_is_rebuilt(first_run, first_run_snapshot):
    """A fully cached re-run keeps the report (rebuilding re-runs the model over the eval split)."""
    from visiontune.pipeline import local_runner

    summary = json.load(open(os.path.join(first_run_snapshot, "run_summary.json")))
    assert report.is_current(first_run_snapshot, summary)
    assert not report.is_current(first_run_snapshot, {**summary, "pushed_dir": "elsewhere"})

    config, _ = first_run
    out = config.pipeline.output_dir
    index = os.path.join(out, report.REPORT_DIR, report.INDEX_FILE)
    local_runner.run(config)  # the Evaluator may run (a new baseline); then nothing is left to run
    before = _file_state(index)
    again = local_runner.run(config).to_json()
    states = latest_states(local_runner.metadata_path(config))
    assert {s for c, s in states.items() if c != "Resolver"} == {"CACHED"}, states  # a Resolver always runs
    assert _file_state(index) == before  # kept: not even rewritten
    # Another outcome: the report is built again, for the run's actual outcome.
    assert local_runner.write_report(out, {**again, "pushed_dir": "elsewhere"}) == index
    assert _file_state(index)[1] != before[1]
    assert report.is_current(out, again)


def _file_state(path):
    """(content, mtime in ns) of a file."""
    with open(path, "rb") as f:
        return f.read(), os.stat(path).st_mtime_ns


@pytest.mark.e2e
@pytest.mark.shared
def test_report_numbers_are_tfmas(built_report, first_run):
    _, summary = first_run
    _, page, data = built_report
    overall, per_class = tfma_figures(summary.evaluation_dir)
    assert data["summary"]["evaluation_dir"] == summary.evaluation_dir

    shown = dict(map(tuple, table_with_header(page, ["metric", "value"])))
    for name in ("sparse_categorical_accuracy", "top_k_accuracy"):
        assert shown[name] == f"{overall[name]:.4f}", name
        assert data["summary"]["metrics"][name] == overall[name]
    assert float(shown["example_count"]) == overall["example_count"] == 120

    # Per class: names in class order, arg-max precision/recall/F1 and support from TFMA's
    # confusion matrix; equal to TFMA's own per-class metrics for every class the model
    # predicts at least once (TFMA credits a never-predicted class with recall 1).
    rows = table_with_header(page, ["class", "precision", "recall", "F1", "support"])
    assert [r[0] for r in rows] == GTSRB_CLASSES
    matrix = np.array(summary.confusion_matrix)
    for class_id, row in enumerate(rows):
        tp, predicted, actual = matrix[class_id, class_id], matrix[:, class_id].sum(), matrix[class_id].sum()
        expected = (tp / predicted if predicted else 0.0, tp / actual if actual else 0.0,
                    2 * tp / (predicted + actual) if predicted + actual else 0.0)
        assert row[1:4] == [f"{v:.4f}" for v in expected], row
        assert int(row[4]) == actual
        exact = data["per_class"][class_id]
        assert (exact["precision"], exact["recall"], exact["f1"]) == pytest.approx(expected)
        if predicted:
            tfma_row = per_class[class_id]
            assert row[1:4] == [f"{tfma_row[k]:.4f}" for k in ("precision", "recall", "f1_score")], row
    assert sum(int(r[4]) for r in rows) == overall["example_count"] == 120

    # Every class name, with its counts per split from the prepared dataset.
    counts = table_with_header(page, ["class", "train", "eval", "test"])
    assert [r[0] for r in counts[:-1]] == GTSRB_CLASSES
    assert sum(int(r[3]) for r in counts[:-1]) == 120
    assert data["sample_classes"] == GTSRB_CLASSES  # sample images of every class

    # The most-confused pairs are the confusion matrix's largest off-diagonal cells.
    off = [(int(matrix[t, p]), GTSRB_CLASSES[t], GTSRB_CLASSES[p])
           for t in range(len(GTSRB_CLASSES)) for p in range(len(GTSRB_CLASSES)) if t != p and matrix[t, p]]
    if off:
        pairs = table_with_header(page, ["true", "predicted", "count", "share of true class"])
        assert int(pairs[0][2]) == max(off)[0]

    # The misclassified images come from running the exported model over the same
    # 120 test examples: as many as TFMA's confusion matrix has off the diagonal.
    mistakes = data["mistakes"]
    assert mistakes["checked"] == mistakes["total"] == 120
    assert mistakes["wrong"] == matrix.sum() - np.trace(matrix)
    for m in mistakes["shown"]:
        assert m["true"] in GTSRB_CLASSES and m["predicted"] in GTSRB_CLASSES and m["true"] != m["predicted"]
        assert 0 < m["confidence"] <= 1

    # Training: one row per epoch of both phases; model facts from the export.
    history = table_with_header(page, ["phase", "epoch", "loss", "accuracy", "eval loss", "eval accuracy",
                                       "learning rate", "s/epoch", "s/step", "trainable params"])
    assert [r[0] for r in history] == ["warmup"] * 3 + ["fine_tune"] * 3
    facts = dict(map(tuple, [r for t in tables(page) for r in t if len(r) == 2]))
    assert facts["backbone"] == "mobilenet_v2" and facts["input size"] == "48 × 48 px"
    assert facts["parameters, total"] == f"{data['model']['params']['total']:,}"
    assert "SavedModel size" in facts and "strategy" in facts
    assert ("Blessed: <b>yes</b>" in page) == summary.blessed


@pytest.mark.e2e
@pytest.mark.shared
def test_report_is_self_contained_with_its_pngs_embedded(built_report):
    out, page, _ = built_report
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert {"class_counts.png", "samples.png", "training.png", "confusion_counts.png",
            "confusion_normalised.png", "misclassified.png"} <= set(pngs)
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(pngs) == page.count(EMBEDDED_PNG)
    on_disk = {open(os.path.join(out, f), "rb").read() for f in pngs}
    assert {base64.b64decode(b) for b in embedded} == on_disk
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere


@pytest.mark.e2e
@pytest.mark.shared
def test_report_takes_the_runs_config_or_its_metadata_sqlite_and_a_cap_on_examples(
        built_report, first_run_snapshot, gtsrb_slice, tmp_path):
    import yaml

    from visiontune import configs

    _, _, full = built_report
    root, train, test_csv, _ = gtsrb_slice
    # The run's config, its output dir being the snapshot of the first run.
    config = configs.load_config(None, gtsrb_settings(root, train, test_csv,
                                                      **{"pipeline.output_dir": first_run_snapshot}))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(configs.to_dict(config)))
    for name, argument, cap in (("by_config", str(config_file), 10),
                                ("by_sqlite", os.path.join(first_run_snapshot, "metadata.sqlite"), 4)):
        out = tmp_path / name
        assert cli.main(["report", argument, "--output", str(out), "--max-eval-examples", str(cap)]) == 0
        data = json.load(open(out / report.DATA_FILE, encoding="utf-8"))
        assert data["output_dir"] == first_run_snapshot and data["summary"] == full["summary"]
        # The model ran over the first ``cap`` examples only; the split's size is still counted.
        assert (data["mistakes"]["checked"], data["mistakes"]["total"]) == (cap, 120)
        assert data["mistakes"]["wrong"] <= min(cap, full["mistakes"]["wrong"])
        assert (out / report.INDEX_FILE).is_file()


@pytest.mark.e2e
@pytest.mark.shared
def test_report_of_a_run_that_stopped_part_way_shows_what_there_is(shapes_prepared, built_report, tmp_path, capsys):
    """The Trainer fails (MobileNetV2's weights file does not fit MobileNet): no model, no evaluation.

    Written over a full report in a folder of the user's, it removes the figures it no longer has
    and nothing else.
    """
    from visiontune import configs
    from visiontune.pipeline import local_runner

    config = configs.load_config(None, [
        f"data.prepared_dir={shapes_prepared.output_dir}", "data.example_gen=tfrecords",
        "model.backbone=mobilenet", "model.alpha=0.25", f"model.weights={require_shared(MOBILENET_V2_035)}",
        "model.image_size=32", "training.batch_size=8", "evaluation.top_k=2",
        f"pipeline.output_dir={tmp_path / 'run'}", f"pipeline.serving_dir={tmp_path / 'serving'}"])
    with pytest.raises(Exception):
        local_runner.run(config)
    states = latest_states(local_runner.metadata_path(config))
    assert states["Transform"] == "COMPLETE" and states["Trainer"] == "FAILED", states

    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    index = capsys.readouterr().out.strip()
    assert index == str(tmp_path / "run" / report.REPORT_DIR / report.INDEX_FILE)
    data = json.load(open(os.path.join(os.path.dirname(index), report.DATA_FILE), encoding="utf-8"))
    # What the run got to: the data, with its counts and sample images ...
    assert data["classes"] == list(shapes_prepared.classes)
    assert data["counts"] == shapes_prepared.counts and data["sample_classes"] == data["classes"]
    # ... and, said plainly, what it did not.
    assert data["summary"]["reasons"] == ["the pipeline stopped before the Evaluator"]
    assert not data["summary"]["pushed"] and data["per_class"] == [] and "mistakes" not in data
    assert any(p.startswith("training history: no history.json") for p in data["problems"])
    page = open(index, encoding="utf-8").read()
    assert "the pipeline stopped before the Evaluator" in page and "not available" in page
    assert "class_counts.png" in os.listdir(os.path.dirname(index))

    mine = tmp_path / "mine"
    shutil.copytree(built_report[0], mine)
    (mine / "holiday.png").write_bytes(b"the user's own picture")
    assert {"misclassified.png", "training.png"} <= set(os.listdir(mine))
    assert cli.main(["report", str(tmp_path / "run"), "--output", str(mine)]) == 0
    left = set(os.listdir(mine))
    assert "misclassified.png" not in left and "training.png" not in left
    assert {"holiday.png", "class_counts.png", report.INDEX_FILE, report.DATA_FILE} <= left
    assert (mine / "holiday.png").read_bytes() == b"the user's own picture"
    assert not [name for name in left if name.startswith(".")]   # no temporary file left


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("needs Debian's chromium to render the report (apt-get install chromium; .ci/run does)")


@pytest.mark.e2e
@pytest.mark.shared
def test_report_renders_in_headless_chromium(built_report, tmp_path):
    from PIL import Image

    browser = _chromium()
    out, _, _ = built_report
    shot = tmp_path / "report.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,3000", "file://" + os.path.join(out, report.INDEX_FILE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists(), (result.returncode, result.stderr[-2000:])
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (3000, 1200)
    # Not blank: text, tables and figures put dark pixels on much of the page.
    assert pixels.std() > 20, pixels.std()
    assert (pixels < 200).mean() > 0.02, (pixels < 200).mean()
