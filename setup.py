"""visiontune: fine-tune ImageNet-pretrained Keras backbones with TFX and serve them."""

from setuptools import setup

setup(
    name="visiontune",
    version="0.1.0",
    description="A TFX pipeline that fine-tunes keras.applications backbones on your images "
                "and pushes them to TF Serving",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.11",
    # The repository keeps the design's top-level folders; they install as
    # subpackages of the one ``visiontune`` namespace (no generic top-level
    # ``pipeline`` or ``serving`` in site-packages).
    package_dir={"visiontune": "visiontune", "visiontune.cli": "visiontune/cli",
                 "visiontune.pipeline": "pipeline", "visiontune.components": "components",
                 "visiontune.serving": "serving"},
    packages=["visiontune", "visiontune.cli", "visiontune.configs", "visiontune.pipeline", "visiontune.components",
              "visiontune.serving"],
    # The run and comparison reports' Jinja2 templates.
    package_data={"visiontune.pipeline": ["templates/*.html"]},
    install_requires=[
        # The TFX 1.16 stack; exact versions of everything are pinned in constraints.txt.
        "tfx[kfp]==1.16.0",
        "tensorflow==2.16.2",
        "tf-keras==2.16.0",
        "tensorflow-transform==1.16.0",
        "tensorflow-model-analysis==0.47.1",
        "apache-beam==2.74.0",
        # Beam 2.74 made dill optional, but TensorFlow Transform imports it.
        "dill",
        "tensorflow-serving-api==2.16.1",
        "prometheus-client",  # the model server's /monitoring/prometheus/metrics
        "pillow",
        "pyyaml",
        "tqdm",
        "google-crc32c",  # the fast CRC32C of Beam's TFRecord coder (ingest writes shards without TensorFlow)
        "scikit-learn",  # the demo's bundled digits
        "matplotlib",  # the run report's figures (Agg backend)
        "jinja2",  # the run report's HTML (autoescaped templates)
    ],
    # pytest-xdist: ``make test``'s two workers; hypothesis: the REST fuzz test
    extras_require={"test": ["pytest", "pytest-xdist", "scikit-learn", "hypothesis"]},
    entry_points={"console_scripts": ["visiontune=visiontune.cli:main"]},
)
