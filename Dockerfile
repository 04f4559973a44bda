# The one image every step of the Vertex AI pipeline runs in: the pipeline's
# components (KubeflowV2DagRunner), the Trainer's Vertex AI Training job, and
# the Dataflow workers of ExampleGen, StatisticsGen, Transform and Evaluator
# (--sdk_container_image).  The module code TFX names by path
# (visiontune.components.trainer.run_fn, visiontune.components.transform.preprocessing_fn,
# visiontune.components.pusher.Executor) is installed here as the one
# ``visiontune`` package, so compiling the pipeline uploads nothing.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/visiontune/visiontune:0.1.0 .
#   (or: gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/visiontune/visiontune:0.1.0)
ARG TFX_VERSION=1.16.0
ARG BEAM_VERSION=2.74.0
ARG PYTHON_VERSION=3.10

# Beam's worker boot program, of the Beam version constraints.txt installs.
FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam

FROM gcr.io/tfx-oss-public/tfx:${TFX_VERSION}

WORKDIR /visiontune
COPY setup.py constraints.txt README.md ./
COPY visiontune visiontune
COPY pipeline pipeline
COPY components components
COPY serving serving
COPY configs configs
# Not editable (-e): the package must not depend on this folder's layout
# (the import check runs from / to prove it).
RUN pip install --no-cache-dir -c constraints.txt . \
    && cd / && python -c "import visiontune.components.trainer, visiontune.components.transform, \
visiontune.components.pusher, visiontune.pipeline.pipeline" && visiontune --help > /dev/null

COPY --from=beam /opt/apache/beam /opt/apache/beam
# Pipeline steps and the training job set their own command; Dataflow runs the
# entrypoint, which must be Beam's boot program.
ENTRYPOINT ["/opt/apache/beam/boot"]
