"""Loading a resolved base model in a quantization: NF4, int8, bf16 or fp32.

:func:`load_base` loads the HF directory of a :class:`~edge_agent.model.resolved.ResolvedModel` with
transformers (bitsandbytes for NF4 and int8) for training: no KV cache, a pad token.
:func:`base_param_bytes` measures what the loaded base weights hold in memory.
:func:`hf_progress` shows or hides transformers' progress bars around a load or a conversion.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from edge_agent.errors import ModelError
from edge_agent.model import quiet

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from edge_agent.model.resolved import ResolvedModel

logger = logging.getLogger(__name__)

Quant = Literal["nf4", "int8", "bf16", "fp32"]
QUANTS: tuple[str, ...] = get_args(Quant)


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
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


def fast_bf16(device: str) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA with bf16, or a CPU with AVX512-BF16
    or AMX (oneDNN's bf16 kernels).

    Measured on the 2-core Xeon dev box (avx512_bf16, amx_bf16) with transformers 5.24 and
    bitsandbytes 0.50.2, SmolLM2-135M, LoRA r=8: a training step in NF4 with bf16 compute and
    bf16 non-quantized weights took 0.86x the fp32 step, fp32 compute 1.12x (issue 25; see
    ``benchmarks/agent_memory.py`` for the figures of this version).
    """
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype_name(quant: str, device: str) -> str:
    """The dtype of the weights a quantization leaves unquantized, and of its compute."""
    if quant == "fp32":
        return "fp32"
    if quant == "bf16":
        return "bf16"
    return "bf16" if fast_bf16(device) else "fp32"


class _DropInt8CastWarning(logging.Filter):
    """bnb logs a warning on *every* int8 matmul whose input is not fp16; once is plenty."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "MatMul8bitLt: inputs will be cast" not in record.getMessage():
            return True
        first, _DropInt8CastWarning.seen = not _DropInt8CastWarning.seen, True
        return first


def load_base(
    resolved: ResolvedModel,
    quant: Quant,
    *,
    device: str | None = None,
    cache_dir: Path | None = None,
    dtype: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model in ``quant`` on ``device`` (default: CUDA if present, else CPU).

    fp32 loads the base's own files. NF4, int8 and bf16 load a checkpoint saved in that
    precision (:mod:`edge_agent.model.quant_cache`, under ``cache_dir``, default the model cache),
    made from the base the first time. Their non-quantized weights and compute are in
    ``dtype`` ("bf16" or "fp32"; default bf16 where :func:`fast_bf16`, else fp32).

    The model has ``config.use_cache = False`` (training) and the tokenizer a pad token.
    peft's ``prepare_model_for_kbit_training`` is not called: it would cast the non-quantized
    weights back to fp32; gradient checkpointing is a training option instead
    (``TrainConfig.gradient_checkpointing``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_agent.model.quant_cache import quantized_checkpoint, release_heap

    if quant not in QUANTS:
        raise ModelError(f"unknown quantization {quant!r}; expected one of {', '.join(QUANTS)}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quiet.quantized_base(quant in ("nf4", "int8"))
    if dtype is None:
        dtype = compute_dtype_name(quant, dev)
    if dtype not in ("bf16", "fp32") or (quant in ("fp32", "bf16") and dtype != quant):
        raise ModelError(f"compute dtype {dtype!r} does not fit quantization {quant!r}")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    if quant == "int8":
        bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_logger.filters):
            bnb_logger.addFilter(_DropInt8CastWarning())
    start = time.perf_counter()
    try:
        with hf_progress(False):
            path = resolved.path
            if quant != "fp32":
                if cache_dir is None:
                    from edge_agent.model.files import default_cache_dir

                    cache_dir = default_cache_dir()
                path = quantized_checkpoint(
                    resolved, quant, dtype, _quantizing_kwargs(quant, torch_dtype, dev), cache_dir
                )
            model = AutoModelForCausalLM.from_pretrained(
                path, device_map={"": dev}, dtype=torch_dtype
            )
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except ModelError:
        raise
    except Exception as exc:  # damaged files fail in many ways (safetensors, json, bnb...)
        raise ModelError(
            f"cannot load model {resolved.name} ({quant}, {dev}) from {resolved.path}: {exc}"
        ) from None
    release_heap()
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(f"tokenizer of {resolved.name} has no pad, eos or unk token")
        tokenizer.pad_token = fallback
    model.config.use_cache = False
    if quant == "nf4":
        _disable_cpu_repacking(model)
    logger.info(
        "loaded %s (%s, %s compute, %s) in %.1f s: %.1f MiB of base weights",
        resolved.name,
        quant,
        dtype,
        dev,
        time.perf_counter() - start,
        base_param_bytes(model) / 2**20,
    )
    return model, tokenizer


def _quantizing_kwargs(quant: str, torch_dtype: torch.dtype, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that quantize the base (used once per checkpoint)."""
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {"device_map": {"": device}, "dtype": torch_dtype}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return kwargs


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
