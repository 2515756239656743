"""Shared randomness v1: bit-exact against the spec's reference values, numpy and torch alike."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from protocol import ProtocolError
from protocol import randomness as R

REPO = Path(__file__).resolve().parents[2]
SHARED_SPEC = REPO.parent / "shared" / "spec" / "randomness-v1.json"
PROJECT_COPY = Path(__file__).resolve().parent / "data" / "randomness-v1.json"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def _load_spec() -> dict[str, Any]:
    path = SHARED_SPEC if SHARED_SPEC.exists() else PROJECT_COPY
    return json.loads(path.read_text(encoding="utf-8"))


SPEC = _load_spec()
CASES = SPEC["cases"]
CASE_IDS = [c["name"] or "empty-name" for c in CASES]


def _u64(t: torch.Tensor) -> list[int]:
    """The uint64 values held in the bits of an int64 tensor."""
    return [v & (2**64 - 1) for v in t.cpu().tolist()]


# --- reference values -------------------------------------------------------------------------


def test_project_copy_matches_shared_spec() -> None:
    assert PROJECT_COPY.exists()
    if not SHARED_SPEC.exists():
        pytest.skip("../shared/spec is not beside this checkout")
    assert PROJECT_COPY.read_bytes() == SHARED_SPEC.read_bytes()


def test_spec_file_is_version_1() -> None:
    assert SPEC["spec"] == "edgefed-randomness-v1"
    assert R.VERSION == 1
    assert len(CASES) == 4


def test_mix64_reference_values() -> None:
    assert len(SPEC["mix64_of"]) == 3
    for z, expected in SPEC["mix64_of"].items():
        assert R.mix64(int(z)) == expected


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_numpy(case: dict[str, Any]) -> None:
    assert R.fnv1a64(case["name"]) == case["fnv1a64"]
    key = R.stream_key(case["seed"], case["name"])
    assert key == case["key"]
    assert R.derive_key(case["seed"], case["fnv1a64"]) == key
    assert R.words(key, len(case["words"])).tolist() == case["words"]
    assert R.uniform(key, len(case["uniform"])).tolist() == case["uniform"]  # exact floats
    signs = R.rademacher(key, 130)
    assert signs.dtype == np.float32
    assert signs.tolist() == case["rademacher_first_130"]
    expected_mask = case["mask_n4096_density_0.01"]
    idx = R.mask_indices(key, 4096, 0.01)
    assert idx.dtype == np.int64
    assert idx.tolist() == expected_mask
    assert np.flatnonzero(R.mask_bool(key, 4096, 0.01)).tolist() == expected_mask
    assert R.mask_count(key, 4096, 0.01) == len(expected_mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_torch(case: dict[str, Any], device: str) -> None:
    key = case["key"]
    assert _u64(R.words_torch(key, 4, device=device)) == case["words"]
    u = R.uniform_torch(key, len(case["uniform"]), device=device)
    assert u.dtype == torch.float64
    assert u.device.type == device
    assert u.tolist() == case["uniform"]
    signs = R.rademacher_torch(key, 130, device=device)
    assert signs.dtype == torch.float32
    assert signs.tolist() == case["rademacher_first_130"]
    idx = R.mask_indices_torch(key, 4096, 0.01, device=device)
    assert idx.dtype == torch.int64
    assert idx.tolist() == case["mask_n4096_density_0.01"]


# --- offsets and chunks -----------------------------------------------------------------------

KEY = R.stream_key(20240517, "model.layers.3.mlp.up_proj.weight")


@pytest.mark.parametrize("start", [0, 1, 5, 63, 64, 65, 127, 128, 200, 1000])
def test_start_offsets_match_slices_of_a_longer_draw(start: int) -> None:
    n = 333
    long_w = R.words(KEY, start + n)
    long_u = R.uniform(KEY, start + n)
    long_s = R.rademacher(KEY, start + n)
    np.testing.assert_array_equal(R.words(KEY, n, start), long_w[start:])
    np.testing.assert_array_equal(R.uniform(KEY, n, start), long_u[start:])
    np.testing.assert_array_equal(R.rademacher(KEY, n, start), long_s[start:])
    np.testing.assert_array_equal(R.uniform_torch(KEY, n, start=start).numpy(), long_u[start:])
    np.testing.assert_array_equal(R.rademacher_torch(KEY, n, start=start).numpy(), long_s[start:])
    # a short draw inside one word, starting mid-word
    np.testing.assert_array_equal(R.rademacher(KEY, 3, start), long_s[start : start + 3])
    np.testing.assert_array_equal(
        R.rademacher_torch(KEY, 3, start=start).numpy(), long_s[start : start + 3]
    )


def test_rademacher_is_the_bits_of_the_words() -> None:
    w = R.words(KEY, 3)
    bits = [(int(w[i // 64]) >> (i % 64)) & 1 for i in range(192)]
    assert R.rademacher(KEY, 192).tolist() == [-1.0 if b else 1.0 for b in bits]


def test_uniform_is_the_top_53_bits_of_the_words() -> None:
    w = R.words(KEY, 50)
    assert R.uniform(KEY, 50).tolist() == [(int(x) >> 11) * 2.0**-53 for x in w]


def test_small_chunks_give_the_same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    n, p = 5000, 0.03
    ref = {
        "w": R.words(KEY, n, 7),
        "u": R.uniform(KEY, n, 7),
        "s": R.rademacher(KEY, n, 7),
        "m": R.mask_indices(KEY, n, p),
        "b": R.mask_bool(KEY, n, p),
        "c": R.mask_count(KEY, n, p),
        "ut": R.uniform_torch(KEY, n, start=7).numpy(),
        "st": R.rademacher_torch(KEY, n, start=7).numpy(),
        "mt": R.mask_indices_torch(KEY, n, p).numpy(),
    }
    monkeypatch.setattr(R, "_CHUNK", 97)  # 97 values, or 1 word of signs, per chunk
    monkeypatch.setattr(R, "_TORCH_CHUNK", 130)  # 2 words of signs per chunk
    np.testing.assert_array_equal(R.words(KEY, n, 7), ref["w"])
    np.testing.assert_array_equal(R.uniform(KEY, n, 7), ref["u"])
    np.testing.assert_array_equal(R.rademacher(KEY, n, 7), ref["s"])
    np.testing.assert_array_equal(R.mask_indices(KEY, n, p), ref["m"])
    np.testing.assert_array_equal(R.mask_bool(KEY, n, p), ref["b"])
    assert R.mask_count(KEY, n, p) == ref["c"]
    np.testing.assert_array_equal(R.uniform_torch(KEY, n, start=7).numpy(), ref["ut"])
    np.testing.assert_array_equal(R.rademacher_torch(KEY, n, start=7).numpy(), ref["st"])
    np.testing.assert_array_equal(R.mask_indices_torch(KEY, n, p).numpy(), ref["mt"])
    assert 100 < ref["c"] < 200  # 150 expected: the draws above are not trivially empty


def test_draw_longer_than_a_real_chunk_equals_concatenated_small_draws() -> None:
    n = R._TORCH_CHUNK + 129  # two torch chunks, several numpy chunks (and sign chunks)
    cut = [0, 1000, R._CHUNK + 3, R._TORCH_CHUNK - 1, n]
    u = R.uniform(KEY, n)
    s = R.rademacher(KEY, n)
    ut = R.uniform_torch(KEY, n).numpy()
    st = R.rademacher_torch(KEY, n).numpy()
    for a, b in zip(cut, cut[1:], strict=False):
        np.testing.assert_array_equal(u[a:b], R.uniform(KEY, b - a, a))
        np.testing.assert_array_equal(s[a:b], R.rademacher(KEY, b - a, a))
    np.testing.assert_array_equal(ut, u)
    np.testing.assert_array_equal(st, s)
    idx = R.mask_indices(KEY, n, 0.01)
    np.testing.assert_array_equal(idx, np.flatnonzero(u < 0.01))
    np.testing.assert_array_equal(R.mask_indices_torch(KEY, n, 0.01).numpy(), idx)


# --- masks ------------------------------------------------------------------------------------


def test_mask_is_exactly_uniform_below_p_at_the_boundary() -> None:
    u = R.uniform(KEY, 2000)
    k = 1234
    for p, included in [
        (float(u[k]), False),  # u < p is strict
        (math.nextafter(float(u[k]), 1.0), True),
        (math.nextafter(float(u[k]), 0.0), False),
    ]:
        expected = np.flatnonzero(u < p)
        assert (k in expected) is included
        np.testing.assert_array_equal(R.mask_indices(KEY, 2000, p), expected)
        np.testing.assert_array_equal(R.mask_indices_torch(KEY, 2000, p).numpy(), expected)
        assert R.mask_count(KEY, 2000, p) == expected.size


def test_mask_density_is_close_to_p() -> None:
    n = 1_000_000
    count = R.mask_count(KEY, n, 0.01)
    assert abs(count - 10_000) < 500  # sd is ~99.5
    idx = R.mask_indices(KEY, n, 0.01)
    assert idx.size == count
    assert np.all(np.diff(idx) > 0)
    assert idx[0] >= 0
    assert idx[-1] < n
    assert abs(R.mask_count(KEY, n, 0.5) - 500_000) < 5_000


def test_moments_of_uniform_and_signs() -> None:
    u = R.uniform(KEY, 1_000_000)
    assert u.min() >= 0.0
    assert u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.003
    s = R.rademacher(KEY, 1_000_000)
    assert set(np.unique(s).tolist()) == {-1.0, 1.0}
    assert abs(float(s.mean())) < 0.005


def test_density_zero_and_one() -> None:
    assert R.mask_indices(KEY, 100, 0.0).size == 0
    assert R.mask_count(KEY, 100, 0.0) == 0
    assert not R.mask_bool(KEY, 100, 0.0).any()
    np.testing.assert_array_equal(R.mask_indices(KEY, 100, 1.0), np.arange(100))
    assert R.mask_bool(KEY, 100, 1).all()
    assert R.mask_count(KEY, 100, 1.0) == 100
    assert R.mask_indices_torch(KEY, 100, 0.0).numel() == 0
    assert R.mask_indices_torch(KEY, 100, 1.0).tolist() == list(range(100))


def test_empty_draws() -> None:
    assert R.words(KEY, 0).shape == (0,)
    assert R.uniform(KEY, 0).dtype == np.float64
    assert R.rademacher(KEY, 0, 77).shape == (0,)
    assert R.mask_indices(KEY, 0, 0.5).dtype == np.int64
    assert R.rademacher_torch(KEY, 0).shape == (0,)
    assert R.mask_indices_torch(KEY, 0, 0.5).dtype == torch.int64


def test_other_dtypes() -> None:
    ref = R.rademacher(KEY, 300, 3)
    np.testing.assert_array_equal(R.rademacher(KEY, 300, 3, dtype=np.int8), ref.astype(np.int8))
    assert R.rademacher(KEY, 300, 3, dtype=np.float64).dtype == np.float64
    for dtype in (torch.bfloat16, torch.float64, torch.int8):
        t = R.rademacher_torch(KEY, 300, start=3, dtype=dtype)
        assert t.dtype == dtype
        np.testing.assert_array_equal(t.to(torch.float32).numpy(), ref)


def test_seeds_and_names() -> None:
    assert R.fnv1a64("") == 0xCBF29CE484222325
    assert R.fnv1a64("é") != R.fnv1a64("e")  # UTF-8 bytes, not code points truncated
    assert R.stream_key(2**64 - 1, "x") != R.stream_key(0, "x")
    assert R.stream_key(1, "a.weight") != R.stream_key(1, "b.weight")
    assert R.derive_key(np.uint64(5), 7) == R.derive_key(5, 7)  # type: ignore[arg-type]


# --- invalid arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3", None])
def test_invalid_seed_raises(seed: Any) -> None:
    with pytest.raises(ValueError, match="seed"):
        R.stream_key(seed, "w")
    with pytest.raises(ValueError):
        R.derive_key(seed, 0)


@pytest.mark.parametrize("density", [-0.01, 1.01, float("nan"), float("inf"), "x", None])
def test_invalid_density_raises(density: Any) -> None:
    with pytest.raises(ValueError, match="density"):
        R.mask_indices(KEY, 10, density)
    with pytest.raises(ValueError, match="density"):
        R.mask_bool(KEY, 10, density)
    with pytest.raises(ValueError, match="density"):
        R.mask_count(KEY, 10, density)
    with pytest.raises(ValueError, match="density"):
        R.mask_indices_torch(KEY, 10, density)


def test_invalid_counts_keys_and_dtypes_raise() -> None:
    with pytest.raises(ValueError, match="n must"):
        R.uniform(KEY, -1)
    with pytest.raises(ValueError, match="start must"):
        R.rademacher(KEY, 5, -3)
    with pytest.raises(ValueError, match="start \\+ n"):
        R.words(KEY, 2, 2**64 - 1)
    with pytest.raises(ValueError, match="key"):
        R.uniform_torch(2**64, 3)
    with pytest.raises(ValueError, match="z must"):
        R.mix64(-5)
    with pytest.raises(ValueError, match="dtype"):
        R.rademacher(KEY, 5, dtype=np.uint8)
    with pytest.raises(ValueError, match="dtype"):
        R.rademacher_torch(KEY, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="name"):
        R.fnv1a64(b"bytes")  # type: ignore[arg-type]


def test_errors_belong_to_the_protocol_package() -> None:
    with pytest.raises(ProtocolError):
        R.mask_count(KEY, 10, 2.0)
    assert issubclass(R.RandomnessError, ValueError)
