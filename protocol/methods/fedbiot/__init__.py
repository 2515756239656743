"""FedBiOT (agents tune an adapter on a compressed emulator; the server aligns it): its task
parameters and payload conventions (the wire spec). The files of this folder are named for their
roles; the registry imports `Params` from here. It may import `protocol` only (no torch
training, no transformers or peft).
"""

from protocol.methods.fedbiot.spec import Params

__all__ = ["Params"]
