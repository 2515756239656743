"""Library noise an operator cannot act on stays out of the agent log."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest

from edge_agent.model import quiet

KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"


@pytest.fixture
def installed() -> Iterator[None]:
    logger = logging.getLogger(quiet.BNB_CPU_LOGGER)
    saved_filters = logger.filters[:]
    with warnings.catch_warnings():
        quiet.install()
        yield
    logger.filters[:] = saved_filters
    quiet.quantized_base(False)
    quiet._state["held"] = None


def test_kernels_warning_held_back_for_an_unquantized_base(
    installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    quiet.quantized_base(False)
    with caplog.at_level(logging.INFO):
        logging.getLogger(quiet.BNB_CPU_LOGGER).warning(KERNELS)
        logging.getLogger(quiet.BNB_CPU_LOGGER).warning("another bitsandbytes warning")
        quiet.quantized_base(False)  # an fp32 base: it is never said
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["another bitsandbytes warning"]
    with caplog.at_level(logging.INFO):
        quiet.quantized_base(True)  # an NF4 base later: said once, now
        quiet.quantized_base(True)
    said = [r for r in caplog.records if "kernels-community" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


def test_kernels_warning_kept_once_a_quantized_base_is_loaded(
    installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    quiet.quantized_base(True)
    with caplog.at_level(logging.INFO):
        logging.getLogger(quiet.BNB_CPU_LOGGER).warning(KERNELS)
    assert [r.getMessage() for r in caplog.records] == [KERNELS]


def test_is_gradient_checkpointing_future_warning_is_ignored(installed: None) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet.install()
        message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
        warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
