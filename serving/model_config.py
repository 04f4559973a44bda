"""TF Serving's model config file (``--model_config_file``): read, check, build and write it.

The file is a text-format ``tensorflow.serving.ModelServerConfig`` (``model_server_config.proto``)
whose ``model_config_list`` names each model served: ``name``, ``base_path``, ``model_platform``,
``model_version_policy`` (``latest { num_versions }``, ``all {}``, ``specific { versions }``) and
``version_labels`` (``stable: 1``).  One format for both servers: the built-in server reads what
``tensorflow_model_server`` reads, and the file ``visiontune serve`` hands to TF Serving is built here
as the same message and written with ``text_format``, so neither side parses the other's strings.

The checks are TF Serving's own (``server_core.cc``: ``ValidateModelConfigList``, ``GetPlatform``),
with its wording, so a file refused here is refused there too.  A relative ``base_path`` is refused,
as TF Serving refuses one (it would resolve it against ``model_config_list_root_dir``, which
``tensorflow_model_server`` never sets): the file does not depend on the folder the server starts in.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterable, List, Optional, Set, Tuple

from visiontune.components import local_files
from visiontune.errors import UserError

PLATFORM = "tensorflow"


class ModelConfigError(UserError):
    """A ``--model_config_file`` that cannot be served: one line naming the file and the problem."""


class InvalidConfig(ValueError):
    """A config TF Serving refuses; ``code`` is the gRPC status name ``ReloadConfig`` answers with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk are served (``ServableVersionPolicy``); TF Serving's default: the latest one."""

    kind: str = "latest"            # latest | all | specific
    num_versions: int = 1
    versions: Tuple[int, ...] = ()

    def select(self, versions: Iterable[int]) -> Set[int]:
        """The versions of ``versions`` this policy serves."""
        versions = set(versions)
        if self.kind == "all":
            return versions
        if self.kind == "specific":
            return versions & set(self.versions)
        return set(sorted(versions, reverse=True)[:self.num_versions])

    def describe(self) -> str:
        if self.kind == "all":
            return "all versions"
        if self.kind == "specific":
            return f"versions {list(self.versions)}"
        return f"the latest {self.num_versions}" if self.num_versions > 1 else "the latest version"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One ``ModelConfig`` entry, checked."""

    name: str
    base_path: str
    policy: VersionPolicy
    labels: Tuple[Tuple[str, int], ...] = ()   # sorted (label, version) pairs

    @property
    def label_map(self) -> Dict[str, int]:
        return dict(self.labels)


def policy_from_proto(proto) -> VersionPolicy:
    """A ``ServableVersionPolicy`` message as a ``VersionPolicy`` (unset: the latest version)."""
    choice = proto.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        return VersionPolicy("specific", versions=tuple(sorted(set(proto.specific.versions))))
    # FileSystemStoragePathSource serves max(num_versions, 1): 0 (unset) is the latest one.
    return VersionPolicy("latest", num_versions=max(1, proto.latest.num_versions) if choice else 1)


def policy_to_proto(policy: VersionPolicy, proto) -> None:
    if policy.kind == "all":
        proto.all.SetInParent()
    elif policy.kind == "specific":
        proto.specific.versions[:] = list(policy.versions)
    else:
        proto.latest.num_versions = policy.num_versions


def is_uri(path: str) -> bool:
    """``gs://bucket/m``: TF Serving reads it, the built-in server does not."""
    return "://" in path


def _uri_is_relative(path: str) -> bool:
    """``UriIsRelativePath``: no scheme, no host, not absolute."""
    return "://" not in path and not path.startswith("/")


def _platform(model) -> str:
    """``GetPlatform``: ``model_platform``, or the deprecated ``model_type`` enum (1 is TENSORFLOW)."""
    if model.model_type:
        if model.model_platform:
            raise InvalidConfig("INVALID_ARGUMENT", "Illegal setting both ModelServerConfig::model_type "
                                                    "(deprecated) and ModelServerConfig::model_platform.")
        if model.model_type != 1:
            raise InvalidConfig("INVALID_ARGUMENT",
                                f"ModelServerConfig::model_type choice {model.model_type} not supported.")
        return PLATFORM
    if not model.model_platform:
        raise InvalidConfig("INVALID_ARGUMENT", f"model {model.name}: Illegal setting neither "
                                                "ModelServerConfig::model_type (deprecated) nor "
                                                'ModelServerConfig::model_platform (add model_platform: '
                                                '"tensorflow").')
    return model.model_platform


def check(config) -> List[ModelSpec]:
    """The models a ``ModelServerConfig`` names; raises ``InvalidConfig`` as TF Serving's ``ReloadConfig``."""
    choice = config.WhichOneof("config")
    if choice is None:
        return []   # an empty config: TF Serving "takes no action"
    if choice != "model_config_list":
        raise InvalidConfig("INVALID_ARGUMENT", "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                                                "Only ModelConfigList is currently supported")
    specs, names = [], set()
    for model in config.model_config_list.config:
        if model.name in names:
            raise InvalidConfig("INVALID_ARGUMENT",
                                f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
        if not model.name or "/" in model.name or ":" in model.name:
            raise InvalidConfig("INVALID_ARGUMENT", f"model name {model.name!r}: expected a name without "
                                                    "'/' or ':' (clients put it in a URL path)")
        platform = _platform(model)
        if platform != PLATFORM:
            raise InvalidConfig("INVALID_ARGUMENT", f"Model {model.name} requests unsupported platform {platform}")
        if _uri_is_relative(model.base_path):
            raise InvalidConfig("INVALID_ARGUMENT", f"Expected model {model.name} to have an absolute path or "
                                                    f"URI; got base_path()={model.base_path}")
        path = model.base_path[len("file://"):] if model.base_path.startswith("file://") else model.base_path
        specs.append(ModelSpec(model.name, path if is_uri(path) else os.path.normpath(path),
                               policy_from_proto(model.model_version_policy),
                               tuple(sorted(model.version_labels.items()))))
    return specs


def parse(text: str):
    """A ``ModelServerConfig`` from its text format; ``text_format.ParseError`` says where it is not one."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def read(path: str):
    """(``ModelServerConfig``, its ``ModelSpec`` list) of a config file; ``ModelConfigError`` names the problem."""
    from google.protobuf import text_format

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ModelConfigError(f"--model_config_file {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"--model_config_file {path}: not a text file ({e.reason} at byte {e.start})") \
            from None
    except OSError as e:
        raise ModelConfigError(f"--model_config_file {path}: cannot be read: {e.strerror or e}") from None
    try:
        config = parse(text)
    except text_format.ParseError as e:
        first = str(e).splitlines()[0] if str(e) else "not a text-format ModelServerConfig"
        raise ModelConfigError(f"--model_config_file {path}: not a text-format ModelServerConfig: {first}") \
            from None
    try:
        specs = check(config)
    except InvalidConfig as e:
        raise ModelConfigError(f"--model_config_file {path}: {e}") from None
    if config.WhichOneof("config") is None:   # TF Serving would serve nothing; most likely the wrong file
        raise ModelConfigError(f"--model_config_file {path}: names no model (add model_config_list "
                               "{ config { name base_path model_platform } })")
    return config, specs


def build(specs: Iterable[ModelSpec], base_paths: Optional[Dict[str, str]] = None):
    """A ``ModelServerConfig`` message serving ``specs`` (``base_paths``: a name's path as the server sees it)."""
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.SetInParent()
    for spec in specs:
        model = config.model_config_list.config.add()
        model.name = spec.name
        model.base_path = (base_paths or {}).get(spec.name, spec.base_path)
        model.model_platform = PLATFORM
        policy_to_proto(spec.policy, model.model_version_policy)
        for label, version in spec.labels:
            model.version_labels[label] = version
    return config


def single_model(name: str, base_path: str, num_versions: int) -> ModelSpec:
    """``--model-base-path`` (and ``--model-name``, ``--num-versions``) as a one-model config."""
    return ModelSpec(name, os.path.abspath(base_path), VersionPolicy("latest", num_versions=num_versions))


def to_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def write(config, path: str) -> None:
    """Writes ``config`` in text format, atomically (aside, then renamed over ``path``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    local_files.write_atomically(path, to_text(config))
