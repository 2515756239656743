"""Keep library noise an operator cannot act on out of the agent log.

- bitsandbytes logs a WARNING when it imports on a CPU with AVX-512 BF16 and cannot fetch its
  optional ``kernels-community`` CPU kernel. With an fp32 or bf16 base no bitsandbytes kernel
  runs at all, so the record is held back; when an NF4/int8 base is loaded
  (:func:`quantized_base`) it is logged then, once (NF4 then runs bitsandbytes' slower CPU path;
  ``pip install kernels`` gives the fast one).
- transformers' ``is_gradient_checkpointing`` FutureWarning is raised inside peft
  (``get_peft_model`` reads the deprecated property): nothing to act on, so it is ignored.

:func:`install` is called once by ``edgefed-agent run``.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
log = logging.getLogger(__name__)
_state: dict[str, object] = {"quantized": False, "held": None}


class _DropBnbKernelsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" not in record.getMessage():
            return True
        if _state["quantized"]:
            return True
        _state["held"] = record.getMessage()  # said later if a quantized base is loaded
        return False


def quantized_base(quantized: bool) -> None:
    """Say whether the base the agent loads is quantized (NF4/int8) by bitsandbytes; when it is,
    a kernels-community warning held back at import is logged now, once."""
    _state["quantized"] = quantized
    held = _state["held"]
    if quantized and held:
        _state["held"] = None
        log.warning("bitsandbytes: %s", held)


def install() -> None:
    """Install the filters (idempotent)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropBnbKernelsWarning) for f in logger.filters):
        logger.addFilter(_DropBnbKernelsWarning())
    warnings.filterwarnings(
        "ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning
    )
