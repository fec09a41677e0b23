# syntax=docker/dockerfile:1
# Two images from one source tree, with dependencies pinned by uv.lock (hashes checked):
#   docker build --target operator -t ghcr.io/finetune-dev/finetune-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/finetune-dev/finetune-trainer:0.1.0 .
# The operator image has the `operator` extra only (Kopf, kubernetes, aiohttp,
# prometheus_client): no TensorFlow. The trainer image starts from TensorFlow's GPU image
# (CUDA and cuDNN matched to that TensorFlow) and adds the `trainer` extra.
#
# checkov:skip=CKV_DOCKER_2:No HEALTHCHECK: Kubernetes ignores it; deploy/base probes the operator (liveness /healthz on 8082, readiness /healthz on 8081) and the trainer is a batch process with nothing to probe.

# ---- build: the wheel and the locked requirement lists ---------------------------------
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY operator/ ./operator/
COPY trainer/ ./trainer/
# The trainer list leaves out tensorflow itself: the base image's GPU build is kept.
RUN uv export --frozen --no-dev --no-emit-project --extra operator -o /dist/operator.txt \
    && uv export --frozen --no-dev --no-emit-project --extra trainer \
         --no-emit-package tensorflow -o /dist/trainer.txt \
    && uv build --wheel --out-dir /dist

# ---- operator: slim Python, no TensorFlow --------------------------------------------------
FROM python:3.11.14-slim-bookworm AS operator-venv
COPY --from=build /dist /dist
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r /dist/operator.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /dist/finetune_operator-0.1.0-py3-none-any.whl

FROM python:3.11.14-slim-bookworm AS operator
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kopf operator for FineTuneJob (finetune.dev/v1alpha1)" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=operator-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# 65532: the conventional "nonroot" uid; deploy/base runs the pod with the same numbers.
USER 65532:65532
EXPOSE 8080 8081 8082
ENTRYPOINT ["finetune-operator"]

# ---- trainer: TensorFlow GPU base + the trainer extra -------------------------------------
FROM tensorflow/tensorflow:2.21.0-gpu AS trainer
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="Two-phase Keras 3 fine-tuning (finetune-train)" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /dist /dist
RUN python3 -m pip install --no-cache-dir --require-hashes -r /dist/trainer.txt \
    && python3 -m pip install --no-cache-dir --no-deps /dist/finetune_operator-0.1.0-py3-none-any.whl \
    && rm -rf /dist
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["finetune-train"]
