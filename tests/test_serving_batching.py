"""Server-side batching (--enable_batching): merged model calls answer as separate ones would.

Merging is observed through the server's own metrics (TF Serving's batching_session histograms), never
through timing: a long ``batch_timeout_micros`` with ``max_batch_size`` equal to the number of concurrent
requests makes a batch run exactly when all of them have joined it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.serving_helpers import MODEL, builtin_server, push, scrape, shape_pngs, value
from tests.test_serving_command import stub_path  # noqa: F401  (a fixture: tensorflow_model_server stubbed)
from visiontune.serving import batching, text_protos
from visiontune.serving.client import GrpcClient, PredictionError, RestClient

PROCESSED = ":tensorflow:serving:batching_session:processed_batch_size"
RUNS = ":tensorflow:serving:batching_session:wrapped_run_count"
WAIT_FOR_FULL = 600_000_000   # µs: a batch runs when full, never by timeout, within a test


@pytest.fixture(scope="module")
def base(exported_model, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("batching") / MODEL)
    push(exported_model.serving_model_dir, base)
    return base


@pytest.fixture(scope="module")
def unbatched(base):
    """Answers of the same version without batching, one image per request: the reference."""
    with builtin_server(base) as (_, url, _target):
        client = RestClient(url, MODEL)
        yield lambda png: client.predict_images([png])["probabilities"][0]


def _concurrently(calls):
    """Runs every call in its own thread at once; their results (or exceptions), in order."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - compared by the test
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_concurrent_single_image_requests_merge_and_answer_as_unbatched(base, unbatched, api):
    pngs = shape_pngs(4, seed=3)
    params = batching.BatchingParameters(max_batch_size=4, batch_timeout_micros=WAIT_FOR_FULL, num_batch_threads=1)
    with builtin_server(base, batching=params) as (_, url, target):
        def client():
            return RestClient(url, MODEL) if api == "rest" else GrpcClient(target, MODEL)
        results = _concurrently([lambda png=png: client().predict_images([png])["probabilities"][0]
                                 for png in pngs])
        samples = scrape(url)
    for png, got in zip(pngs, results):
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got, unbatched(png), rtol=1e-5, atol=1e-6)
    labels = dict(model_name=MODEL, signature_name="serving_default")
    # Four requests, one model call of four.
    assert value(samples, RUNS, **labels) == 1
    assert value(samples, PROCESSED + "_count", **labels) == 1
    assert value(samples, PROCESSED + "_sum", **labels) == 4
    assert value(samples, ":tensorflow:serving:batching_session:input_batch_size_count", **labels) == 4


def test_a_broken_image_fails_only_its_own_request(base, unbatched):
    pngs = shape_pngs(3, seed=5)
    params = batching.BatchingParameters(max_batch_size=4, batch_timeout_micros=WAIT_FOR_FULL, num_batch_threads=1)
    with builtin_server(base, batching=params) as (_, url, _target):
        images = pngs + [b"these bytes are no image"]
        results = _concurrently([lambda png=png: RestClient(url, MODEL).predict_images([png])["probabilities"][0]
                                 for png in images])
        samples = scrape(url)
    for png, got in zip(pngs, results):
        np.testing.assert_allclose(got, unbatched(png), rtol=1e-5, atol=1e-6)
    assert isinstance(results[3], PredictionError) and results[3].http_status == 400
    # The merged call failed; each request then ran alone.
    assert value(samples, RUNS, model_name=MODEL) == 1 + 4
    assert value(samples, PROCESSED + "_sum", model_name=MODEL) == 4 + 4


def test_allowed_batch_sizes_pad_with_a_real_instance(base, unbatched):
    pngs = shape_pngs(3, seed=7)
    params = batching.BatchingParameters(max_batch_size=4, batch_timeout_micros=200_000, num_batch_threads=1,
                                         allowed_batch_sizes=(4,))
    with builtin_server(base, batching=params) as (_, url, _target):
        results = _concurrently([lambda png=png: RestClient(url, MODEL).predict_images([png])["probabilities"][0]
                                 for png in pngs])
        samples = scrape(url)
    for png, got in zip(pngs, results):
        np.testing.assert_allclose(got, unbatched(png), rtol=1e-5, atol=1e-6)
    runs = value(samples, PROCESSED + "_count", model_name=MODEL)
    # However the three requests were grouped, every model call ran on 4 instances, padding included.
    assert value(samples, PROCESSED + "_sum", model_name=MODEL) == 4 * runs
    padding = value(samples, ":tensorflow:serving:batching_session:padding_size_sum", model_name=MODEL)
    assert padding == 4 * runs - 3


def test_limits_hold_for_merged_calls(base, unbatched):
    """Images whose pixels together pass --max-pixels never share a model call; big requests still split."""
    pngs = shape_pngs(4, seed=9)   # 40x40 px each: two would pass a 2,000-pixel budget
    params = batching.BatchingParameters(max_batch_size=4, batch_timeout_micros=100_000, num_batch_threads=1)
    with builtin_server(base, batching=params, max_pixels=2000, inference_batch_size=4) as (_, url, _target):
        results = _concurrently([lambda png=png: RestClient(url, MODEL).predict_images([png])["probabilities"][0]
                                 for png in pngs])
        big = RestClient(url, MODEL).predict_images(shape_pngs(6, seed=2, size=30))["probabilities"]
        samples = scrape(url)
    for png, got in zip(pngs, results):
        np.testing.assert_allclose(got, unbatched(png), rtol=1e-5, atol=1e-6)
    assert big.shape[0] == 6
    # 30x30 = 900 px: at most 2 images per call, so the request of 6 made 3 calls of 2.
    calls = value(samples, PROCESSED + "_count", model_name=MODEL)
    assert value(samples, PROCESSED + "_sum", model_name=MODEL) == 4 + 6
    assert calls >= 4 + 3
    assert value(samples, PROCESSED + "_bucket", model_name=MODEL, le="2") == calls   # never more than 2


def test_batching_parameters_file_is_tf_servings_format(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 2000 }\n"
                    "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n"
                    'thread_pool_name { value: "pool" }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8\n'
                    "pad_variable_length_inputs: true\n")
    params = batching.read_parameters(str(path), inference_batch_size=32)
    assert params == batching.BatchingParameters(8, 2000, 100, 2, "pool", (4, 8), True)
    # What --write-batching-config writes reads back the same (and is TF Serving's text format).
    path.write_text(batching.to_text(params))
    assert batching.read_parameters(str(path), 32) == params
    assert "max_batch_size {\n  value: 8\n}" in path.read_text()
    # Defaults: the server's own limit, no timeout.
    default = batching.read_parameters(None, inference_batch_size=16)
    assert (default.max_batch_size, default.batch_timeout_micros, default.max_enqueued_batches) == (16, 0, 10)
    for text, problem in (("max_batch_size: 8", "max_batch_size"),
                          ("max_batch_size { value: 64 }", "--inference-batch-size"),
                          ("max_batch_size { value: 8 } allowed_batch_sizes: 4", "allowed_batch_sizes"),
                          ("num_batch_threads { value: 0 }", "num_batch_threads"),
                          ("enable_large_batch_splitting { value: true }", "enable_large_batch_splitting")):
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            batching.read_parameters(str(path), 32)
        assert problem in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_write_batching_config_writes_what_tf_serving_reads(tmp_path, capsys):
    from visiontune import cli

    base = tmp_path / MODEL
    base.mkdir()
    out = tmp_path / "out" / "batching.config"
    out.parent.mkdir()
    assert cli.main(["serve", "--model-base-path", str(base), "--inference-batch-size", "8",
                     "--write-batching-config", str(out), "--write-monitoring-config",
                     str(tmp_path / "out" / "monitoring.config")]) == 0
    printed = capsys.readouterr().out
    assert f"--batching_parameters_file={out}" in printed and "--enable_batching=true" in printed
    message = text_protos.read("BatchingParameters", str(out))
    assert message.max_batch_size.value == 8 and message.batch_timeout_micros.value == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["batching.config", "monitoring.config"]   # no leftovers


def test_tf_serving_gets_the_same_batching_and_monitoring_files(tmp_path, stub_path):  # noqa: F811
    """Handing over to tensorflow_model_server passes TF Serving's flags on, and turns its metrics on."""
    from tests.test_serving_command import _serve
    from visiontune.serving import metrics

    env, record = stub_path
    base = tmp_path / "serving" / MODEL
    base.mkdir(parents=True)
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 1000 }\n")
    result = _serve(["--model-base-path", str(base), "--enable_batching", "--batching_parameters_file",
                     str(params)], env)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert "--enable_batching=true" in argv and f"--batching_parameters_file={params}" in argv
    (monitoring,) = [a.split("=", 1)[1] for a in argv if a.startswith("--monitoring_config_file=")]
    assert metrics.read_monitoring_config(monitoring) == (True, metrics.DEFAULT_PATH)
    # The user's own monitoring file is passed on as it is.
    own = tmp_path / "monitoring.config"
    own.write_text('prometheus_config { enable: true, path: "/metrics" }\n')
    assert _serve(["--model-base-path", str(base), "--monitoring_config_file", str(own)], env).returncode == 0
    argv = record.read_text().splitlines()
    assert f"--monitoring_config_file={own}" in argv and not any("batching" in a for a in argv)
