"""Model store: resolving specs, the GGUF conversion cache, hashing, quantized loading."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_agent.errors import ModelError
from edge_agent.model import files as model_files
from edge_agent.model import gguf_cache
from edge_agent.model import store as ms
from edge_agent.model.files import weights_sha256
from edge_agent.model.gguf_cache import MARKER
from edge_agent.model.store import (
    DEFAULT_MODEL,
    ResolvedModel,
    base_param_bytes,
    default_cache_dir,
    load_base,
    resolve_model,
)

# Parameter counts of the tiny model (conftest.TINY_CONFIG, vocab 49152, tied embeddings).
VOCAB, HIDDEN, KV, INTER, LAYERS = 49152, 64, 32, 128, 2
LINEAR_PARAMS = LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * INTER)  # 73728
OTHER_PARAMS = VOCAB * HIDDEN + LAYERS * 2 * HIDDEN + HIDDEN  # embeddings + norms
FP32_BYTES = 4 * (LINEAR_PARAMS + OTHER_PARAMS)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- hashing and HF directories ---------------------------------------------------------------


def test_weights_sha256_is_sha256sum_of_the_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.safetensors").write_bytes(b"second")
    (tmp_path / "a.safetensors").write_bytes(b"first-")
    (tmp_path / "notes.txt").write_bytes(b"ignored")
    assert weights_sha256(tmp_path) == hashlib.sha256(b"first-second").hexdigest()
    (tmp_path / "b.safetensors").unlink()
    assert weights_sha256(tmp_path) == hashlib.sha256(b"first-").hexdigest()


def test_resolve_hf_dir_hashes_in_place(tiny_model_dir: Path, tiny_resolved: ResolvedModel) -> None:
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    assert tiny_resolved == ResolvedModel(
        str(tiny_model_dir), tiny_model_dir, hashlib.sha256(data).hexdigest()
    )
    assert len(tiny_resolved.sha256) == 64


def test_hf_dir_hash_is_cached_until_the_weights_change(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = copy_dir(tiny_model_dir, tmp_path / "m")
    (model_dir / model_files.HASH_SIDECAR).unlink(missing_ok=True)
    real = resolve_model(str(model_dir)).sha256
    sidecar = json.loads((model_dir / model_files.HASH_SIDECAR).read_text())
    assert sidecar["sha256"] == real
    # The sidecar is trusted while sizes and mtimes match: a planted value proves it is read.
    sidecar["sha256"] = "0" * 64
    (model_dir / model_files.HASH_SIDECAR).write_text(json.dumps(sidecar))
    assert resolve_model(str(model_dir)).sha256 == "0" * 64
    weights = model_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert resolve_model(str(model_dir)).sha256 == real


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "no config.json"),
        ("model.safetensors", "no *.safetensors"),
        ("tokenizer*", "no tokenizer files"),
    ],
)
def test_incomplete_hf_dir_is_a_model_error(
    tiny_model_dir: Path, tmp_path: Path, remove: str, message: str
) -> None:
    model_dir = copy_dir(tiny_model_dir, tmp_path / "m")
    for path in model_dir.glob(remove):
        path.unlink()
    with pytest.raises(ModelError, match=message.replace("*", r"\*")):
        resolve_model(str(model_dir))


def test_missing_or_wrong_spec_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "nowhere"), tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"), tmp_path)


def test_damaged_gguf_is_a_model_error_and_leaves_no_cache_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name, data in [("random.gguf", os.urandom(256)), ("short.gguf", b"GGUF\x03\x00\x00")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match="cannot read GGUF model"):
            resolve_model(str(tmp_path / name), cache)
    assert sorted(p.suffix for p in cache.iterdir()) == [".lock", ".lock"]


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFED_CACHE", "/srv/edgefed/models")
    assert default_cache_dir() == Path("/srv/edgefed/models")
    monkeypatch.delenv("EDGEFED_CACHE")
    monkeypatch.setenv("HOME", "/home/agent")
    assert default_cache_dir() == Path("/home/agent/.cache/edgefed/models")


def test_embedded_gguf_is_installed() -> None:
    gguf = ms.embedded_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size == 98_362_432
    with gguf.open("rb") as f:
        assert f.read(4) == b"GGUF"


# --- the conversion cache, with a fake converter ----------------------------------------------


class FakeConverter:
    """Stands in for the GGUF dequantization: copies the tiny model, maybe slowly or failing."""

    def __init__(self, source: Path, *, delay: float = 0.0, fail: bool = False) -> None:
        self.source, self.delay, self.fail, self.calls = source, delay, fail, 0

    def __call__(self, gguf: Path, out: Path, *, progress: bool) -> None:
        self.calls += 1
        shutil.copy(self.source / "config.json", out / "config.json")
        time.sleep(self.delay)
        if self.fail:
            (out / "model.safetensors").write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        for path in self.source.iterdir():
            if not path.name.startswith("."):
                shutil.copy(path, out / path.name)


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.Q4.gguf"
    path.write_bytes(b"GGUF pretend content")
    return path


def cache_key(gguf: Path) -> str:
    return hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]


def test_gguf_is_converted_once_then_a_cache_hit(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, fake_gguf: Path, tmp_path: Path
) -> None:
    convert = FakeConverter(tiny_model_dir)
    monkeypatch.setattr(gguf_cache, "_gguf_to_hf_dir", convert)
    cache = tmp_path / "cache"
    first = resolve_model(str(fake_gguf), cache)
    second = resolve_model(str(fake_gguf), cache)
    assert convert.calls == 1
    assert first == second
    assert first.path == cache / cache_key(fake_gguf)
    assert first.sha256 == weights_sha256(tiny_model_dir)
    marker = json.loads((first.path / MARKER).read_text())
    assert marker["sha256"] == first.sha256
    assert marker["source_sha256"] == hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert marker["files"] == {
        "model.safetensors": (first.path / "model.safetensors").stat().st_size
    }
    assert not list(cache.glob(".*.tmp-*"))


def test_crash_mid_conversion_is_redone_never_half_used(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, fake_gguf: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(gguf_cache, "_gguf_to_hf_dir", FakeConverter(tiny_model_dir, fail=True))
    with pytest.raises(ModelError, match="No space left on device"):
        resolve_model(str(fake_gguf), cache)
    assert not (cache / cache_key(fake_gguf)).exists()
    assert not list(cache.glob(".*.tmp-*"))
    # A temp dir left by a killed process, and a final dir without marker, are both discarded.
    (cache / f".{cache_key(fake_gguf)}.tmp-99999").mkdir()
    (cache / cache_key(fake_gguf)).mkdir()
    (cache / cache_key(fake_gguf) / "model.safetensors").write_bytes(b"junk")
    convert = FakeConverter(tiny_model_dir)
    monkeypatch.setattr(gguf_cache, "_gguf_to_hf_dir", convert)
    resolved = resolve_model(str(fake_gguf), cache)
    assert convert.calls == 1
    assert resolved.sha256 == weights_sha256(tiny_model_dir)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [cache_key(fake_gguf), f"{cache_key(fake_gguf)}.lock"]
    )


def test_truncated_cached_weights_are_converted_again(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, fake_gguf: Path, tmp_path: Path
) -> None:
    convert = FakeConverter(tiny_model_dir)
    monkeypatch.setattr(gguf_cache, "_gguf_to_hf_dir", convert)
    first = resolve_model(str(fake_gguf), tmp_path)
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = resolve_model(str(fake_gguf), tmp_path)
    assert convert.calls == 2
    assert again.sha256 == first.sha256 == weights_sha256(first.path)


def test_concurrent_resolves_convert_once(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, fake_gguf: Path, tmp_path: Path
) -> None:
    convert = FakeConverter(tiny_model_dir, delay=0.3)
    monkeypatch.setattr(gguf_cache, "_gguf_to_hf_dir", convert)
    results: list[ResolvedModel] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve_model(str(fake_gguf), tmp_path / "cache"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert convert.calls == 1
    assert len(results) == 3 and len(set(results)) == 1


# --- loading ----------------------------------------------------------------------------------


def test_load_fp32_counts_every_weight_once(tiny_resolved: ResolvedModel) -> None:
    model, tokenizer = load_base(tiny_resolved, "fp32", device="cpu")
    assert model.config.use_cache is False
    assert tokenizer.pad_token == "<|im_end|>"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    buffers = sum(b.nbytes for b in model.buffers())
    assert buffers < 1024
    assert base_param_bytes(model) == FP32_BYTES + buffers


def test_load_bf16_halves_the_weights(tiny_resolved: ResolvedModel) -> None:
    model, _ = load_base(tiny_resolved, "bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert abs(base_param_bytes(model) - FP32_BYTES // 2) < 1024


def test_load_nf4_packs_linear_weights_in_four_bits(tiny_resolved: ResolvedModel) -> None:
    fp32, tokenizer = load_base(tiny_resolved, "fp32", device="cpu")
    nf4, _ = load_base(tiny_resolved, "nf4", device="cpu")
    q_proj = nf4.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.compute_dtype == torch.float32  # measured faster than bf16 on CPU
    # 4 bits per linear weight + one fp32 absmax per 64 + a 16-entry code book per layer.
    expected = 4 * OTHER_PARAMS + LINEAR_PARAMS // 2 + LINEAR_PARAMS // 64 * 4 + 14 * 16 * 4
    buffers = sum(b.nbytes for b in nf4.buffers())
    assert base_param_bytes(nf4) == expected + buffers
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = fp32(ids).logits.flatten(), nf4(ids).logits.flatten()
    assert not torch.equal(a, b)  # really quantized...
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9  # ...and still the model


def test_load_int8(tiny_resolved: ResolvedModel) -> None:
    model, tokenizer = load_base(tiny_resolved, "int8", device="cpu")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear8bitLt"
    # int8 weights + one fp32 scale per output row.
    rows = LAYERS * (2 * HIDDEN + 2 * KV + 2 * INTER + HIDDEN)
    buffers = sum(b.nbytes for b in model.buffers())
    assert base_param_bytes(model) == 4 * OTHER_PARAMS + LINEAR_PARAMS + 4 * rows + buffers
    ids = tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_load_errors_are_model_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    resolved = ResolvedModel("tiny", tiny_model_dir, "0" * 64)
    with pytest.raises(ModelError, match="unknown quantization 'int4'"):
        load_base(resolved, "int4", device="cpu")  # type: ignore[arg-type]
    broken = copy_dir(tiny_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ModelError, match="cannot load model broken"):
        load_base(ResolvedModel("broken", broken, "0" * 64), "fp32", device="cpu")


# --- the real embedded model ------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_converts_once_loads_in_nf4_and_generates(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = resolve_model(DEFAULT_MODEL, tmp_path)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    second = resolve_model(DEFAULT_MODEL, tmp_path)
    hit_s = time.perf_counter() - start
    assert second == first
    assert hit_s < 5.0 < convert_s
    assert first.path.parent == tmp_path
    assert first.sha256 == weights_sha256(first.path)
    config = json.loads((first.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )

    model: Any
    tokenizer: Any
    model, tokenizer = load_base(first, "nf4", device="cpu")
    nbytes = base_param_bytes(model)
    assert 150 * 2**20 < nbytes < 190 * 2**20  # fp32 would be 513 MiB
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
