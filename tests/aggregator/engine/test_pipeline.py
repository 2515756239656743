"""Decoding a burst ahead of the loop gives exactly what decoding inline gives."""

from __future__ import annotations

import threading

import pytest

from aggregator.engine.pipeline import DecodeAhead
from protocol.errors import FrameError
from protocol.frames import decode, encode
from protocol.messages import Bye, TaskResult


def result(i: int) -> list[bytes]:
    header = TaskResult(
        run_id="r", round=1, task_id=f"t{i}", agent_id=f"a{i}", method="fedit",
        num_examples=3, metrics={},
    )  # fmt: skip
    return [bytes(f) for f in encode(header, {"update": bytes([i]) * (1 << 20)})]


def test_a_burst_is_decoded_on_a_worker_in_order_with_the_same_errors() -> None:
    ahead = DecodeAhead()
    burst = [result(i) for i in range(5)]
    tampered = list(result(9))
    tampered[-1] = b"\x00" + tampered[-1][1:]  # the blob no longer matches its sha256
    burst.insert(2, tampered)
    decoders = ahead.burst(burst)
    assert all(d is not None for d in decoders)
    for frames, decoder in zip(burst, decoders, strict=True):
        assert decoder is not None
        if frames is tampered:
            with pytest.raises(FrameError, match="sha256"):
                decoder()
            with pytest.raises(FrameError, match="sha256"):
                decode(frames)
            continue
        got, want = decoder(), decode(frames)
        assert got.header == want.header and bytes(got.blobs["update"]) == bytes(
            want.blobs["update"]
        )
    assert any(t.name.startswith("decode-ahead") for t in threading.enumerate())
    ahead.close()
    assert not any(t.name.startswith("decode-ahead") for t in threading.enumerate())


def test_a_burst_of_one_or_of_small_messages_is_decoded_inline() -> None:
    ahead = DecodeAhead()
    assert ahead.burst([result(1)]) == [None]
    small = [[bytes(f) for f in encode(Bye(reason="x"))]] * 3
    assert ahead.burst(small) == [None] * 3
    assert ahead._pool is None


def test_a_message_taken_ahead_is_decoded_on_the_worker_when_large() -> None:
    ahead = DecodeAhead()
    small = [bytes(f) for f in encode(Bye(reason="x"))]
    assert ahead.start(small) is None  # small: decoded inline
    big = result(3)
    decoder = ahead.start(big)
    assert decoder is not None
    got, want = decoder(), decode(big)
    assert got.header == want.header and bytes(got.blobs["update"]) == bytes(want.blobs["update"])
    ahead.close()
