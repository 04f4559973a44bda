"""Several models in one built-in server, as TF Serving's ``ServerCore`` serves a ``ModelServerConfig``.

One :class:`ModelManager` per model (its base path polled, its ``model_version_policy`` applied), and
the ``version_labels`` of each (``stable: 1``, ``canary: 2``).  :class:`ServerCore` answers the calls
the REST and gRPC front ends make on their ``manager`` (``servable``, ``status``, ``predict``,
``limits``), so they serve one model or many alike.

:meth:`ServerCore.reload` is TF Serving's ``ReloadConfig`` (``HandleReloadConfigRequest``,
``--model_config_file_poll_wait_seconds``), with its checks and status codes:

* models added are loaded before they join, models removed leave after; a model that stays keeps its
  ``ModelManager`` and its loaded versions, so its requests are never dropped (a new version policy
  applies at its next scan, loading before unloading);
* a label may name only a version that is AVAILABLE now (FAILED_PRECONDITION otherwise), unless
  ``allow_version_labels_for_unavailable_models`` (TF Serving's flag of that name): then a *new* label
  may name any version, but an existing label still moves only to an available one;
* a model added that does not become available fails the reload with UNKNOWN ("N model(s) did not
  become available"), though it stays configured, as in TF Serving.

Unlike TF Serving, a refused reload changes nothing (TF Serving keeps the new config when its labels
are refused).  An unknown label is INVALID_ARGUMENT, for any model name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

from visiontune.serving import batching, metrics, model_config, version_scan
from visiontune.serving.model_config import InvalidConfig, ModelSpec
from visiontune.serving.model_server import END, Limits, ModelManager, Servable, ServingError, VersionStatus, invalid

log = logging.getLogger("visiontune.serving")


class ServerCore:
    """The models of one ``ModelServerConfig``, their version policies and labels; reloadable live."""

    def __init__(self, limits: Optional[Limits] = None, poll_seconds: float = 1.0, warmup: bool = True,
                 allow_version_labels_for_unavailable_models: bool = False):
        self._limits = limits or Limits()
        self.poll_seconds = poll_seconds
        self.warmup = warmup
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        # One metrics registry and one batcher for the whole server, handed to every model's manager
        # (set them before the first reload).
        self.metrics, self.batcher = metrics.ServerMetrics(), batching.UNBATCHED
        # Each replaced whole, never mutated: a request reads one consistent snapshot.
        self._models: Dict[str, ModelManager] = {}
        self._labels: Dict[str, Dict[str, int]] = {}
        self._specs: Dict[str, ModelSpec] = {}
        self._retired: Dict[str, ModelManager] = {}   # removed models, for the requests still in flight
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ what the front ends call

    @property
    def limits(self) -> Limits:
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self._limits = limits
        for manager in list(self._models.values()):
            manager.limits = limits

    def _version_for_label(self, name: str, label: str) -> int:
        version = self._labels.get(name, {}).get(label)
        if version is None:   # server_core.cc GetModelVersionForLabel
            raise invalid(f"Unrecognized servable version label: {label}")
        return version

    def servable(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> Servable:
        """The version a request names (by number or label), or the latest available one."""
        if label:
            version = self._version_for_label(name, label)
        manager = self._models.get(name)
        if manager is None:
            request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise ServingError("NOT_FOUND", f"Servable not found for request: {request}")
        return manager.servable(name, version)

    def status(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> List[VersionStatus]:
        """Version states; with a label, the labelled version's (TF Serving ignores a label here)."""
        if label:
            version = self._version_for_label(name, label)
        manager = self._models.get(name)
        if manager is None:
            raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}"
                               if version is not None else f"Could not find any versions of model {name}")
        return manager.status(name, version)

    def predict(self, servable: Servable, signature, inputs: Mapping[str, object],
                output_filter: Sequence[str] = ()) -> Dict[str, object]:
        manager = self._models.get(servable.model_name) or self._retired[servable.model_name]
        return manager.predict(servable, signature, inputs, output_filter)

    # ------------------------------------------------------------------ what is served

    def models(self) -> Dict[str, List[int]]:
        """{model name: its available versions}."""
        return {name: manager.versions() for name, manager in sorted(self._models.items())}

    def labels(self, name: str) -> Dict[str, int]:
        return dict(self._labels.get(name, {}))

    def specs(self) -> List[ModelSpec]:
        return list(self._specs.values())

    def manager(self, name: str) -> ModelManager:
        return self._models[name]

    # ------------------------------------------------------------------ configuration

    def reload(self, config, wait_seconds: float = 30.0) -> None:
        """Serves ``config`` (a ``ModelServerConfig``) from now on; raises ``ServingError`` as ``ReloadConfig``."""
        with self._reload_lock:
            try:
                specs = model_config.check(config)
            except InvalidConfig as e:
                raise ServingError(e.code, str(e)) from None
            if config.WhichOneof("config") is None:
                log.info("Taking no action for empty config.")
                return
            remote = next((s for s in specs if model_config.is_uri(s.base_path)), None)
            if remote is not None:
                raise ServingError("INVALID_ARGUMENT", f"model {remote.name}: base_path {remote.base_path}: the "
                                                       "built-in server reads local folders only")
            labels = self._label_map(specs)
            current, models, added = self._models, {}, []
            for spec in specs:
                manager = current.get(spec.name)
                if manager is None or manager.base_path != spec.base_path:
                    manager = ModelManager(spec.name, spec.base_path, poll_seconds=self.poll_seconds,
                                           limits=self._limits, warmup=self.warmup, policy=spec.policy)
                    manager.metrics, manager.batcher = self.metrics, self.batcher
                    added.append(manager)
                models[spec.name] = manager
            try:
                for manager in added:   # loaded before they join: no request sees a model without versions
                    manager.start()
            except OSError as e:   # a base path that cannot be listed: nothing changes
                for manager in added:
                    manager.stop()
                raise ServingError("UNKNOWN", f"cannot read a base path: {e}") from None
            for spec in specs:   # the models that stay: applied at their next scan, loading before unloading
                models[spec.name].policy = spec.policy
            deadline = time.monotonic() + wait_seconds
            for manager in added:   # until a version is up, or failed (ServableStateMonitor's terminal states)
                while (not manager.versions() and not _load_error(manager) and time.monotonic() < deadline
                       and _expects_a_version(manager)):
                    time.sleep(0.05)
            gone = [m for name, m in current.items() if models.get(name) is not m]
            self._retired = {**self._retired, **{m.name: m for m in gone}}
            self._models, self._labels = models, labels
            self._specs = {spec.name: spec for spec in specs}
            for manager in gone:   # TF Serving unloads a model that leaves the config
                manager.stop()
                manager.unload_all()
            log.info("serving %s", ", ".join(f"{s.name} ({s.policy.describe()}"
                                              + (f", labels {dict(s.labels)})" if s.labels else ")")
                                              for s in specs) or "no models")
            failed = {m.name: _load_error(m) for m in added}
            failed = {name: error for name, error in failed.items() if error}
            if failed:   # configured all the same, as in TF Serving (they load when their files change)
                details = "".join(f"{{{error}}}, " for error in failed.values())
                raise ServingError("UNKNOWN", f"{len(failed)} model(s) did not become available: {{{details}}}")

    def _label_map(self, specs: List[ModelSpec]) -> Dict[str, Dict[str, int]]:
        """The new labels (server_core.cc ``UpdateModelVersionLabelMap``), checked against what is AVAILABLE."""
        labels: Dict[str, Dict[str, int]] = {}
        for spec in specs:
            manager = self._models.get(spec.name)
            available = set(manager.versions()) if manager is not None else set()
            for label, version in spec.labels:
                existing = self._labels.get(spec.name, {}).get(label)
                allowed = self.allow_unavailable_labels and existing in (None, version)
                if not allowed and version not in available:
                    raise ServingError("FAILED_PRECONDITION",
                                       f"Request to assign label to version {version} of model {spec.name}, "
                                       "which is not currently available for inference")
                labels.setdefault(spec.name, {})[label] = version
        return labels

    def watch(self, path: str, seconds: float) -> None:
        """Re-reads the config file every ``seconds`` and reloads it when it changed
        (``--model_config_file_poll_wait_seconds``); a bad file is logged and the config kept."""
        def run(last: Optional[str]) -> None:
            while not self._stop.wait(seconds):
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                    if text != last:   # until it is applied: TF Serving retries every poll too
                        self.reload(model_config.parse(text))
                        last = text
                except Exception as e:   # keep serving the config that works
                    log.error("--model_config_file %s: not reloaded: %s", path, str(e).splitlines()[0] if str(e)
                              else type(e).__name__)

        with open(path, encoding="utf-8") as f:
            first = f.read()
        self._watcher = threading.Thread(target=run, args=(first,), name="config-poll", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        for manager in list(self._models.values()):
            manager.stop()


def _load_error(manager: ModelManager) -> str:
    """Why a model has no available version, as TF Serving says it ("" when it has one, or none on disk yet)."""
    if manager.versions():
        return ""
    try:
        states = manager.status(manager.name)
    except ServingError:
        return ""   # nothing on disk yet: it waits for a push, as in TF Serving
    return next((f"{{name: {manager.name} version: {s.version}}} due to error: {s.error_message}"
                 for s in states if s.state == END and s.error_code != "OK"), "")


def _expects_a_version(manager: ModelManager) -> bool:
    """Whether a complete version folder on disk is one the model's policy serves (so it is worth waiting for)."""
    complete = [v for v, path in version_scan.versions_on_disk(manager.base_path).items()
                if os.path.exists(os.path.join(path, "saved_model.pb"))]
    return bool(manager.policy.select(complete))
