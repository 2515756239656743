"""benchmarks/dp_noise.py: the adapter size it assumes and the ratio it prints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dp_noise

from aggregator.privacy import dp


def test_the_adapter_is_fedits_default_on_smollm2() -> None:
    # 30 layers x r 8 x (q 576+576, k 576+192, v 576+192, o 576+576): the 3.7 MB adapter
    # (float32) the DP runs in docs/security.md send per agent and round.
    assert dp_noise.adapter_values("SmolLM2-135M") == 30 * 8 * (1152 + 768 + 768 + 1152)


def test_the_ratio_is_the_mean_s_noise_norm_over_the_clip() -> None:
    sigma = dp.calibrate("central", 8.0, 1.0, 3, 1e-5)
    assert dp.epsilon("central", sigma, 1.0, 3, 1e-5) == pytest.approx(8.0, rel=1e-3)
    d = 921_600
    assert dp_noise.ratio(sigma, d, 2) == pytest.approx(sigma * 960 / 2)
    assert dp_noise.ratio(sigma, d, 1000) == pytest.approx(dp_noise.ratio(sigma, d, 2) / 500)
