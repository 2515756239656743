"""Shamir sharing, fixed-point encoding, the mask PRG, the graph and the sealed-share transport."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.secagg import crypto, fixedpoint, shamir
from protocol.secagg.errors import SecAggError
from protocol.secagg.graph import neighbours


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 12), st.data())
def test_any_threshold_shares_recover_the_secret(secret: bytes, count: int, data) -> None:
    t = data.draw(st.integers(1, count))
    shares = shamir.split(secret, count, t)
    subset = data.draw(st.permutations(shares))[:t]
    assert shamir.combine(subset, t, 32) == secret


def test_fewer_shares_than_the_threshold_fail() -> None:
    shares = shamir.split(os.urandom(32), 5, 3)
    with pytest.raises(SecAggError, match="2 shares, 3 needed"):
        shamir.combine(shares[:2], 3, 32)


def test_below_threshold_shares_say_nothing_two_runs_differ() -> None:
    # the same secret split twice: any t-1 shares differ (fresh random coefficients)
    secret = bytes(32)
    a, b = shamir.split(secret, 4, 3), shamir.split(secret, 4, 3)
    assert a[0] != b[0] and a[1] != b[1]


def test_conflicting_shares_are_refused() -> None:
    shares = shamir.split(os.urandom(32), 3, 2)
    forged = shares[0][:2] + (int.from_bytes(shares[0][2:], "big") ^ 1).to_bytes(66, "big")
    with pytest.raises(SecAggError, match="two different shares"):
        shamir.combine([shares[0], forged, shares[1]], 2, 32)


def test_fixed_point_round_trip_within_the_documented_error() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.uniform(-3, 3, 1000) for _ in range(10)]
    ring = sum((fixedpoint.encode(p, 4.0, 24) for p in parts), np.zeros(1000, np.uint64))
    error = np.max(np.abs(fixedpoint.decode(ring, 24) - np.sum(parts, axis=0)))
    bound = fixedpoint.sum_error_bound(10, 24)
    assert bound == pytest.approx(10 * 2.0**-25)
    assert 0 < error <= bound


def test_values_outside_the_range_are_refused_not_clipped() -> None:
    with pytest.raises(SecAggError, match="outside the secure-aggregation range"):
        fixedpoint.encode(np.array([0.5, -5.0]), 4.0, 24)
    with pytest.raises(SecAggError, match="NaN"):
        fixedpoint.encode(np.array([np.nan]), 4.0, 24)


def test_capacity_check_names_the_overflow() -> None:
    fixedpoint.check_capacity(1000, 64.0, 24)
    with pytest.raises(SecAggError, match="overflows"):
        fixedpoint.check_capacity(1024, 2.0**30, 24)


def test_prg_is_the_chacha20_keystream_and_depends_on_the_seed() -> None:
    seed = hashlib.sha256(b"x").digest()
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(24))
    assert crypto.prg(seed, 3).tolist() == list(np.frombuffer(stream, "<u8"))
    assert not np.array_equal(crypto.prg(seed, 3), crypto.prg(bytes(32), 3))


def test_pairwise_keys_agree_and_bind_purpose_and_round() -> None:
    a, b = crypto.new_private_key(), crypto.new_private_key()
    ab = crypto.derive(a, crypto.public_bytes(b), "mask", "run/1")
    assert ab == crypto.derive(b, crypto.public_bytes(a), "mask", "run/1")
    assert ab != crypto.derive(a, crypto.public_bytes(b), "share", "run/1")
    assert ab != crypto.derive(a, crypto.public_bytes(b), "mask", "run/2")


def test_an_altered_share_beyond_the_threshold_is_detected() -> None:
    """With more shares than the threshold, a share with one bit flipped never shifts the
    secret silently: an altered share the recovery uses fails it, one it does not use changes
    nothing (with exactly the threshold, nothing can tell)."""
    secret = os.urandom(32)
    shares = shamir.split(secret, 6, 4)
    assert shamir.combine(shares, 4, 32) == secret
    for i in range(6):
        bad = list(shares)
        altered = bytearray(bad[i])
        altered[-1] ^= 1
        bad[i] = bytes(altered)
        if i <= 4:  # the 4 shares used and the one checked against them
            with pytest.raises(SecAggError, match="do not agree|off the polynomial"):
                shamir.combine(bad, 4, 32)
        else:
            assert shamir.combine(bad, 4, 32) == secret


def test_sealed_shares_fail_when_misrouted() -> None:
    key = os.urandom(32)
    sealed = crypto.seal(key, b"share", b"a->b r1")
    assert crypto.open_sealed(key, sealed, b"a->b r1") == b"share"
    with pytest.raises(SecAggError, match="authentication"):
        crypto.open_sealed(key, sealed, b"a->c r1")


@pytest.mark.parametrize(("n", "k"), [(3, 8), (10, 4), (100, 8), (101, 6)])
def test_graph_is_regular_and_symmetric(n: int, k: int) -> None:
    ids = [f"a{i:03d}" for i in range(n)]
    graph = neighbours(ids, k, seed=7)
    expected = min(k, n - 1)
    assert all(len(peers) == expected for peers in graph.values())
    assert all(a in graph[p] for a, peers in graph.items() for p in peers)
    assert graph == neighbours(reversed(ids), k, seed=7)
    assert graph != neighbours(ids, k, seed=8) or n - 1 <= k


def test_wire_checks_what_arrives() -> None:
    from protocol.privacy import BadPrivacyEntry, dp_entry, method_params
    from protocol.secagg import wire

    vector = np.arange(5, dtype=np.uint64)
    assert wire.vector_from(wire.vector_bytes(vector), 5).tolist() == list(range(5))
    with pytest.raises(SecAggError, match="expected 6"):
        wire.vector_from(wire.vector_bytes(vector), 6)
    layout = wire.Layout([("a", (2, 3)), ("b", (4,))], "masked", {"edgefed.seed": "7"})
    back = wire.layout_from(wire.layout_blob(layout))
    assert back == layout and back.length == 10
    assert back != wire.Layout(layout.entries, "lora", layout.meta)
    with pytest.raises(SecAggError, match="repeated names"):
        wire.layout_from(wire.layout_blob(wire.Layout([("a", (1,)), ("a", (2,))])))
    with pytest.raises(SecAggError, match="not JSON"):
        wire.load_json(b"\xff")
    params = {"lora": {"r": 4}, "secagg": {"stage": "mask"}, "dp": {"clip": 1, "noise_std": 0.5}}
    assert method_params(params) == {"lora": {"r": 4}}
    assert dp_entry(params) == (1.0, 0.5)
    with pytest.raises(BadPrivacyEntry):
        dp_entry({"dp": {"clip": 0, "noise_std": 1}})
