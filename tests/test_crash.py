"""A short run of the crash-safety check: SIGKILL mid-enrolment, restart, nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.crash import crash_test, nik_for
from server.core.nik import validate_nik


def test_nik_generator_is_valid_and_unique() -> None:
    niks = {nik_for(p, c) for p in range(3000) for c in (1, 2)}
    assert len(niks) == 6000
    for n in list(niks)[:50]:
        validate_nik(n)


@pytest.mark.parametrize("registry", ["sqlite", "postgresql-2-servers"])
def test_sigkill_during_enrolments_loses_nothing(calibrated_dlib_model_dir: Path,
                                                 lfw_dir: Path, tmp_path: Path, registry: str,
                                                 request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("registry_url") if registry != "sqlite" else ""
    report = crash_test(calibrated_dlib_model_dir, lfw_dir, tmp_path / "data", rounds=2,
                        people_per_round=12, seed=1, registry_url=url,
                        servers=2 if url else 1)
    print(report)
    assert report["failures"] == 0
    assert report["acknowledged_total"] > 0
