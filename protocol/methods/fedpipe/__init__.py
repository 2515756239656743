"""FedPipe (selected weights, per-agent ranks, batch and precision): its task parameters and
payload conventions (the wire spec). The files of this folder are named for their roles; the
registry imports `Params` from here. It may import `protocol` only (no torch training, no
transformers or peft).
"""

from protocol.methods.fedpipe.spec import Params

__all__ = ["Params"]
