"""SLoRA (a sparse stage under seeded masks, then LoRA from the SVD of its update): its task
parameters and payload conventions (the wire spec). The files of this folder are named for their
roles; the registry imports `Params` from here. It may import `protocol` only (no torch
training, no transformers or peft).
"""

from protocol.methods.slora.spec import Params

__all__ = ["Params"]
