"""FedBiOT: agents train an adapter on a compressed emulator; the server aligns the emulator.

The base model's decoder layers split into the *bottom* part and the *adapter* (the last
``emulator.adapter_layers`` layers). The server keeps the bottom layers at a uniform stride
(``emulator.drop_ratio`` of them dropped, the first and last kept): that is the *emulator*. An
agent never holds the full bottom part; it is sent the *emulator bundle* once and trains LoRA on
the adapter layers of emulator + adapter. Between rounds the server aligns the emulator to the
full bottom part on public data (LoRA on the emulator layers, "alignment state"), and every
change of that state travels as a small delta.

Wire (blob names, all payloads of :mod:`protocol.payloads`; layouts in
:mod:`protocol.methods.fedbiot.emulator` and :mod:`protocol.methods.fedbiot.state`):

- TaskAssign (``train`` and ``eval``) carries :class:`Params` with ``task`` set (:class:`TaskInfo`:
  the bundle's sha256, the alignment version and its state's sha256) and, as needed:

  ``"emulator"``  the bundle (``dense``, round 0), only to an agent that does not hold it (by
                  ``Hello.holds``, or because it was sent it before); the agent keeps it in its
                  object store, so its Hello lists it after a restart. A bundle larger than
                  ``emulator.part_mb`` MiB travels as blobs ``"emulator.0"``, ``"emulator.1"``,
                  … (consecutive byte ranges of it, in one message): a ZeroMQ peer caps each
                  *frame* (an agent at 2 GiB), and a 7B model's emulator is ~7.4 GB.
  ``"align"``     the alignment state from the agent's version to the current one (``dense``):
                  the bf16 deltas of the missing versions, or the whole fp32 state when that is
                  smaller or the deltas are no longer kept. Absent when the agent is current.
  ``"global"``    the global adapter (``lora``, full-model layer names), from round 2 on; round 1
                  has none: every agent seeds the same adapter from ``lora.init_seed``.

- TaskResult (``train``): blob ``"update"``, the agent's adapter (``lora``) with the *full* model's
  layer indices (``base_model.model.model.layers.<L-k+j>...``), metadata ``fedbiot.emulator`` and
  ``fedbiot.align`` naming the emulator it was trained on. ``eval`` results: metrics only, of the
  *full* model with the global adapter plugged back (``eval_loss``, ``eval_rouge_l``,
  ``eval_em``) and ``emulator_eval_loss``, the emulator + adapter's loss on the same examples.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field

from protocol.errors import PayloadError
from protocol.frames import Buffer
from protocol.methods._common import (
    AggregationParams,
    EvalParams,
    LoraParams,
    ModuleName,
    StrictParams,
    TrainParams,
)

NAME = "fedbiot"
GLOBAL_BLOB = "global"
UPDATE_BLOB = "update"
EMULATOR_BLOB = "emulator"
ALIGN_BLOB = "align"

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class EmulatorParams(StrictParams):
    """How the emulator is cut from the base model."""

    adapter_layers: Annotated[int, Field(ge=1, le=256)] = 2
    """The last k decoder layers: trained (LoRA) by agents, plugged back into the full model."""
    drop_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.5
    """Fraction of the bottom layers dropped (uniform stride; first and last bottom kept)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision of the bundle's weights on the wire (agents compute in fp32 unless bf16)."""
    part_mb: Annotated[int, Field(ge=1, le=1536)] = 512
    """A bundle larger than this many MiB travels in parts of at most this size."""


class AlignParams(StrictParams):
    """The server's alignment of the emulator to the full bottom part, on public data."""

    r: Annotated[int, Field(ge=1, le=256)] = 4
    alpha: Annotated[float, Field(gt=0, le=4096)] = 8.0
    target_modules: Annotated[tuple[ModuleName, ...], Field(min_length=1, max_length=16)] = (
        "o_proj",
        "down_proj",
    )
    """Linears of the emulator layers that carry the alignment LoRA (they write the residual)."""
    initial_steps: Annotated[int, Field(ge=0, le=100_000)] = 48
    """Alignment steps before round 1 (on a background thread: the engine waits, unblocked)."""
    steps: Annotated[int, Field(ge=0, le=100_000)] = 8
    """Alignment steps after each round (0: the emulator changes only before round 1)."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 4
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-2
    max_len: Annotated[int, Field(ge=8, le=32768)] = 128
    kl_weight: Annotated[float, Field(ge=0, le=1e6)] = 0.5
    """Weight of KL(full ‖ emulator) on the outputs (with the current adapter), besides the
    hidden-state loss ‖t−s‖²/‖t‖² on what enters the adapter. 0.5, not the reference's released
    0: on the scoreboard (Natural Instructions, 3 seeds) 0.5 scored above 0 on every seed, a gap
    larger than its spread (docs/methods/fedbiot.md, "The KL weight")."""
    holdout: Annotated[int, Field(ge=1, le=100_000)] = 16
    """Public examples kept out of alignment: the held-out alignment loss and the full model's
    eval loss with the plugged-in adapter are measured on them."""
    history: Annotated[int, Field(ge=1, le=1000)] = 8
    """Deltas kept for agents that are behind (older ones get the whole state)."""
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    """Seeds the alignment LoRA's initial A (shared randomness) and the batch order."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class TaskInfo(StrictParams):
    """Set by the server in every task: the emulator the agent must use."""

    emulator_sha256: Sha256
    align_version: Annotated[int, Field(ge=0, le=2**31)]
    align_sha256: Sha256


class Params(StrictParams):
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    emulator: EmulatorParams = EmulatorParams()
    align: AlignParams = AlignParams()
    prox: Annotated[float, Field(ge=0, le=1e6)] = 0.0
    """λ of the agents' proximal term λ·‖merged adapter − merged adapter at round start‖², over
    the adapter layers' merged weights W + s·B·A (the reference's term; 0, the default: none).
    The reference's λ = 1 was this project's default until the scoreboard measured it (3 seeds,
    Natural Instructions, SmolLM2-135M): the full model's Rouge-L 0.187 ± 0.082 at λ = 1 against
    0.395 ± 0.036 at λ = 0 and 0.381 ± 0.043 at λ = 0.1, lower on every seed
    (docs/methods/fedbiot.md, "The proximal term")."""
    aggregation: AggregationParams = AggregationParams()
    """How the server combines the adapters (as FedIT's: rule, ΔW clip, weight cap)."""
    task: TaskInfo | None = None


_PART = re.compile(r"^emulator\.([0-9]+)$")


def bundle_blobs(data: bytes, part_bytes: int) -> dict[str, Buffer]:
    """The blobs that carry the bundle: one, or its byte ranges of at most ``part_bytes``."""
    if len(data) <= part_bytes:
        return {EMULATOR_BLOB: data}
    view = memoryview(data)
    return {
        f"{EMULATOR_BLOB}.{i}": view[start : start + part_bytes]
        for i, start in enumerate(range(0, len(data), part_bytes))
    }


def bundle_of(blobs: Mapping[str, Buffer]) -> Buffer | None:
    """The bundle a message carries (whole, or joined from its parts), or None."""
    if EMULATOR_BLOB in blobs:
        return blobs[EMULATOR_BLOB]
    parts = {int(m.group(1)): data for name, data in blobs.items() if (m := _PART.match(name))}
    if not parts:
        return None
    if sorted(parts) != list(range(len(parts))):
        raise PayloadError(f"emulator parts {sorted(parts)} are not 0..{len(parts) - 1}")
    return b"".join(parts[i] for i in range(len(parts)))
