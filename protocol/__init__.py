"""What travels between edgefed agents and the aggregator.

This package is shared by both sides. It depends on pyzmq, pydantic, safetensors, numpy and
torch (tensors only), never on transformers, peft or bitsandbytes.
"""

from protocol.errors import ProtocolError

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
"""Wire protocol versions this build speaks, newest last."""

RANDOMNESS_VERSION = 1
"""Version of the shared-randomness scheme (``spec/randomness.md``)."""

__all__ = ["PROTOCOL_VERSIONS", "RANDOMNESS_VERSION", "ProtocolError"]
