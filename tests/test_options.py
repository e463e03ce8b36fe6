"""Each setting declared once (server/options.py): the environment, the flags of
``serve``, their validation and docs/configuration.md's table all come from that table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.config import Settings, build_settings
from server.errors import ConfigurationError
from server.options import OPTIONS, configuration_table, flag_values, value_at
from server.tools.cli import parser

REPO = Path(__file__).resolve().parent.parent
# Settings fields that are not settings of their own: groups of settings, and the
# record of which were given.
GROUPS = {"limits", "policy", "index", "explicit"}
# Fields of the groups that stay at their defaults (no variable, no flag).
FIXED = {"limits.min_side", "index.retrain_growth"}


def _paths(obj: object, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _paths(value, f"{prefix}{f.name}.")
        elif f.name not in GROUPS:
            out.add(prefix + f.name)
    return out


def test_every_setting_has_one_declaration_and_every_declaration_a_setting() -> None:
    paths = [o.path for o in OPTIONS]
    assert len(paths) == len(set(paths))
    assert set(paths) == _paths(Settings()) - FIXED
    assert len({o.env for o in OPTIONS}) == len(OPTIONS)


def test_the_configuration_table_is_the_declarations() -> None:
    assert configuration_table(Settings()) in (REPO / "docs" / "configuration.md").read_text(), \
        "docs/configuration.md's table is stale: paste `python -m server.config`"


def test_every_flag_of_serve_is_declared_and_overrides_the_environment() -> None:
    args = parser().parse_args(["serve", "--max-image-bytes", "2048", "--no-flip",
                                "--previous-data-key-file", "a.key",
                                "--previous-data-key-file", "b.key", "--log-level", "debug",
                                "--index-kind", "ivf"])
    s = build_settings({"FACEVERIFY_MAX_IMAGE_BYTES": "1024", "FACEVERIFY_FLIP": "true",
                        "FACEVERIFY_PORT": "7000"}, flag_values(args))
    assert (s.limits.max_bytes, s.flip, s.port) == (2048, False, 7000)
    assert s.previous_data_key_files == (Path("a.key"), Path("b.key"))
    assert (s.log_level, s.index.kind) == ("DEBUG", "ivf")
    assert {"limits.max_bytes", "flip", "port", "index.kind"} <= s.explicit
    flags = {a.dest for a in parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
             .choices["serve"]._actions if a.dest != "help"}
    assert flags == {o.path for o in OPTIONS if o.flag}


def test_defaults_come_from_settings_alone() -> None:
    s = build_settings({}, {})
    for o in OPTIONS:
        if o.path not in ("model_dir", "data_dir"):  # follow XDG_* (tested elsewhere)
            assert value_at(s, o.path) == value_at(Settings(), o.path), o.path


@pytest.mark.parametrize(("env", "message"), [
    ({"FACEVERIFY_LOG_LEVEL": "LOUD"}, r"log_level 'LOUD': choose DEBUG, INFO"),
    ({"FACEVERIFY_INDEX_KIND": "hnsw"}, r"index_kind 'hnsw': choose flat, ivf"),
    ({"FACEVERIFY_DUPLICATE_POLICY": "ignore"}, r"duplicate_policy 'ignore': choose flag"),
    ({"FACEVERIFY_CUDNN_CONV_ALGO_SEARCH": "fast"}, r"cudnn_conv_algo_search 'FAST'"),
    ({"FACEVERIFY_MAX_IMAGE_BYTES": "0"}, r"max_image_bytes 0 must be positive"),
    ({"FACEVERIFY_DECODE_BUDGET_MB": "x"}, r"FACEVERIFY_DECODE_BUDGET_MB='x'"),
    ({"FACEVERIFY_FLIP": "maybe"}, r"FACEVERIFY_FLIP='maybe' is not a valid value"),
    ({"FACEVERIFY_GRACE_SECONDS": "-1"}, r"grace_seconds -1.0 must be >= 0"),
])
def test_a_value_a_setting_may_not_take_is_refused_by_name(env: dict[str, str],
                                                           message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_settings(env, {})


def test_each_list_of_choices_is_the_one_its_code_knows() -> None:
    from server.core.enrolment import DuplicatePolicy
    from server.core.presentation import AttackPolicy
    from server.options import (
        DUPLICATE_POLICY_CHOICES,
        PRESENTATION_ATTACK_POLICY_CHOICES,
        PROVIDER_CHOICES,
    )
    from server.pipeline.runtime import PROVIDERS

    assert ("auto", *PROVIDERS) == PROVIDER_CHOICES
    assert set(DUPLICATE_POLICY_CHOICES) == {p.value for p in DuplicatePolicy}
    assert set(PRESENTATION_ATTACK_POLICY_CHOICES) == {p.value for p in AttackPolicy}
