"""Pipeline definition, settings and runners.

Importing this package makes ``tfx.v1.extensions`` (TFX's Vertex AI and
BigQuery components) load on first use: ``from tfx import v1`` imports it
eagerly, and with it the google-cloud-aiplatform client, about 150 MiB of
memory that a local run never uses.  ``tfx.extensions.google_cloud_ai_platform``
(the Vertex runner) runs the real module on first access.
"""

import importlib.abc
import importlib.machinery
import sys
import types

_EXTENSIONS = "tfx.v1.extensions"


class _LoadedOnFirstUse(types.ModuleType):
    """A module with its real ``__spec__`` and ``__path__``, run on the first missing attribute.

    Unlike ``importlib.util.LazyLoader`` (Python 3.10), reading ``__spec__``
    (which ``import`` does on every module it finds in ``sys.modules``) does
    not run it, and its submodules import as usual.
    """

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        loader = self.__spec__.loader
        self.__class__ = types.ModuleType
        loader.real.exec_module(self)
        return getattr(self, name)


class _DeferredLoader(importlib.abc.Loader):
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return None  # the default module

    def exec_module(self, module):
        module.__class__ = _LoadedOnFirstUse


class _DeferExtensions(importlib.abc.MetaPathFinder):
    """Finds ``tfx.v1.extensions`` as TFX's own files, with a loader that defers running it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _EXTENSIONS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferredLoader(spec.loader)
        return spec


if _EXTENSIONS not in sys.modules and not any(isinstance(f, _DeferExtensions) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeferExtensions())
