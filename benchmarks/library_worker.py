"""The face_recognition library doing Verify's work, for ``benchmarks.throughput``.

Runs inside the library's own environment (never the project's), so it imports
nothing from faceverify.  It reads a JSON job on stdin and prints JSON results:

    {"pairs": [[path_a, path_b], ...],       # cycled for the load levels
     "accuracy_pairs": [[path_a, path_b], ...],
     "levels": [1, 8, 32, 128], "requests": 120, "processes": 2}

Each verification is what a library user writes: load both images, find the
faces (HOG, the library's default), compute the 128-d encoding of the first
face of each (5-point landmarks, one jitter: the defaults), and compare
distances.  A process pool of ``processes`` workers uses every core; ``c``
client threads keep ``c`` verifications in flight, so latency includes the
wait for a free worker, as it would behind a service.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

_fr: Any = None


def _init() -> None:
    global _fr
    import face_recognition

    _fr = face_recognition


def verify(pair: list[str]) -> float | None:
    """Face distance of the two images' first faces; None when either has none."""
    encodings = []
    for path in pair:
        image = _fr.load_image_file(path)
        found = _fr.face_encodings(image, _fr.face_locations(image))
        if not found:
            return None
        encodings.append(found[0])
    return float(np.linalg.norm(encodings[0] - encodings[1]))


def run_level(pool: ProcessPoolExecutor, pairs: list[list[str]], concurrency: int,
              requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()
    issued = 0

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= requests:
                    return
                pair = pairs[issued % len(pairs)]
                issued += 1
            start = time.perf_counter()
            pool.submit(verify, pair).result()
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
            "latencies": latencies}


def main() -> None:
    job = json.load(sys.stdin)
    with ProcessPoolExecutor(job["processes"], initializer=_init) as pool:
        list(pool.map(verify, job["pairs"][:job["processes"]]))  # load the models everywhere
        start = time.perf_counter()
        distances = list(pool.map(verify, job["accuracy_pairs"]))
        accuracy_seconds = time.perf_counter() - start
        levels = [run_level(pool, job["pairs"], c, max(job["requests"], 2 * c))
                  for c in job["levels"]]
    json.dump({"distances": distances, "accuracy_seconds": accuracy_seconds,
               "levels": levels}, sys.stdout)


if __name__ == "__main__":
    main()
