#!/usr/bin/env bash
# Build the CPU and GPU images where no container-image registry is reachable
# (Debian's packages and PyPI are), and prove each one starts and answers Verify.
# Not run by CI (it needs root, several GB and some minutes). From the repository root:
#
#   sudo deploy/build-images.sh [cpu|gpu|both]      (default both)
#
# 1. A Debian bookworm base with Python 3.11, made by debootstrap from the Debian
#    mirror apt already uses, imported as localhost/python:3.11-slim-bookworm.
# 2. podman builds the Dockerfile with BASE set to it (vfs storage and chroot
#    isolation: they work inside a VM; the machine's pip configuration is mounted).
# 3. buildah runs each image (podman run cannot set resource limits in a VM) on a free
#    port, on the CPU provider (a GPU image's CUDA provider needs a GPU host), secured
#    as in production: mutual TLS with certificates and an access policy made here and
#    mounted at /etc/faceverify. It calls health on the plaintext probe port, then
#    Verify over mutual TLS on two LFW images; the result is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANTS=${1:-both}
[ "$VARIANTS" = both ] && VARIANTS="cpu gpu"
BASE=localhost/python:3.11-slim-bookworm
LFW=${FACEVERIFY_LFW_DIR:-../shared/datasets/lfw-dev}
S="--storage-driver vfs"
export DEBIAN_FRONTEND=noninteractive
if ! command -v podman >/dev/null || ! command -v buildah >/dev/null \
    || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman buildah debootstrap >/dev/null
fi
# shellcheck disable=SC2086  # $S is two words
if ! podman $S image exists "$BASE"; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
           || true)
  rootfs=$(mktemp -d) && chmod 755 "$rootfs"  # the image's / (mktemp makes it 0700)
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
      "${mirror:-http://deb.debian.org/debian}" >/dev/null
  tar -C "$rootfs" -c . | podman $S import - "$BASE"
  rm -rf "$rootfs"
fi
mounts=()
[ -f /etc/pip.conf ] && mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)
mounts+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
# Certificates and a policy for the container (benchmarks/certs.py: a CA, a server
# certificate for localhost, a client certificate whose CN the policy maps to admin).
pki=$(mktemp -d)
.venv/bin/python - "$pki" <<'PY'
import json, sys
from pathlib import Path
from benchmarks.certs import Authority
pki = Path(sys.argv[1])
ca = Authority(pki)
ca.pem.rename(pki / "ca.pem")
server, client = ca.issue("tls", "localhost", server=True), ca.issue("client", "image-check")
(pki / "policy.json").write_text(json.dumps(
    {"clients": [{"name": "image-check", "certificate_cn": "image-check", "roles": ["admin"]}]}))
PY
chmod -R a+rX "$pki"
results=()
for variant in $VARIANTS; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  podman $S build --isolation chroot "${mounts[@]}" --build-arg BASE="$BASE" \
      --build-arg VARIANT="$variant" -t "faceverify:$variant" . >"/tmp/faceverify-$variant-build.log" 2>&1 \
      || { tail -30 "/tmp/faceverify-$variant-build.log"; exit 1; }
  built=$(( $(date +%s) - start ))
  # shellcheck disable=SC2086
  size=$(podman $S image inspect --format '{{.Size}}' "faceverify:$variant")
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  probe=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # shellcheck disable=SC2086
  c=$(buildah $S from "faceverify:$variant")
  # shellcheck disable=SC2086
  buildah $S run --isolation chroot --network host -v "$pki":/etc/faceverify:ro \
      --env FACEVERIFY_TLS_CLIENT_CA=/etc/faceverify/ca.pem \
      --env FACEVERIFY_PORT="$port" --env FACEVERIFY_HEALTH_PORT="$probe" \
      --env FACEVERIFY_METRICS_PORT=0 \
      --env FACEVERIFY_PROVIDER=cpu --env FACEVERIFY_DATA_DIR=/tmp/data "$c" -- \
      faceverify serve >"/tmp/faceverify-$variant-serve.log" 2>&1 &
  server=$!
  answer=$(.venv/bin/python - "$port" "$LFW" "$probe" "$pki" <<'PY'
import sys, time
from pathlib import Path
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server.tools.client import FaceVerifyClient
from server.api.tls import ClientTls
port, lfw, probe, pki = sys.argv[1], Path(sys.argv[2]) / "images", sys.argv[3], Path(sys.argv[4])
target = f"127.0.0.1:{port}"
tls = ClientTls(pki / "ca.pem", pki / "client.crt", pki / "client.key", "localhost")
deadline = time.time() + 300
while True:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{probe}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=2).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    if time.time() > deadline:
        sys.exit("not serving after 300 s")
    time.sleep(2)
a = (lfw / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg").read_bytes()
b = (lfw / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg").read_bytes()
with FaceVerifyClient(target, tls=tls) as client:
    r = client.verify(a, b)
    info = client.server_info()
print(f"SERVING; Verify over mutual TLS match={r.match} score={r.score:.3f}; {info.model_version}; "
      f"{info.execution_provider}")
PY
  ) || answer="FAILED: $(tail -5 "/tmp/faceverify-$variant-serve.log")"
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  # shellcheck disable=SC2086
  buildah $S rm "$c" >/dev/null
  results+=("faceverify:$variant: built in ${built} s, $((size / 1000000)) MB; $answer")
  echo "${results[-1]}"
done
rm -rf "$pki"
echo "---"
printf '%s\n' "${results[@]}"
