"""The flat float64 accumulator: exact, in place, one buffer."""

from __future__ import annotations

import threading
import tracemalloc
from typing import Any

import numpy as np
import pytest
import torch

from aggregator.errors import UpdateRejected
from aggregator.methods.flatsum import CHUNK, PARALLEL_MIN, FlatSum
from aggregator.methods.robust import Aggregator
from protocol.methods._common import AggregationParams


def update(seed: int, sizes: tuple[int, ...] = (3 * CHUNK + 5, 17, 1)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(n, 2, generator=g) * 10 ** (seed % 5) for i, n in enumerate(sizes)}


def reference(updates: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """The per-tensor float64 sum the flat buffer replaces."""
    sums: dict[str, torch.Tensor] = {}
    for tensors, w in updates:
        for k, v in tensors.items():
            c = v.to(torch.float64) * w
            sums[k] = c if k not in sums else sums[k].add_(c)
    total = sum(w for _, w in updates)
    return {k: (v / total).to(torch.float32) for k, v in sums.items()}


@pytest.mark.parametrize("weights", [(1, 1, 1), (3, 70, 1), (0.5, 2.25, 1e6)])
def test_bit_identical_to_a_float64_sum_per_tensor(weights: tuple[float, ...]) -> None:
    updates = [(update(i), w) for i, w in enumerate(weights)]
    flat = FlatSum()
    for tensors, w in updates:
        flat.add(tensors, w)
    got, want = flat.result(sum(weights)), reference(updates)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("weights", [(1, 1), (3, 70, 0.5)])
def test_a_large_update_is_added_on_the_helper_thread_with_the_same_result(
    weights: tuple[float, ...],
) -> None:
    """Queued for the helper thread; the caller goes on; the result waits for it."""
    sizes = (PARALLEL_MIN // 3, 5, PARALLEL_MIN // 2 + 7, 3 * CHUNK + 1)  # x2: above the bar
    updates = [(update(i, sizes), w) for i, w in enumerate(weights)]
    flat = FlatSum()
    for tensors, w in updates:
        flat.add(tensors, w)
    assert any(t.name.startswith("flatsum") for t in threading.enumerate())
    got, want = flat.result(sum(weights)), reference(updates)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_one_buffer_and_no_temporary_of_an_updates_size() -> None:
    big = update(1, sizes=(1 << 20,))  # 8 MiB of float64 once summed
    flat = FlatSum()
    flat.add(big, 3)
    assert flat.data.dtype == np.float64 and flat.data.size == 2 << 20
    tracemalloc.start()
    try:
        flat.add(update(2, sizes=(1 << 20,)), 5)
        flat.settle()  # (added on the helper thread)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # the per-tensor float64 way allocates 16 MiB here


def test_a_different_layout_is_refused_before_anything_is_added() -> None:
    flat = FlatSum()
    flat.add(update(1), 1)
    before = flat.data.copy()
    other = update(2)
    other["t1"] = torch.ones(18, 2)
    with pytest.raises(ValueError, match="shape"):
        flat.add(other, 1)
    with pytest.raises(ValueError, match="names"):
        flat.add({"t0": update(3)["t0"]}, 1)
    assert np.array_equal(flat.data, before)
    agg = Aggregator(AggregationParams())  # the method sees it as a mismatched payload
    agg.add(update(1), 1)
    with pytest.raises(UpdateRejected):
        agg.add(other, 1)


def test_bfloat16_and_non_contiguous_inputs() -> None:
    x = torch.randn(64, 32)
    flat = FlatSum()
    flat.add({"w": x.T.to(torch.bfloat16)}, 2)
    want = x.T.to(torch.bfloat16).to(torch.float64) * 2
    assert torch.equal(flat.result(1.0, torch.float64)["w"], want)


def test_large_adds_are_queued_at_most_queued_max_and_the_result_waits_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aggregator.methods import flatsum

    gate = threading.Event()
    real = flatsum._add

    def held(*args: object) -> None:
        gate.wait(10)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(flatsum, "_add", held)
    sizes = (PARALLEL_MIN + 3,)
    updates = [(update(i, sizes), float(i + 1)) for i in range(flatsum.QUEUED_MAX + 1)]
    flat = FlatSum()
    for tensors, w in updates[:-1]:
        flat.add(tensors, w)  # queued: returns while the helper is held
    last = threading.Thread(target=flat.add, args=updates[-1])
    last.start()
    last.join(0.3)
    assert last.is_alive()  # one more than QUEUED_MAX waits for the oldest
    gate.set()
    last.join(10)
    got, want = flat.result(sum(w for _, w in updates)), reference(updates)
    assert torch.equal(got["t0"], want["t0"])


def test_a_decoded_payload_is_added_as_one_span_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A payload's tensors are views of its data area: the layout follows their memory order,
    and each update is added in one (dst, src) pair, bit-identical to the per-tensor sum."""
    from aggregator.methods import flatsum
    from protocol import payloads

    def decoded(seed: int) -> dict[str, torch.Tensor]:
        blob = payloads.encode_lora(update(seed), method="fedit", round=1)
        return payloads.decode(memoryview(bytearray(blob)), None, copy=False).tensors

    calls: list[int] = []
    real = flatsum._add

    def counted(pairs: list[tuple[np.ndarray, np.ndarray]], *args: Any) -> None:
        calls.append(len(pairs))
        real(pairs, *args)

    monkeypatch.setattr(flatsum, "_add", counted)
    monkeypatch.setattr(FlatSum, "helpers", 1)  # one call per update (parts: the test below)
    weights = (3.0, 70.0, 1.0)
    updates = [(decoded(i), w) for i, w in enumerate(weights)]
    flat = FlatSum()
    for tensors, w in updates:
        flat.add(tensors, w)
    got, want = flat.result(sum(weights)), reference(updates)
    assert calls == [1, 1, 1]
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # a copy that is not one buffer (another memory order) is summed tensor by tensor, the same
    flat.add({k: v.clone() for k, v in updates[0][0].items()}, 2)
    flat.settle()
    assert calls[-1] == len(updates[0][0])


@pytest.mark.parametrize("helpers", [2, 3])
def test_parts_on_helpers_of_their_own_give_the_same_sum(
    monkeypatch: pytest.MonkeyPatch, helpers: int
) -> None:
    """With several helpers the buffer is cut into parts, each summed on its own thread: every
    update is split at the parts' bounds (tensors that straddle one included, as one span or
    tensor by tensor), and the sum is bit-identical to the per-tensor float64 sum."""
    from aggregator.methods import flatsum
    from protocol import payloads

    seen: list[tuple[str, int]] = []
    real = flatsum._add

    def traced(pairs: list[tuple[np.ndarray, np.ndarray]], *args: Any) -> None:
        seen.append((threading.current_thread().name, sum(d.size for d, _ in pairs)))
        real(pairs, *args)

    monkeypatch.setattr(flatsum, "_add", traced)
    monkeypatch.setattr(FlatSum, "helpers", helpers)
    sizes = (PARALLEL_MIN // 3 + 1, 5, PARALLEL_MIN // 2 + 7, 3 * CHUNK + 1)  # x2 elements each

    def decoded(seed: int) -> dict[str, torch.Tensor]:
        blob = payloads.encode_lora(update(seed, sizes), method="fedit", round=1)
        return payloads.decode(memoryview(bytearray(blob)), None, copy=False).tensors

    weights = (3.0, 70.0, 0.5, 1.0)
    updates = [(decoded(i), w) for i, w in enumerate(weights[:2])]  # spans
    updates += [(update(i + 2, sizes), w) for i, w in enumerate(weights[2:])]  # tensor by tensor
    flat = FlatSum()
    for tensors, w in updates:
        flat.add(tensors, w)
    got, want = flat.result(sum(weights)), reference(updates)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    total = flat.data.size
    assert len(seen) == helpers * len(updates)
    names = {name for name, _ in seen}
    assert names == {f"flatsum-{p}_0" for p in range(helpers)}  # thread 0 of pool p
    for name in names:  # each helper adds the same part of every update
        per_update = [n for t, n in seen if t == name]
        assert len(per_update) == len(updates) and len(set(per_update)) == 1
        assert 0 < per_update[0] < total
    assert sum(n for _, n in seen) == total * len(updates)
