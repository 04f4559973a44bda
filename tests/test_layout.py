"""The package's shape: one ``visiontune`` namespace, imports that run one way, small modules.

Layers, top to bottom (a module may import its own layer's siblings and the
layers below it, never above):

    visiontune.cli                          command line
    visiontune.pipeline | visiontune.serving    orchestration | predictions (peers: neither imports the other)
    visiontune.components                   code the TFX executors run
    visiontune.configs, .features, .errors  settings, names, user errors: no TensorFlow (may import each other)

Every import counts, also the lazy ones inside functions: an upward import is
a cycle waiting to happen, and it drags TensorFlow into places (``--help``,
config checks) that must stay light.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Repository folder -> installed package (setup.py's package_dir).
PACKAGE_DIRS = {"visiontune": "visiontune", "pipeline": "visiontune.pipeline",
                "components": "visiontune.components", "serving": "visiontune.serving"}
BASE = ("visiontune.configs", "visiontune.features", "visiontune.errors")
LAYERS = {"visiontune.cli": 3, "visiontune.pipeline": 2, "visiontune.serving": 2,
          "visiontune.components": 1, **{name: 0 for name in BASE}}
# Heavy libraries the bottom layer must never load.
HEAVY = ("tensorflow", "tf_keras", "tfx", "tensorflow_transform", "tensorflow_model_analysis",
         "apache_beam", "keras")


def _modules():
    """(module name, file path) of every non-test module of the package, from the repository."""
    for folder, package in PACKAGE_DIRS.items():
        root = os.path.join(REPO, folder)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, root)
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            if folder == "visiontune" and rel.split(os.sep)[0] in ("pipeline", "components", "serving"):
                continue
            for name in filenames:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    yield module, os.path.join(dirpath, name)


def _layer(module: str):
    """The layer of a visiontune module (None: the root package, which sets the Keras env only)."""
    for prefix, layer in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, layer
    return None, None


def _imports(path: str, module: str):
    """Every module name ``path`` imports, also inside functions and TYPE_CHECKING blocks."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # ``from visiontune import configs`` imports visiontune.configs
                yield node.lineno, f"{base}.{alias.name}"


def test_every_module_is_under_the_visiontune_namespace():
    modules = dict(_modules())
    assert "visiontune.pipeline.pipeline" in modules and "visiontune.components.trainer" in modules
    for module, path in modules.items():
        for lineno, name in _imports(path, module):
            top = name.split(".")[0]
            assert top not in ("pipeline", "components", "serving"), \
                f"{path}:{lineno} imports {name!r}: use visiontune.{name}"


def test_imports_run_one_way():
    modules = dict(_modules())
    wrong = []
    for module, path in modules.items():
        own_prefix, own = _layer(module)
        if own is None:
            continue
        for lineno, name in _imports(path, module):
            if not name.startswith("visiontune.") or name not in modules and name.rpartition(".")[0] not in modules:
                continue
            target = name if name in modules else name.rpartition(".")[0]
            prefix, layer = _layer(target)
            if layer is None:
                continue
            if layer > own or (layer == own and prefix != own_prefix and own != 0):
                wrong.append(f"{os.path.relpath(path, REPO)}:{lineno}: {module} (layer {own}) imports "
                             f"{target} (layer {layer})")
    assert not wrong, "imports against the direction cli -> pipeline|serving -> components -> base:\n" + \
        "\n".join(wrong)


def test_the_bottom_layer_loads_no_tensorflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in BASE) +
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the bottom layer imports {out.strip()}"


def test_the_command_line_help_loads_no_tensorflow():
    code = ("import sys, contextlib, io\nfrom visiontune import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"`visiontune --help` imports {out.strip()}"


def test_no_module_is_over_500_lines():
    long = {os.path.relpath(path, REPO): n for _, path in _modules()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > 500}
    assert not long, f"split these by concern: {long}"


def test_tests_live_in_tests():
    stray = [os.path.relpath(path, REPO) for _, path in _modules()
             if os.path.basename(path).startswith("test_") or path.endswith("_test.py")]
    assert not stray


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), REPO], check=True, capture_output=True, text=True)
    (path,) = out.glob("visiontune-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_only_the_visiontune_package(wheel):
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"visiontune"}
    for _, path in _modules():
        installed = "visiontune/" + os.path.relpath(path, REPO).removeprefix("visiontune/")
        assert installed in names, f"{installed} missing from the wheel"
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/")]
    templates_dir = os.path.join(REPO, "pipeline", "templates")
    for template in os.listdir(templates_dir) if os.path.isdir(templates_dir) else ():
        assert f"visiontune/pipeline/templates/{template}" in names, f"{template} missing from the wheel"
    entry_points = wheel.read([n for n in names if n.endswith(".dist-info/entry_points.txt")][0]).decode()
    assert "visiontune = visiontune.cli:main" in entry_points
