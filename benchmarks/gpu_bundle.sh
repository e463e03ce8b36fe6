#!/usr/bin/env bash
# Prepare .gpu-bundle/ for benchmarks/gpu.sh on a GPU host without registry access:
# the shared bundle (onnxruntime-gpu, the wheels that host lacks, the built models;
# ../shared/gpu-bundle/build.sh) plus a slice of LFW dev (pairs and their images:
# ../shared does not travel to that host). Run from the repository root after
# `make setup`. Nothing here is committed (.gpu-bundle/ is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
LFW=${FACEVERIFY_LFW_DIR:-../shared/datasets/lfw-dev}
PER_FOLD=${PER_FOLD:-30}  # matched and mismatched pairs kept per fold (gpu.sh uses 300 pairs)
../shared/gpu-bundle/build.sh "${1:-$HOME/.cache/faceverify/models}"
rm -rf .gpu-bundle/lfw && mkdir -p .gpu-bundle/lfw/images
.venv/bin/python - "$LFW" "$PER_FOLD" <<'PY'
import shutil, sys
from pathlib import Path
from benchmarks.lfw import image_path, read_pairs
src, per = Path(sys.argv[1]), int(sys.argv[2])
dst = Path(".gpu-bundle/lfw")
lines = [f"5\t{per}"]
for fold in read_pairs(src):
    half = len(fold) // 2
    for p in fold[:per] + fold[half:half + per]:
        lines.append("\t".join([p.a[0], str(p.a[1])] + ([str(p.b[1])] if p.same
                                                       else [p.b[0], str(p.b[1])])))
        for key in (p.a, p.b):
            out = image_path(dst, key)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image_path(src, key), out)
(dst / "pairs.txt").write_text("\n".join(lines) + "\n")
PY
du -sh .gpu-bundle/lfw
echo "carry .gpu-bundle/lfw with the last part; then: . .gpu-bundle/setup.sh && benchmarks/gpu.sh"
