"""``visiontune serve`` and ``visiontune predict``.

``serve`` runs real TF Serving (``tensorflow_model_server``) when it is on
PATH, and otherwise the built-in server, which implements the part of TF
Serving's REST and gRPC APIs that clients use, with the same file-system
polling of pushed versions.  ``predict`` is the client side: any image Pillow
reads, top-k classes, batched requests, REST or gRPC; or, with ``--tflite``,
the pushed TensorFlow Lite model run here with no server.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading

from visiontune import features
from visiontune.configs.validation import model_name_problem
from visiontune.errors import UserError
from visiontune.serving.tf_serving import TF_SERVING_BINARY, tf_serving_command


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve SERVING_DIR/MODEL_NAME over TF Serving's REST and gRPC APIs",
                       description="Serves the versions the Pusher writes under --model-base-path. Runs "
                                   f"{TF_SERVING_BINARY} when it is on PATH, else a built-in server with "
                                   "the same API (for development).")
    p.add_argument("--model-base-path", help="SERVING_DIR/MODEL_NAME (holds version folders); or "
                                             "--model_config_file for several models")
    p.add_argument("--model-name", help="name clients use (default: the base path's folder name)")
    p.add_argument("--rest-port", type=int, default=8501, help="REST port; 0 turns REST off (default 8501)")
    p.add_argument("--grpc-port", type=int, default=8500, help="gRPC port; 0 turns gRPC off (default 8500)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the built-in server binds (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--num-versions", type=int,
                   help="latest versions kept available by number (default 2; a config file says it per model)")
    p.add_argument("--poll-seconds", type=float, default=1.0,
                   help="how often the base path is checked for new versions (default 1)")
    p.add_argument("--max-instances", "--max-batch-size", dest="max_instances", type=int, default=1024,
                   help="built-in server: most instances per request (default 1024)")
    p.add_argument("--max-body-bytes", type=int, default=64 << 20,
                   help="built-in server: largest REST body / gRPC message (default 64 MiB); larger: 413")
    p.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024,
                   help="built-in server: most pixels per image, read from its header before decoding "
                        "(default 67108864, as data.max_pixels); larger: 400")
    p.add_argument("--inference-batch-size", type=int, default=32,
                   help="built-in server: most instances per model call; larger requests run in several "
                        "(default 32)")
    p.add_argument("--workers", type=int, default=4,
                   help="built-in server: requests computed at once, per API (default 4)")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="built-in server: seconds an idle keep-alive connection stays open (default 60)")
    p.add_argument("--read-timeout", type=float, default=60.0,
                   help="built-in server: seconds a request may take to arrive once begun (default 60)")
    p.add_argument("--builtin", action="store_true",
                   help=f"use the built-in server even when {TF_SERVING_BINARY} is installed")
    # Several models, version policies and labels: TF Serving's own flags and file format.
    p.add_argument("--model_config_file", "--model-config-file", dest="model_config_file", metavar="FILE",
                   help="TF Serving's text-format ModelServerConfig: several models, each with its "
                        "model_version_policy and version_labels (instead of --model-base-path)")
    p.add_argument("--model_config_file_poll_wait_seconds", "--model-config-file-poll-wait-seconds",
                   dest="model_config_file_poll_wait_seconds", type=float, default=0.0, metavar="SECONDS",
                   help="re-read --model_config_file this often and apply what changed (default 0: never)")
    p.add_argument("--allow_version_labels_for_unavailable_models",
                   "--allow-version-labels-for-unavailable-models", dest="allow_unavailable_labels",
                   action="store_true", help="let a new label name a version that is not loaded yet (as TF "
                                             "Serving's flag; needed for labels in the file at start-up)")
    p.add_argument("--write-config", metavar="FILE",
                   help="write the --model_config_file TF Serving needs for these models to FILE, print the "
                        "docker run line that serves it, and exit")
    p.add_argument("--config-root", metavar="DIR",
                   help="with --write-config: the folder holding the models as the container sees it (e.g. "
                        "/models); default: the host's paths, mounted at the same paths")
    add_metrics_and_batching_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="classify (or segment) images with a served model (REST or gRPC), "
                                       "or with its TensorFlow Lite model here (--tflite)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--server", help="REST URL, e.g. http://localhost:8501")
    p.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC at this address instead of REST")
    p.add_argument("--model", help="model name (with --server or --grpc)")
    p.add_argument("--tflite", metavar="MODEL",
                   help="run a TensorFlow Lite model here instead of asking a server: a .tflite file, or a "
                        "pushed version folder (or SERVING_DIR/MODEL_NAME: its newest version), whose "
                        "assets.extra/tflite/ holds them")
    p.add_argument("--variant", choices=features.TFLITE_VARIANTS,
                   help="with --tflite and a folder: which model (default int8, else float16)")
    p.add_argument("--version", type=int, help="a version number (default: the latest)")
    p.add_argument("--label", help="a version label instead (version_labels in the server's --model_config_file)")
    p.add_argument("--signature", help="signature name (default serving_default)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="images per request (default 32)")
    p.add_argument("--classes", help="classes.txt, or a model folder holding assets.extra/classes.txt, "
                                     "for the names of the classes below the top one")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--masks-dir", help="segmentation models: write each image's mask PNG here "
                                       "(IMAGE_STEM_mask.png)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)


# ---------------------------------------------------------------- serve: metrics and batching

def add_metrics_and_batching_flags(p) -> None:
    """TF Serving's own flags and files; both servers read them (the real one gets them passed on)."""
    p.add_argument("--enable_batching", action="store_true",
                   help="merge concurrent requests into one model call (TF Serving's flag; settings from "
                        "--batching_parameters_file)")
    p.add_argument("--batching_parameters_file", metavar="FILE",
                   help="TF Serving's text-format BatchingParameters (max_batch_size { value: 8 }, "
                        "batch_timeout_micros { value: 2000 }, num_batch_threads { value: 2 }, ...); "
                        "default: max_batch_size = --inference-batch-size, no timeout, one thread per core")
    p.add_argument("--monitoring_config_file", metavar="FILE",
                   help="TF Serving's text-format MonitoringConfig: prometheus_config { enable: true, path: "
                        '"..." }. Default for the built-in server: metrics on at /monitoring/prometheus/metrics '
                        "on the REST port")
    p.add_argument("--write-batching-config", metavar="FILE",
                   help="write the batching parameters in effect (the file's, or the defaults spelled out) "
                        f"for {TF_SERVING_BINARY} --batching_parameters_file, and exit")
    p.add_argument("--write-monitoring-config", metavar="FILE",
                   help=f"write a --monitoring_config_file for {TF_SERVING_BINARY} that turns on the same "
                        "metrics endpoint, and exit")


def check_metrics_and_batching_args(args) -> None:
    """Reads the batching and monitoring files once (bad ones: one line, exit 2); sets args.batching/monitoring."""
    from visiontune.serving import batching, metrics

    if args.batching_parameters_file and not (args.enable_batching or args.write_batching_config):
        raise UserError("--batching_parameters_file is read only with --enable_batching (as in TF Serving)")
    try:
        args.batching = batching.read_parameters(args.batching_parameters_file, args.inference_batch_size)
    except ValueError as e:
        raise UserError(f"--batching_parameters_file {e}") from None
    try:
        args.monitoring = metrics.read_monitoring_config(args.monitoring_config_file)
    except ValueError as e:
        raise UserError(f"--monitoring_config_file {e}") from None


def _write_atomically(path: str, text: str, option: str) -> None:
    from visiontune.components.local_files import write_atomically

    try:
        write_atomically(path, text)
    except OSError as e:
        raise UserError(f"{option} {os.path.abspath(path)}: cannot write it: {e.strerror or e}") from None


def write_tf_serving_files(args) -> list:
    """--write-batching-config / --write-monitoring-config: writes them; the flags that pass them to TF Serving."""
    from visiontune.serving import batching, metrics

    flags = []
    if args.write_batching_config:
        _write_atomically(args.write_batching_config, batching.to_text(args.batching), "--write-batching-config")
        flags += ["--enable_batching=true", f"--batching_parameters_file={os.path.abspath(args.write_batching_config)}"]
    if args.write_monitoring_config:
        _write_atomically(args.write_monitoring_config, metrics.monitoring_config_text(*args.monitoring),
                          "--write-monitoring-config")
        flags.append(f"--monitoring_config_file={os.path.abspath(args.write_monitoring_config)}")
    return flags


def _batching_and_monitoring_flags(args) -> list:
    """The batching and monitoring flags for tensorflow_model_server: the user's files, or metrics on as ours."""
    import tempfile

    from visiontune.serving import metrics

    flags = []
    if args.enable_batching:
        flags.append("--enable_batching=true")
        if args.batching_parameters_file:
            flags.append(f"--batching_parameters_file={os.path.abspath(args.batching_parameters_file)}")
    monitoring = args.monitoring_config_file
    if monitoring is None:   # TF Serving's metrics are off by default; `visiontune serve` turns them on for both
        monitoring = os.path.join(tempfile.mkdtemp(prefix="visiontune-monitoring-"), "monitoring.config")
        _write_atomically(monitoring, metrics.monitoring_config_text(*args.monitoring), "a temporary folder")
    return flags + [f"--monitoring_config_file={os.path.abspath(monitoring)}"]


# ---------------------------------------------------------------- serve

def check_serve_args(args):
    """Refuses values the servers would choke on, one line each; returns the ``ModelSpec`` list to serve."""
    from visiontune.serving import model_config

    if bool(args.model_base_path) == bool(args.model_config_file):
        raise UserError("pass --model-base-path SERVING_DIR/MODEL_NAME (one model) or --model_config_file FILE "
                        "(several models, as TF Serving reads it)")
    if args.model_config_file:
        given = [o for o, v in (("--model-name", args.model_name), ("--num-versions", args.num_versions)) if v]
        if given:
            raise UserError(f"{', '.join(given)}: the --model_config_file says this per model")
        _, specs = model_config.read(args.model_config_file)
    else:
        specs = [_single_model(args)]
    for option, value in (("--rest-port", args.rest_port), ("--grpc-port", args.grpc_port)):
        if not 0 <= value <= 65535:
            raise UserError(f"{option}: got {value}, expected a port in 1-65535 (0 turns this API off)")
    if not args.rest_port and not args.grpc_port:
        raise UserError("both --rest-port and --grpc-port are 0: nothing to serve")
    if args.rest_port and args.rest_port == args.grpc_port:
        raise UserError(f"--rest-port and --grpc-port are both {args.rest_port}: pick two ports")
    if not (math.isfinite(args.poll_seconds) and args.poll_seconds > 0):
        raise UserError(f"--poll-seconds: got {args.poll_seconds:g}, expected a number of seconds > 0 "
                        "(0 would rescan the folder without pause)")
    wait = args.model_config_file_poll_wait_seconds
    if not (math.isfinite(wait) and wait >= 0):
        raise UserError(f"--model_config_file_poll_wait_seconds: got {wait:g}, expected a number of seconds "
                        "(0: never re-read)")
    if wait and not args.model_config_file:
        raise UserError("--model_config_file_poll_wait_seconds: re-reads --model_config_file; pass one")
    for option in ("max_instances", "max_body_bytes", "max_pixels", "inference_batch_size", "workers"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')}: got {getattr(args, option)}, expected an integer >= 1")
    for option in ("idle_timeout", "read_timeout"):
        value = getattr(args, option)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{option.replace('_', '-')}: got {value:g}, expected a number of seconds > 0")
    if args.config_root and not args.write_config:
        raise UserError("--config-root: the folder written into --write-config's file; pass --write-config")
    check_metrics_and_batching_args(args)
    return specs


def _single_model(args):
    from visiontune.serving import model_config

    base = os.path.abspath(args.model_base_path)
    if not os.path.isdir(base):
        raise UserError(f"{base}: no such folder (the Pusher's SERVING_DIR/MODEL_NAME)")
    name = args.model_name or os.path.basename(base.rstrip(os.sep))
    problem = model_name_problem(name)
    if problem:
        given = "--model-name" if args.model_name else "--model-base-path's folder name (pass --model-name)"
        raise UserError(f"{given}: {problem}")
    num_versions = 2 if args.num_versions is None else args.num_versions
    if num_versions < 1:
        raise UserError(f"--num-versions: got {num_versions}, expected an integer >= 1")
    return model_config.single_model(name, base, num_versions)


def _passed_on_flags(args) -> list:
    """TF Serving's own flags given to ``serve``, passed on to ``tensorflow_model_server`` as they are."""
    flags = []
    if args.allow_unavailable_labels:
        flags.append("--allow_version_labels_for_unavailable_models")
    if args.model_config_file_poll_wait_seconds:
        flags.append(f"--model_config_file_poll_wait_seconds={max(1, round(args.model_config_file_poll_wait_seconds))}")
    return flags


def cmd_serve(args) -> int:
    specs = check_serve_args(args)
    written = write_tf_serving_files(args)
    if args.write_config:
        return write_config(args, specs, written)
    if written:
        print(f"wrote; pass to {TF_SERVING_BINARY}: {' '.join(written)}")
        return 0
    binary = None if args.builtin else shutil.which(TF_SERVING_BINARY)
    if binary:
        spec = specs[0]
        command = tf_serving_command(binary, spec.name, spec.base_path, grpc_port=args.grpc_port,
                                     rest_port=args.rest_port, num_versions=spec.policy.num_versions,
                                     poll_seconds=args.poll_seconds, config_file=args.model_config_file,
                                     extra=_passed_on_flags(args) + _batching_and_monitoring_flags(args))
        print(f"running TF Serving: {' '.join(command)}", flush=True)
        if args.host not in ("127.0.0.1", "0.0.0.0"):
            print("note: tensorflow_model_server listens on all interfaces; --host is ignored",
                  file=sys.stderr)
        os.execv(binary, command)
    return serve_builtin(args, specs)


def write_config(args, specs, written=()) -> int:
    """``--write-config FILE``: TF Serving's config for ``specs``, and the ``docker run`` line that serves it.

    ``written``: the flags of the batching / monitoring files written with it
    (``--write-batching-config``, ``--write-monitoring-config``); their files are mounted too.
    """
    from visiontune.serving import model_config
    from visiontune.serving.tf_serving import container_paths, docker_command

    try:
        paths = container_paths(specs, args.config_root) if args.config_root else None
    except ValueError as e:
        raise UserError(f"--config-root: {e}; write the config without --config-root") from None
    try:
        model_config.write(model_config.build(specs, paths), args.write_config)
    except OSError as e:
        raise UserError(f"--write-config {args.write_config}: cannot be written: {e.strerror or e}") from None
    print(f"wrote {args.write_config} ({len(specs)} model(s)); serve it with TF Serving:", flush=True)
    file_flags = [tuple(flag.split("=", 1)) for flag in written if flag.split("=", 1)[0].endswith("_file")]
    flags = _passed_on_flags(args) + [flag for flag in written if flag.split("=", 1)[0] not in dict(file_flags)]
    print(docker_command(specs, os.path.abspath(args.write_config), root=args.config_root, file_flags=file_flags,
                         flags=flags, grpc_port=args.grpc_port or 8500,
                         rest_port=args.rest_port or 8501), flush=True)
    return 0


def serve_builtin(args, specs) -> int:
    from visiontune.serving import model_config
    from visiontune.serving.model_server import Limits, ServingError
    from visiontune.serving.server_core import ServerCore

    limits = Limits(max_instances=args.max_instances, max_body_bytes=args.max_body_bytes,
                    max_pixels=args.max_pixels, inference_batch_size=args.inference_batch_size,
                    workers=args.workers, idle_timeout=args.idle_timeout, read_timeout=args.read_timeout)
    manager = ServerCore(limits, poll_seconds=args.poll_seconds,
                         allow_version_labels_for_unavailable_models=args.allow_unavailable_labels)
    manager.metrics.enabled, manager.metrics.path = args.monitoring
    if args.enable_batching:
        from visiontune.serving.batching import Batcher

        manager.batcher = Batcher(args.batching)
    servers = []
    try:
        if args.rest_port:
            from visiontune.serving.rest import RestServer

            servers.append(RestServer(manager, args.host, args.rest_port).start())
        if args.grpc_port:
            from visiontune.serving.grpc_server import GrpcServer

            servers.append(GrpcServer(manager, args.host, args.grpc_port).start())
    except OSError as e:
        for server in servers:
            server.stop()
        what = "REST" if not servers and args.rest_port else "gRPC"
        port = args.rest_port if what == "REST" else args.grpc_port
        raise UserError(f"{what} cannot listen on {args.host} port {port}: "
                        f"{e.strerror or e}") from None
    # Ports first (a port in use is refused at once), then the versions on disk.
    try:
        manager.reload(model_config.build(specs), wait_seconds=max(30.0, 3 * args.poll_seconds))
    except ServingError as e:
        for server in servers:
            server.stop()
        manager.stop()
        where = f"--model_config_file {args.model_config_file}" if args.model_config_file else "serve"
        hint = (" (start with --allow_version_labels_for_unavailable_models, as TF Serving needs, or add the "
                "label with a config reload once the version is AVAILABLE)" if e.code == "FAILED_PRECONDITION"
                else "")
        raise UserError(f"{where}: {e.message}{hint}") from None
    if args.model_config_file_poll_wait_seconds:
        manager.watch(args.model_config_file, args.model_config_file_poll_wait_seconds)
    where = ", ".join(f"REST {s.url}" if hasattr(s, "url") else f"gRPC {s.target}" for s in servers)
    if args.rest_port and manager.metrics.enabled:
        where += f", metrics {servers[0].url}{manager.metrics.path}"
    if args.enable_batching:
        where += f", batching (max_batch_size {args.batching.max_batch_size})"
    why = "--builtin" if args.builtin else f"no {TF_SERVING_BINARY} on PATH"
    models = "; ".join(f"model {s.name!r} from {s.base_path}, versions "
                       f"{manager.models()[s.name] or 'none yet (waiting for a push)'}"
                       + (f", labels {dict(s.labels)}" if s.labels else "") for s in specs)
    print(f"built-in model server ({why}): {models}; {where}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.stop()
    manager.batcher.stop()
    manager.stop()
    return 0


# ---------------------------------------------------------------- predict

def cmd_predict(args) -> int:
    from visiontune.serving.client import GrpcClient, PredictionError, RestClient, classify_files, load_class_names

    if args.tflite:
        server_options = [o for o, v in (("--server", args.server), ("--grpc", args.grpc), ("--model", args.model),
                                          ("--version", args.version), ("--signature", args.signature),
                                          ("--label", args.label)) if v]
        if server_options:
            raise UserError(f"--tflite runs the model here: drop {', '.join(server_options)}")
    elif bool(args.server) == bool(args.grpc):
        raise UserError("pass --server URL (REST) or --grpc HOST:PORT, or --tflite MODEL to run a "
                        "TensorFlow Lite model here")
    elif not args.model:
        raise UserError("pass --model NAME: the served model's name")
    elif args.variant:
        raise UserError("--variant picks a TensorFlow Lite model: use it with --tflite")
    elif args.label and args.version is not None:
        raise UserError("--version and --label both pick a version: pass one")
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be at least 1")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise UserError(f"no such image file: {', '.join(missing)}")
    try:
        names = load_class_names(args.classes) if args.classes else None
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if args.tflite:
        from visiontune.serving.tflite import TFLiteModel

        client = TFLiteModel(args.tflite, args.variant, names)
        names = client.class_names or None
    elif args.grpc:
        client = GrpcClient(args.grpc, args.model, args.version, args.signature, args.timeout, label=args.label)
    else:
        client = RestClient(args.server, args.model, args.version, args.signature, args.timeout, label=args.label)
    try:
        results = classify_files(client, args.images, args.top_k, args.batch_size, names,
                                 masks_dir=args.masks_dir)
    except PredictionError as e:
        raise UserError(f"{e.code}: {e.message}") from None
    except ValueError as e:  # an image Pillow cannot read
        raise UserError(str(e)) from None
    finally:
        client.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for row in results:
            if "top_k" in row:
                ranked = "  ".join(f"{c['class']} {c['probability']:.3f}" for c in row["top_k"])
                print(f"{row['image']}: {ranked}")
            else:
                share = f", foreground {row['foreground_share']:.1%}" if "foreground_share" in row else ""
                where = f" -> {row['mask']}" if "mask" in row else " (pass --masks-dir to save it)"
                print(f"{row['image']}: mask {row['mask_size'][0]}x{row['mask_size'][1]}{share}{where}")
    return 0
