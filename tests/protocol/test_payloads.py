"""Payload codecs: round trips of every kind, exact byte accounting, and every tampering refused
with its own error."""

import json
import math
import re
import struct
from collections.abc import Callable

import pytest
import safetensors_format as st_format
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protocol import randomness
from protocol.errors import (
    ErrorCode,
    IndexOutOfRange,
    NotFinite,
    PayloadError,
    PayloadHeaderTooLarge,
    PayloadMismatch,
)
from protocol.payloads import (
    MAX_PAYLOAD_HEADER,
    Expect,
    PayloadKind,
    TensorSpec,
    decode,
    encode_dense,
    encode_lora,
    encode_masked,
    encode_seedcoef,
    encode_sparse,
    lora_rank_of,
    read_header,
)

PREFIX = "base_model.model.model.layers.{}.self_attn.{}_proj"
HIDDEN, KV = 16, 8


def lora_state(ranks: tuple[int, ...] = (4, 4, 2), seed: int = 0) -> dict[str, torch.Tensor]:
    """peft-style names; q_proj 16->16 and v_proj 16->8, one rank per layer."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer, r in enumerate(ranks):
        for module, out in (("q", HIDDEN), ("v", KV)):
            p = PREFIX.format(layer, module)
            state[f"{p}.lora_A.weight"] = torch.randn(r, HIDDEN, generator=g)
            state[f"{p}.lora_B.weight"] = torch.randn(out, r, generator=g)
    return state


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from 0.0 and NaN payloads would count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def header_nbytes(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def rewrite_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """The same tensor data under an edited header: what a tampering sender can produce."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def raw_payload(tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    """A hand-made payload written by the safetensors library, bypassing encode's checks."""
    full = {"edgefed.kind": "dense", "edgefed.method": "fedit", "edgefed.round": "1"}
    full |= {f"edgefed.{k}": v for k, v in meta.items()}
    return st_save(tensors, metadata=full)


# --- round trips ------------------------------------------------------------------------------


def test_lora_round_trip_bit_identical_with_exact_bytes() -> None:
    state = lora_state()
    data = encode_lora(state, method="fedit", round=7)
    p = decode(data, Expect(kind=PayloadKind.LORA, method="fedit", round=7, max_rank=4))
    assert (p.kind, p.method, p.round) == (PayloadKind.LORA, "fedit", 7)
    assert list(sorted(p.tensors)) == sorted(state)
    for name, t in state.items():
        assert same_bits(p.tensors[name], t)
    # per layer r*(16 + 16 + 16 + 8) floats: ranks 4, 4, 2 -> (224 + 224 + 112) * 4 bytes
    assert p.raw_nbytes == 2240
    assert p.wire_nbytes == len(data) == p.raw_nbytes + header_nbytes(data)
    assert p.header_nbytes == header_nbytes(data)
    assert lora_rank_of(p.tensors) == {
        PREFIX.format(0, "q"): 4,
        PREFIX.format(0, "v"): 4,
        PREFIX.format(1, "q"): 4,
        PREFIX.format(1, "v"): 4,
        PREFIX.format(2, "q"): 2,
        PREFIX.format(2, "v"): 2,
    }


def test_lora_layers_of_equal_shape_travel_stacked_and_safetensors_reads_them() -> None:
    state = lora_state(ranks=(4, 4, 2))
    data = encode_lora(state, method="fedit", round=0)
    entries = st_load(data)  # the reference reader accepts our bytes
    stacked = "base_model.model.model.layers.*.self_attn.q_proj.lora_A.weight"
    assert entries[stacked].shape == (2, 4, HIDDEN)
    assert torch.equal(entries[stacked][1], state[PREFIX.format(1, "q") + ".lora_A.weight"])
    # layer 2 (rank 2) stays a plain entry; 4 stacked + 4 plain
    assert len(entries) == 8
    meta = read_header(data)[0]["__metadata__"]
    assert json.loads(meta["edgefed.stacked"])[stacked] == "0-1"


def test_encoding_is_deterministic_whatever_the_insertion_order() -> None:
    state = lora_state()
    reordered = dict(reversed(list(state.items())))
    first = encode_lora(state, method="fedit", round=2)
    assert encode_lora(reordered, method="fedit", round=2) == first
    again = encode_lora(decode(first).tensors, method="fedit", round=2)
    assert again == first


def test_lora_header_overhead_of_a_smollm2_shaped_update_is_below_0_1_percent() -> None:
    g = torch.Generator().manual_seed(1)
    state = {}
    for layer in range(30):
        for module, out in (("q", 576), ("k", 192), ("v", 192), ("o", 576)):
            p = PREFIX.format(layer, module)
            state[f"{p}.lora_A.weight"] = torch.randn(8, 576, generator=g)
            state[f"{p}.lora_B.weight"] = torch.randn(out, 8, generator=g)
    data = encode_lora(state, method="fedit", round=0)
    raw = 30 * 8 * (4 * 576 + 576 + 192 + 192 + 576) * 4
    assert raw == 3_686_400
    assert decode(data).raw_nbytes == raw
    assert len(data) - raw < raw // 1000


def test_masked_round_trip_and_exact_size() -> None:
    seed, density = 1234, 0.1
    shapes = {"layers.0.mlp.up_proj.weight": (64, 32), "layers.0.mlp.down_proj.weight": (32, 64)}
    g = torch.Generator().manual_seed(3)
    dense = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    values, counts = {}, {}
    for name, shape in shapes.items():
        idx = randomness.mask_indices(randomness.stream_key(seed, name), math.prod(shape), density)
        values[name] = dense[name].reshape(-1)[torch.from_numpy(idx)]
        counts[name] = len(idx)
    data = encode_masked(values, shapes, seed=seed, density=density, method="slora", round=3)
    expect = Expect(kind=PayloadKind.MASKED, shapes=shapes, seed=seed, density=density)
    p = decode(data, expect)
    assert p.shapes == shapes
    assert (p.seed, p.density) == (seed, density)
    for name in shapes:
        assert same_bits(p.tensors[name], values[name])
    # randomness v1 selects 210 of 2048 and 188 of 2048 elements (density 0.1)
    assert counts == {"layers.0.mlp.up_proj.weight": 210, "layers.0.mlp.down_proj.weight": 188}
    assert p.raw_nbytes == 4 * 398 == 1592
    # no indices travel: the safetensors header of two F32 value vectors is all that is added
    meta = {"edgefed.density": "0.1", "edgefed.kind": "masked", "edgefed.method": "slora",
            "edgefed.randomness": "1", "edgefed.round": "3", "edgefed.seed": "1234",
            "edgefed.shapes": json.dumps({n: list(s) for n, s in shapes.items()},
                                         separators=(",", ":"))}  # fmt: skip
    header = st_format.header_json(meta, {n: ("F32", [c], 4 * c) for n, c in counts.items()})
    assert st_format.parse(data)[0] == header
    assert header_nbytes(data) == st_format.header_frame_nbytes(header)
    assert len(data) == 4 * 398 + st_format.header_frame_nbytes(header)


def test_sparse_round_trip_int64_and_int32_indices() -> None:
    indices = {
        "a": torch.tensor([0, 5, 9], dtype=torch.int64),
        "b": torch.tensor([3], dtype=torch.int32),
    }
    values = {"a": torch.tensor([1.5, -2.0, 0.25]), "b": torch.tensor([7.0], dtype=torch.bfloat16)}
    shapes = {"a": (2, 5), "b": (4,)}
    data = encode_sparse(indices, values, shapes, method="fedit", round=1)
    p = decode(data, Expect(kind=PayloadKind.SPARSE, shapes=shapes))
    assert p.shapes == shapes
    for name in shapes:
        assert same_bits(p.tensors[f"{name}.indices"], indices[name])
        assert same_bits(p.tensors[f"{name}.values"], values[name])
    assert p.raw_nbytes == 3 * 8 + 3 * 4 + 1 * 4 + 1 * 2


def test_seedcoef_round_trip_twelve_bytes_per_triple() -> None:
    group = torch.tensor([0, 0, 1, 2], dtype=torch.int32)
    seed = torch.tensor([5, 7, 5, 0], dtype=torch.int32)
    value = torch.tensor([0.5, -1.0, 2.0, 3.0])
    data = encode_seedcoef(
        group, seed, value, base_seed=99, k=8, n_groups=3, method="ferret", round=4
    )
    p = decode(data, Expect(kind=PayloadKind.SEEDCOEF, base_seed=99, k=8, n_groups=3))
    assert (p.base_seed, p.k, p.n_groups) == (99, 8, 3)
    assert same_bits(p.tensors["group"], group)
    assert same_bits(p.tensors["seed"], seed)
    assert same_bits(p.tensors["value"], value)
    assert p.raw_nbytes == 12 * 4
    assert len(data) == 48 + header_nbytes(data)


def test_dense_round_trip_every_accepted_dtype() -> None:
    tensors = {
        "f32": torch.tensor([[1.0, -0.0], [3.5, 1e-30]]),
        "f16": torch.tensor([1.0, 65504.0], dtype=torch.float16),
        "bf16": torch.tensor([0.1, -3.0], dtype=torch.bfloat16),
        "i64": torch.tensor([2**62, -1]),
        "i32": torch.tensor([7], dtype=torch.int32),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    data = encode_dense(tensors, method="fedbiot", round=0, meta={"note": "emulator"})
    p = decode(data)
    assert p.meta["note"] == "emulator"
    assert set(p.tensors) == set(tensors)
    for name, t in tensors.items():
        assert same_bits(p.tensors[name], t), name
    assert same_bits(p.tensors["f32"][0, 1], torch.tensor(-0.0))
    assert not same_bits(torch.tensor(0.0), torch.tensor(-0.0))
    assert p.raw_nbytes == 16 + 4 + 4 + 16 + 4 + 2 + 2 + 3 + 4 + 0


def test_encode_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(NotFinite):
        encode_dense({"w": torch.tensor([1.0, math.nan])}, method="fedit", round=0)
    with pytest.raises(PayloadError, match="float64"):
        encode_dense({"w": torch.zeros(2, dtype=torch.float64)}, method="fedit", round=0)
    bad = lora_state()
    bad[PREFIX.format(0, "q") + ".lora_B.weight"] = torch.zeros(HIDDEN, 3)
    with pytest.raises(PayloadMismatch, match="rank mismatch"):
        encode_lora(bad, method="fedit", round=0)
    with pytest.raises(PayloadError, match="method"):
        encode_lora(lora_state(), method="Bad Method", round=0)
    with pytest.raises(PayloadError, match="set by encode"):
        encode_dense({}, method="fedit", round=0, meta={"edgefed.kind": "lora"})


# --- tampering --------------------------------------------------------------------------------


def test_header_length_over_the_cap_is_refused_before_parsing() -> None:
    data = struct.pack("<Q", MAX_PAYLOAD_HEADER + 1) + b"x" * 16  # never parsed: not JSON
    with pytest.raises(PayloadHeaderTooLarge) as info:
        decode(data)
    assert info.value.code is ErrorCode.PAYLOAD_HEADER_TOO_LARGE
    valid = encode_lora(lora_state(), method="fedit", round=0)
    with pytest.raises(PayloadHeaderTooLarge):
        decode(valid, max_header=header_nbytes(valid) - 9)
    assert decode(valid, max_header=header_nbytes(valid) - 8).raw_nbytes == 2240


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05\x00\x00",
        struct.pack("<Q", 40) + b"{}",  # header runs past the end
        struct.pack("<Q", 9) + b"{not json",
        struct.pack("<Q", 4) + b"[1] ",  # not an object
        struct.pack("<Q", 4) + b"\xff\xfe{}",  # not UTF-8
        struct.pack("<Q", 15) + b'{"a":1,"a":2} ',  # duplicate key
    ],
)
def test_garbage_header_is_a_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError) as info:
        decode(data)
    assert type(info.value) is PayloadError
    assert info.value.code is ErrorCode.BAD_PAYLOAD


def _set_entry(name: str, key: str, value: object) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header[name][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (_set_entry("w", "data_offsets", [0, 4096]), "needs 32 bytes"),  # beyond the buffer
        (_set_entry("w", "data_offsets", [8, 40]), "gap or overlap"),
        (_set_entry("w", "shape", [2, 5]), "needs 40 bytes"),
        (_set_entry("w", "shape", [-2, -4]), "shape"),
        (_set_entry("w", "dtype", "F64"), "not accepted"),
        (_set_entry("w", "dtype", "F16"), "needs 16 bytes"),
        (_set_entry("w", "extra", 1), "exactly"),
        (lambda h: h["__metadata__"].update({"edgefed.round": 3}), "strings"),
        (lambda h: h["__metadata__"].pop("edgefed.kind"), "not an edgefed payload"),
        (lambda h: h["__metadata__"].update({"edgefed.kind": "zip"}), "unknown payload kind"),
        (lambda h: h["__metadata__"].update({"edgefed.round": "-1"}), "edgefed.round"),
    ],
)
def test_inconsistent_header_is_a_payload_error(edit: Callable[[dict], None], why: str) -> None:
    data = raw_payload({"w": torch.ones(2, 4), "z": torch.ones(3)})
    assert decode(data).raw_nbytes == 44
    with pytest.raises(PayloadError, match=why) as info:
        decode(rewrite_header(data, edit))
    assert type(info.value) is PayloadError


def test_truncated_or_padded_data_is_refused() -> None:
    data = encode_lora(lora_state(), method="fedit", round=0)
    with pytest.raises(PayloadError, match="cover"):
        decode(data[:-4])
    with pytest.raises(PayloadError, match="cover"):
        decode(data + b"\0\0\0\0")


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    data = bytearray(raw_payload({"m": torch.tensor([True, False])}))
    data[-1] = 7
    with pytest.raises(PayloadError, match="bool"):
        decode(bytes(data))


@pytest.mark.parametrize(
    ("expect", "why"),
    [
        (Expect(kind=PayloadKind.DENSE), "kind 'lora'"),
        (Expect(method="slora"), "method 'fedit'"),
        (Expect(round=3), "round 2"),
        (Expect(max_rank=3), "rank 4 exceeds 3"),
    ],
)
def test_wrong_kind_method_round_or_rank_is_a_mismatch(expect: Expect, why: str) -> None:
    data = encode_lora(lora_state(), method="fedit", round=2)
    with pytest.raises(PayloadMismatch, match=why) as info:
        decode(data, expect)
    assert info.value.code is ErrorCode.PAYLOAD_MISMATCH


def lora_specs(ranks: tuple[int, ...] = (4, 4, 2)) -> dict[str, TensorSpec]:
    specs = {}
    for layer in range(len(ranks)):
        for module, out in (("q", HIDDEN), ("v", KV)):
            p = PREFIX.format(layer, module)
            specs[f"{p}.lora_A.weight"] = TensorSpec((None, HIDDEN), torch.float32)
            specs[f"{p}.lora_B.weight"] = TensorSpec((out, None), torch.float32)
    return specs


def test_expected_tensors_with_free_rank_accept_any_rank() -> None:
    data = encode_lora(lora_state(ranks=(8, 1, 3)), method="fedit", round=0)
    p = decode(data, Expect(tensors=lora_specs((8, 1, 3)), max_rank=8))
    assert sorted(lora_rank_of(p.tensors).values()) == [1, 1, 3, 3, 8, 8]


def test_wrong_name_set_shape_or_dtype_is_a_mismatch() -> None:
    data = encode_lora(lora_state(), method="fedit", round=0)
    specs = lora_specs()
    missing = dict(specs)
    del missing[PREFIX.format(2, "v") + ".lora_B.weight"]
    with pytest.raises(PayloadMismatch, match="unexpected"):
        decode(data, Expect(tensors=missing))
    extra = specs | {"lm_head.lora_A.weight": TensorSpec((None, 4), torch.float32)}
    with pytest.raises(PayloadMismatch, match="missing"):
        decode(data, Expect(tensors=extra))
    wrong_shape = specs | {
        PREFIX.format(0, "q") + ".lora_A.weight": TensorSpec((None, 17), torch.float32)
    }
    with pytest.raises(PayloadMismatch, match="shape"):
        decode(data, Expect(tensors=wrong_shape))
    wrong_dtype = specs | {
        PREFIX.format(0, "q") + ".lora_B.weight": TensorSpec((HIDDEN, None), torch.bfloat16)
    }
    with pytest.raises(PayloadMismatch, match="dtype"):
        decode(data, Expect(tensors=wrong_dtype))


def test_rank_mismatch_between_a_and_b_is_a_mismatch() -> None:
    state = lora_state()
    state[PREFIX.format(1, "v") + ".lora_A.weight"] = torch.zeros(3, HIDDEN)
    data = raw_payload(state, kind="lora")
    with pytest.raises(PayloadMismatch, match=r"rank mismatch, lora_A has 3 rows, lora_B has 4"):
        decode(data)
    del state[PREFIX.format(1, "v") + ".lora_A.weight"]
    with pytest.raises(PayloadMismatch, match="no partner"):
        decode(raw_payload(state, kind="lora"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_values_are_refused(bad: float, dtype: torch.dtype) -> None:
    data = raw_payload({"w": torch.tensor([1.0, bad, 2.0], dtype=dtype)})
    with pytest.raises(NotFinite, match="'w'") as info:
        decode(data)
    assert info.value.code is ErrorCode.NOT_FINITE


def sparse_raw(indices: list[int], dtype: torch.dtype = torch.int64) -> bytes:
    return raw_payload(
        {"a.indices": torch.tensor(indices, dtype=dtype), "a.values": torch.ones(len(indices))},
        kind="sparse",
        shapes='{"a":[2,5]}',
    )


@pytest.mark.parametrize(
    ("indices", "why"),
    [
        ([0, 10], "outside"),
        ([-1, 3], "outside"),
        ([2, 2, 4], "strictly increasing"),
        ([4, 2], "strictly increasing"),
    ],
)
def test_sparse_indices_out_of_range_duplicated_or_unsorted(indices: list[int], why: str) -> None:
    assert decode(sparse_raw([0, 9])).shapes == {"a": (2, 5)}
    with pytest.raises(IndexOutOfRange, match=why) as info:
        decode(sparse_raw(indices, torch.int32))
    assert info.value.code is ErrorCode.INDEX_OUT_OF_RANGE


def test_sparse_with_wrong_names_or_lengths_is_a_mismatch() -> None:
    data = raw_payload(
        {"a.indices": torch.tensor([1, 2]), "a.values": torch.ones(3)},
        kind="sparse",
        shapes='{"a":[2,5]}',
    )
    with pytest.raises(PayloadMismatch, match="2 indices but 3 values"):
        decode(data)
    with pytest.raises(PayloadMismatch, match="full shapes"):
        decode(sparse_raw([1]), Expect(shapes={"a": (10,)}))


def seedcoef_raw(group: list[int], seed: list[int], k: int = 8, n_groups: int = 3) -> bytes:
    return raw_payload(
        {
            "group": torch.tensor(group, dtype=torch.int32),
            "seed": torch.tensor(seed, dtype=torch.int32),
            "value": torch.ones(len(group)),
        },
        kind="seedcoef",
        base_seed="5",
        k=str(k),
        n_groups=str(n_groups),
        randomness=str(randomness.VERSION),
    )


@pytest.mark.parametrize(
    ("group", "seed", "why"),
    [
        ([0, 1], [7, 8], r"seed indices outside \[0, 8\)"),
        ([0, 1], [-1, 0], "seed indices outside"),
        ([0, 3], [0, 0], r"group indices outside \[0, 3\)"),
        ([1, 2, 1], [4, 4, 4], "more than once"),
        ([1, 1], [4, 4], "more than once"),  # adjacent: not in strictly increasing order
    ],
)
def test_seedcoef_indices_out_of_range_or_duplicated(
    group: list[int], seed: list[int], why: str
) -> None:
    assert decode(seedcoef_raw([0, 2, 2], [7, 0, 1])).k == 8
    assert decode(seedcoef_raw([2, 0, 2], [1, 7, 0])).k == 8  # any order, each pair once
    with pytest.raises(IndexOutOfRange, match=why):
        decode(seedcoef_raw(group, seed))


def test_seedcoef_wrong_pool_dtype_or_randomness_version_is_a_mismatch() -> None:
    data = seedcoef_raw([0], [1])
    with pytest.raises(PayloadMismatch, match="edgefed.k is 8, expected 16"):
        decode(data, Expect(k=16))
    with pytest.raises(PayloadMismatch, match="edgefed.randomness"):
        decode(
            rewrite_header(data, lambda h: h["__metadata__"].update({"edgefed.randomness": "2"}))
        )
    int64_groups = raw_payload(
        {
            "group": torch.zeros(1, dtype=torch.int64),
            "seed": torch.zeros(1, dtype=torch.int32),
            "value": torch.ones(1),
        },
        kind="seedcoef",
        base_seed="5",
        k="8",
        n_groups="3",
        randomness=str(randomness.VERSION),
    )
    with pytest.raises(PayloadMismatch, match="'group': dtype torch.int64"):
        decode(int64_groups)


def test_masked_value_count_is_checked_against_the_regenerated_mask() -> None:
    seed, density, shape = 42, 0.25, (16, 16)
    name = "layers.1.mlp.up_proj.weight"
    count = randomness.mask_count(randomness.stream_key(seed, name), 256, density)
    assert 30 < count < 100  # 256 draws at p = 0.25: 64 expected
    good = encode_masked(
        {name: torch.ones(count)},
        {name: shape},
        seed=seed,
        density=density,
        method="slora",
        round=0,
    )
    assert decode(good, Expect()).raw_nbytes == 4 * count
    for wrong in (count - 1, count + 1):
        bad = encode_masked(
            {name: torch.ones(wrong)},
            {name: shape},
            seed=seed,
            density=density,
            method="slora",
            round=0,
        )
        assert (
            decode(bad).raw_nbytes == 4 * wrong
        )  # without expectations only the structure is checked
        with pytest.raises(
            PayloadMismatch, match=f"{wrong} masked values, the mask selects {count}"
        ):
            decode(bad, Expect(kind=PayloadKind.MASKED))
    with pytest.raises(PayloadMismatch, match="edgefed.seed"):
        decode(good, Expect(seed=43))
    with pytest.raises(PayloadMismatch, match="edgefed.density"):
        decode(good, Expect(density=0.5))


def test_masked_values_beyond_the_tensor_size_are_refused_without_expectations() -> None:
    with pytest.raises(PayloadMismatch, match="5 values for"):
        encode_masked(
            {"w": torch.ones(5)}, {"w": (2, 2)}, seed=1, density=0.5, method="slora", round=0
        )


def test_stacked_index_tampering_is_refused() -> None:
    data = encode_lora(lora_state(), method="fedit", round=0)
    stacked = "base_model.model.model.layers.*.self_attn.q_proj.lora_A.weight"

    def set_index(text: str) -> Callable[[dict], None]:
        def edit(h: dict) -> None:
            index = json.loads(h["__metadata__"]["edgefed.stacked"])
            index[stacked] = text
            h["__metadata__"]["edgefed.stacked"] = json.dumps(index)

        return edit

    for text in ("0-2", "0", "1-0", "0,0", "x", "0-99999999999"):
        with pytest.raises(PayloadError):
            decode(rewrite_header(data, set_index(text)))
    # "1,2" would rename layer 0/1 to 1/2 and collide with the plain layer-2 entry
    with pytest.raises(PayloadError, match="repeats"):
        decode(rewrite_header(data, set_index("1-2")))


def test_encode_refuses_a_header_over_the_cap() -> None:
    # 5000 tensors whose names hold no layer index cannot be stacked: ~75 header bytes each
    many = {f"w_{chr(97 + i % 26)}{'x' * (i // 26)}": torch.zeros(1) for i in range(5000)}
    with pytest.raises(PayloadHeaderTooLarge, match="exceeds 262144"):
        encode_dense(many, method="fedit", round=0)
    few = dict(list(many.items())[:100])
    assert len(decode(encode_dense(few, method="fedit", round=0)).tensors) == 100


@pytest.mark.parametrize("where", [0, 1, 2])
def test_one_finite_check_over_the_data_area_still_names_the_bad_tensor(where: int) -> None:
    tensors = {n: torch.ones(3, 4) * i for i, n in enumerate(("a", "b", "c"))}
    flat = tensors["abc"[where]].view(-1)
    flat[5] = math.nan
    data = raw_payload(tensors)
    with pytest.raises(NotFinite, match=f"'{'abc'[where]}'"):
        decode(data)


def test_decoded_tensors_are_views_of_one_copy_of_the_data_area() -> None:
    tensors = {n: torch.full((3, 4), float(i)) for i, n in enumerate(("a", "b", "c"))}
    data = raw_payload(tensors)
    decoded = decode(data).tensors
    storages = {t.untyped_storage().data_ptr() for t in decoded.values()}
    assert len(storages) == 1  # one copy, shared
    assert {n: t.tolist() for n, t in decoded.items()} == {
        n: t.tolist() for n, t in tensors.items()
    }
    decoded["a"].add_(1)  # writable, and a tensor's bytes are its own
    assert decoded["b"].eq(1).all() and decoded["a"].eq(1).all()
    assert decode(data).tensors["a"].eq(0).all()  # the received bytes were not written to


def big_lora(layers: int = 12, r: int = 8, hidden: int = 64) -> dict[str, torch.Tensor]:
    """Layers whose factors are stacked into a few large entries, as agents send them."""
    g = torch.Generator().manual_seed(7)
    state = {}
    for layer in range(layers):
        p = PREFIX.format(layer, "q")
        state[f"{p}.lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.01
        state[f"{p}.lora_B.weight"] = torch.randn(hidden, r, generator=g) * 0.01
    return state


MARK = 1234.5


def poked(name: str, index: int, value: float) -> bytes:
    """A LoRA payload whose tensor ``name`` holds ``value`` at flat ``index`` (its bytes patched
    in: encode refuses values that are not finite)."""
    state = big_lora()
    state[name].view(-1)[index] = MARK
    data = encode_lora(state, method="fedit", round=1)
    mark = struct.pack("<f", MARK)
    assert data.count(mark) == 1
    return data.replace(mark, struct.pack("<f", value))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("layer", "side", "index"), [(0, "A", 0), (5, "B", 301), (11, "A", 511)])
def test_one_bad_value_inside_a_stacked_payload_is_refused_naming_its_tensor(
    bad: float, layer: int, side: str, index: int
) -> None:
    name = f"{PREFIX.format(layer, 'q')}.lora_{side}.weight"
    with pytest.raises(NotFinite, match=re.escape(f"'{name}' holds NaN or infinite")):
        decode(poked(name, index, bad))


def test_a_huge_finite_value_is_not_refused_and_its_square_sum_overflows() -> None:
    """Values beyond ~1.8e19 overflow float32 squares: still finite, so not refused here (a
    clip bound deals with them); the sums of squares say so with inf."""
    name = f"{PREFIX.format(5, 'q')}.lora_B.weight"
    payload = decode(poked(name, 100, 1e30))
    assert payload.tensors[name].view(-1)[100] == pytest.approx(1e30, rel=1e-6)
    assert payload.square_sums[name] == math.inf
    assert all(math.isfinite(s) for n, s in payload.square_sums.items() if n != name)


def test_square_sums_are_the_tensors_sums_of_squares_within_float32_rounding() -> None:
    state = big_lora() | {"other": torch.randn(5, 7)}  # an entry that is not stacked
    payload = decode(encode_lora(big_lora(), method="fedit", round=1))
    plain = decode(encode_dense(state, method="fedit", round=1))
    for p in (payload, plain):
        assert set(p.square_sums) == set(p.tensors)
        for name, t in p.tensors.items():
            exact = float(t.double().square().sum())
            n = t.numel()
            gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
            assert abs(p.square_sums[name] - exact) <= gamma * exact
    ints = decode(raw_payload({"w": torch.ones(3), "i": torch.ones(2, dtype=torch.int32)}))
    assert set(ints.square_sums) == {"w"} and ints.square_sums["w"] == 3.0


def test_decoding_without_a_copy_views_a_writable_buffer_and_copies_a_read_only_one() -> None:
    state = big_lora()
    data = encode_lora(state, method="fedit", round=1)
    name = f"{PREFIX.format(3, 'q')}.lora_A.weight"
    shared = bytearray(data)
    viewed = decode(shared, copy=False).tensors[name]
    first = viewed.view(-1)[0].item()
    at = header_nbytes(data) + shared[header_nbytes(data) :].find(struct.pack("<f", first))
    shared[at : at + 4] = struct.pack("<f", 7.0)  # the tensor is a view of the buffer
    assert viewed.view(-1)[0].item() == 7.0
    copied = decode(shared).tensors[name]  # the default: a copy of its own
    shared[at : at + 4] = struct.pack("<f", 8.0)
    assert copied.view(-1)[0].item() == 7.0
    frozen = decode(data, copy=False).tensors[name]  # bytes: read-only, so copied
    frozen.add_(1)  # writable, no warning
    assert torch.equal(decode(data).tensors[name], state[name])
