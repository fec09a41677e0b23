# syntax=docker/dockerfile:1
# Two images from one source tree, with dependencies pinned by uv.lock (hashes checked):
#   docker build --target operator -t ghcr.io/finetune-dev/finetune-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/finetune-dev/finetune-trainer:0.1.0 .
# The operator image has the `operator` extra only (Kopf, kubernetes, aiohttp,
# prometheus_client): no TensorFlow. The trainer image starts from TensorFlow's GPU image
# (CUDA and cuDNN matched to that TensorFlow), keeps its TensorFlow and adds the rest of the
# `trainer` extra.
#
# The bases are build arguments whose defaults are the pinned public images; everything after
# FROM is the one recipe. `make images` (hack/build-images.sh) builds the same two targets
# where no registry is reachable: both bases are then one Debian bookworm made with debootstrap
# (Python 3.11, pip, venv, CA certificates, tzdata), and TRAINER_EXTRA=trainer-cpu installs the
# lock's tensorflow-cpu instead of keeping a base's GPU TensorFlow. README.md, "Images".
#
# checkov:skip=CKV_DOCKER_2:No HEALTHCHECK: Kubernetes ignores it; deploy/base probes the operator (liveness /healthz on 8082, readiness /healthz on 8081) and the trainer is a batch process with nothing to probe.
# Each base is two arguments, the image and its tag (a pinned version).
ARG PYTHON_BASE=python
ARG PYTHON_BASE_TAG=3.11.14-slim-bookworm
ARG TRAINER_BASE=tensorflow/tensorflow
ARG TRAINER_BASE_TAG=2.21.0-gpu

# ---- build: uv, the locked requirement lists, the wheel ------------------------------------
FROM ${PYTHON_BASE}:${PYTHON_BASE_TAG} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy
# The package index: PyPI unless the builder passes another.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG UV_DEFAULT_INDEX=https://pypi.org/simple
# uv in a venv of its own: installs into the system Python are refused on bases that mark it
# externally managed (PEP 668), and the other stages only bind-mount the binary.
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock ./
# `trainer` (releases): every locked package but tensorflow itself, the base image's GPU build
# is kept (its version is checked against the lock's below). `trainer-cpu`: the lock's
# tensorflow-cpu is installed like the rest.
ARG TRAINER_EXTRA=trainer
RUN mkdir -p /dist/req \
    && /opt/uv/bin/uv export --frozen --no-dev --no-emit-project --extra operator -o /dist/req/operator.txt \
    && /opt/uv/bin/uv export --frozen --no-dev --no-emit-project --extra "$TRAINER_EXTRA" \
         --no-emit-package tensorflow -o /dist/req/trainer.txt \
    && /opt/uv/bin/uv export --frozen --no-dev --no-emit-project --no-hashes --extra "$TRAINER_EXTRA" \
         -o /tmp/trainer-all.txt \
    && sed -n 's/^\(tensorflow\(-cpu\)\{0,1\}\)==\([^ ;]*\).*/\3/p' /tmp/trainer-all.txt > /dist/req/tensorflow-version \
    && test -s /dist/req/tensorflow-version
COPY README.md ./
COPY contract/ ./contract/
COPY operator/ ./operator/
COPY trainer/ ./trainer/
RUN --mount=type=cache,id=finetune-uv,target=/root/.cache/uv \
    /opt/uv/bin/uv build --wheel --out-dir /dist/wheel

# ---- operator: slim Python, no TensorFlow --------------------------------------------------
FROM ${PYTHON_BASE}:${PYTHON_BASE_TAG} AS operator
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kopf operator for FineTuneJob (finetune.dev/v1alpha1)" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# Bytecode compiled at install time: the root filesystem is read-only in the pod, so nothing
# could be cached at run time and every start would compile every module again.
ENV UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1
ARG UV_DEFAULT_INDEX=https://pypi.org/simple
COPY --from=build /dist/req/operator.txt /tmp/req/
RUN --mount=type=cache,id=finetune-uv,target=/root/.cache/uv \
    --mount=type=bind,from=build,source=/opt/uv/bin/uv,target=/usr/local/bin/uv \
    uv venv --python python3 /opt/venv \
    && uv pip install --python /opt/venv/bin/python --require-hashes -r /tmp/req/operator.txt \
    && rm -rf /tmp/req
COPY --from=build /dist/wheel/ /tmp/wheel/
RUN --mount=type=bind,from=build,source=/opt/uv/bin/uv,target=/usr/local/bin/uv \
    uv pip install --python /opt/venv/bin/python --no-deps --no-cache /tmp/wheel/*.whl \
    && rm -rf /tmp/wheel
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# 65532: the conventional "nonroot" uid; deploy/base runs the pod with the same numbers.
USER 65532:65532
EXPOSE 8080 8081 8082
ENTRYPOINT ["finetune-operator"]

# ---- trainer: TensorFlow GPU base + the trainer extra -------------------------------------
FROM ${TRAINER_BASE}:${TRAINER_BASE_TAG} AS trainer
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="Two-phase Keras 3 fine-tuning (finetune-train)" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1
ARG UV_DEFAULT_INDEX=https://pypi.org/simple
COPY --from=build /dist/req/trainer.txt /dist/req/tensorflow-version /tmp/req/
# --system-site-packages: the base's TensorFlow (and CUDA wheels) stay visible; everything
# the lock lists is installed in the venv and wins over the base's copies.
RUN --mount=type=cache,id=finetune-uv,target=/root/.cache/uv \
    --mount=type=bind,from=build,source=/opt/uv/bin/uv,target=/usr/local/bin/uv \
    uv venv --system-site-packages --python python3 /opt/venv \
    && uv pip install --python /opt/venv/bin/python --require-hashes -r /tmp/req/trainer.txt \
    && TF_CPP_MIN_LOG_LEVEL=3 /opt/venv/bin/python -c 'import sys, tensorflow as tf; want = open("/tmp/req/tensorflow-version").read().strip(); sys.exit(0 if tf.__version__ == want else f"the base has TensorFlow {tf.__version__}, uv.lock {want}")' \
    && rm -rf /tmp/req
COPY --from=build /dist/wheel/ /tmp/wheel/
RUN --mount=type=bind,from=build,source=/opt/uv/bin/uv,target=/usr/local/bin/uv \
    uv pip install --python /opt/venv/bin/python --no-deps --no-cache /tmp/wheel/*.whl \
    && rm -rf /tmp/wheel
# The root filesystem is read-only in the pod (readOnlyRootFilesystem) and the uid has no
# home: HOME and every cache point at /tmp, the Job's emptyDir (the operator sets HOME and
# KERAS_HOME there too). MPLCONFIGDIR: matplotlib (report.html) would otherwise make a
# temporary one on each start and warn.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp \
    KERAS_HOME=/tmp/.keras \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.config/matplotlib
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["finetune-train"]
