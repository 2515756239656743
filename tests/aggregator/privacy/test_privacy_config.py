"""``[privacy]`` is validated at ``config check``: every mode that cannot apply says why."""

from __future__ import annotations

from typing import Any

import pytest

from aggregator.errors import ConfigError
from aggregator.ops.config import build_config


def _config(privacy: dict[str, Any], method: str = "fedit", **params: Any) -> Any:
    return build_config(
        {
            "security": {"insecure": True},
            "run": {"method": method},
            "method": params,
            "privacy": privacy,
        }  # fmt: skip
    )


def test_off_by_default_and_fedit_and_slora_take_secure_aggregation() -> None:
    assert not _config({}).privacy.secure_aggregation
    assert _config({"secure_aggregation": True}).privacy.secagg.degree == 8
    assert _config({"secure_aggregation": True}, "slora").privacy.secure_aggregation
    with pytest.raises(ConfigError, match="differential privacy is wired for fedit only"):
        _config({"dp": "local", "noise_multiplier": 1.0}, "slora")


@pytest.mark.parametrize(
    ("method", "why"),
    [("fedpipe", "mixed ranks"), ("fedbiot", "not wired")],
)
def test_methods_it_cannot_cover_are_refused_with_the_reason(method: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"secure aggregation cannot run {method}: .*{why}"):
        _config({"secure_aggregation": True}, method)


def test_ferret_takes_secure_aggregation() -> None:
    # every agent of a round draws from the same pool (its base seed has no agent in it),
    # so the (group, seed) grids of one round line up
    config = _config({"secure_aggregation": True}, "ferret", ferret={"k": 6})
    assert config.privacy.secure_aggregation


def test_ferret_coefficients_clamped_past_the_fixed_point_range_are_refused() -> None:
    with pytest.raises(ConfigError, match="ferret.clip_norm 100 exceeds secagg.clip_range 64"):
        _config({"secure_aggregation": True}, "ferret", ferret={"clip_norm": 100.0})
    ok = {"secure_aggregation": True, "secagg": {"clip_range": 128.0}}
    assert _config(ok, "ferret", ferret={"clip_norm": 100.0}).privacy.secure_aggregation
    with pytest.raises(ConfigError, match="differential privacy is wired for fedit only"):
        _config({"secure_aggregation": True, "dp": "local", "noise_multiplier": 1.0}, "ferret")


def test_rules_that_need_individual_updates_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        _config({"secure_aggregation": True}, aggregation={"rule": "median", "clip_norm": 1.0})
    assert "median rule needs every individual update" in str(info.value)
    assert "clip_norm clips individual updates" in str(info.value)


def test_the_fixed_point_capacity_is_checked() -> None:
    with pytest.raises(ConfigError, match="overflows the 2\\*\\*63 signed range"):
        _config({"secure_aggregation": True, "max_weight": 10**9, "secagg": {"clip_range": 1e6}})


def test_an_odd_degree_and_a_low_threshold_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        _config({"secure_aggregation": True, "secagg": {"degree": 5, "threshold_ratio": 0.4}})
    assert "degree" in str(info.value) and "threshold_ratio" in str(info.value)


def test_dp_needs_a_noise_level_or_a_target() -> None:
    with pytest.raises(ConfigError, match="dp needs noise_multiplier or target_epsilon"):
        _config({"dp": "central"})
    with pytest.raises(ConfigError, match="need dp = central or local"):
        _config({"target_epsilon": 8.0})


def test_local_flags_make_a_valid_privacy_section() -> None:
    from aggregator.local.options import local_privacy

    assert local_privacy(secagg=False, dp_epsilon=None, dp_mode="central") == {}
    section = local_privacy(secagg=True, dp_epsilon=8.0, dp_mode="local")
    assert section == {"secure_aggregation": True, "dp": "local", "target_epsilon": 8.0}
    assert _config(section).privacy.target_epsilon == 8.0
