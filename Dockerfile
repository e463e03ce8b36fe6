# syntax=docker/dockerfile:1
# faceverify server image.
#   GPU (default): docker build -t faceverify:gpu .                       CUDA 12 + onnxruntime-gpu
#   CPU:           docker build --build-arg VARIANT=cpu -t faceverify:cpu .
# The steps mirror the README's set-up (pip install, `faceverify models build`), which CI runs.
ARG VARIANT=gpu

FROM python:3.11-slim-bookworm AS base-cpu

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS base-gpu
# Versions come with the pinned base image (rebuild it for security updates).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# ---- build: install the package and convert the models once, at image build time ----
# (base-${VARIANT} is one of the pinned stages above.)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY index ./index
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install . \
 && if [ "$VARIANT" = "gpu" ]; then \
      /opt/venv/bin/pip uninstall -y onnxruntime \
      && /opt/venv/bin/pip install "onnxruntime-gpu>=1.18"; \
    fi
# Converted from the face_recognition_models package; the manifest pins every sha256.
RUN /opt/venv/bin/faceverify models build --model-dir /opt/models \
 && /opt/venv/bin/pip uninstall -y face_recognition_models

# ---- runtime: same base (same interpreter), no build tools, non-root ----
# hadolint ignore=DL3006
FROM base-${VARIANT}
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
RUN useradd --system --uid 10001 --no-create-home faceverify \
 && mkdir -p /var/lib/faceverify && chown 10001 /var/lib/faceverify
# The enrolment registry and index snapshots: mount durable storage here.
VOLUME ["/var/lib/faceverify"]
USER 10001
ENV PATH=/opt/venv/bin:$PATH \
    FACEVERIFY_MODEL_DIR=/opt/models \
    FACEVERIFY_DATA_DIR=/var/lib/faceverify \
    FACEVERIFY_HOST=[::] \
    FACEVERIFY_PORT=50051 \
    FACEVERIFY_METRICS_PORT=9464
# gRPC, and Prometheus metrics over HTTP.
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["faceverify", "health", "--target", "localhost:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["faceverify"]
CMD ["serve"]
