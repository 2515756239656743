"""A user's partial parameter block merges over the method's own defaults."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.methods import NAMES, PARAMS, BadParams, parse_params


def test_partial_ferret_train_block_keeps_ferrets_lr() -> None:
    params: Any = parse_params("ferret", {"train": {"steps": 12}})
    assert params.train.steps == 12
    assert params.train.lr == 0.01
    assert params.train.grad_clip == 1.0


def test_user_values_win_over_defaults() -> None:
    params: Any = parse_params("ferret", {"train": {"steps": 12, "lr": 0.5}})
    assert (params.train.steps, params.train.lr) == (12, 0.5)


@pytest.mark.parametrize("method", NAMES)
def test_every_block_keeps_the_defaults_the_user_did_not_set(method: str) -> None:
    defaults = PARAMS[method]().model_dump()
    for block, value in defaults.items():
        if not isinstance(value, dict) or not value:
            continue
        key = next(iter(value))
        others = {k: v for k, v in value.items() if k != key}
        parsed = parse_params(method, {block: {key: value[key]}}).model_dump()
        assert {k: v for k, v in parsed[block].items() if k != key} == others


def test_unknown_key_in_a_partial_block_is_still_refused() -> None:
    with pytest.raises(BadParams, match="train.nonsense"):
        parse_params("ferret", {"train": {"nonsense": 1}})
