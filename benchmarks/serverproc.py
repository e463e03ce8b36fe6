"""A real ``faceverify serve`` subprocess on a free local port, for the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, data_dir: Path, port: int, insecure: bool = True,
                 **env: str) -> subprocess.Popen[bytes]:
    """Start the server (plaintext and open unless ``insecure`` is False, when
    ``env`` must name its TLS files and policy); ``env`` adds FACEVERIFY_* settings."""
    full_env = {**os.environ, "FACEVERIFY_MODEL_DIR": str(model_dir),
                "FACEVERIFY_DATA_DIR": str(data_dir), "FACEVERIFY_PROVIDER": "cpu", **env}
    return subprocess.Popen([sys.executable, "-m", "server.tools.cli", "serve",
                             *(["--insecure"] if insecure else []),
                             "--host", "127.0.0.1", "--port", str(port)], env=full_env)


def wait_serving(target: str, proc: subprocess.Popen[bytes], timeout: float = 180,
                 client_flags: tuple[str, ...] = ("--plaintext",)) -> None:
    """Block until the server's health check says SERVING (``client_flags``: how
    the CLI reaches it)."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run([sys.executable, "-m", "server.tools.cli", "health", *client_flags,
                              "--target", target, "--timeout", "2"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            return
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server did not become SERVING: {out.stdout} {out.stderr}")
        time.sleep(0.3)
