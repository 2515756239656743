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
from typing import TYPE_CHECKING, Any, Literal, get_args

from edge_agent.errors import ModelError

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
        with hf_progress(False):
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
