"""Message headers: the JSON frame of every edgefed message.

Every header is a pydantic v2 model that is strict (no type coercion), forbids extra fields,
is frozen, rejects NaN and infinities, and bounds every string and list. The ``type`` field
discriminates the union :data:`Message`; :func:`parse_header` turns JSON bytes into one of them.

Who sends what:

====================  =====================  ====================================================
message               direction              purpose
====================  =====================  ====================================================
Hello                 agent → aggregator     identity, protocol versions, profile, held objects
Welcome               aggregator → agent     chosen version, heartbeat cadence
Heartbeat             both ways              liveness (Paranoid Pirate); agent reports its state
TaskAssign            aggregator → agent     a unit of work: method, round, base model, params
TaskResult            agent → aggregator     the update (blobs) and metrics; task id → idempotent
Grant                 aggregator → agent     send that large result now (upload flow control)
Ack                   aggregator → agent     the result is durably recorded; agent may delete it
ErrorReply            both ways              an error as data: code + reason, never with content
Bye                   both ways              orderly goodbye
====================  =====================  ====================================================
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from protocol.errors import BadHeader, ErrorCode, VersionMismatch

MAX_ID = 64
MAX_NAME = 256
MAX_REASON = 2048
MAX_BLOBS = 64
MAX_LIST = 256
Quant = Literal["nf4", "int8", "bf16", "fp32"]
"""Base model precisions an agent loads."""
MAX_PARAMS_JSON = 64 * 1024

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID, pattern=r"^[A-Za-z0-9._:@-]+$")]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=2**53)]
Round = Annotated[int, Field(ge=0, le=2**31)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=MAX_REASON
    )


def clip_text(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to at most ``limit`` characters (an ellipsis marks the cut): every text a
    reply quotes (a validation error echoing the sender's input, a list of names) fits its
    field, so building a reply can never fail on its length."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clipped(value: object) -> object:
    return clip_text(value) if isinstance(value, str) else value


def new_msg_id() -> str:
    """A fresh random message id (32 hex characters)."""
    return uuid.uuid4().hex


class BlobRef(_Strict):
    """One blob frame as listed in the header: checked on receipt for length and sha256."""

    name: Name
    nbytes: Count
    sha256: Sha256


class GpuInfo(_Strict):
    index: Annotated[int, Field(ge=0, le=1024)]
    name: Name
    memory_total: Count
    memory_free: Count


class Profile(_Strict):
    """What an agent measured of its machine (``edgefed-agent profile``)."""

    hostname: Name
    os: Name
    python: Name
    torch: Name
    cpus: Annotated[int, Field(ge=1, le=100_000)]
    ram_total: Count
    ram_available: Count
    disk_free: Count
    gpus: Annotated[list[GpuInfo], Field(max_length=64)] = []
    matmul_gflops_fp32: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    matmul_gflops_bf16: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    bandwidth_mbps: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    rtt_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class _Header(_Strict):
    """Fields every header carries."""

    run_id: Annotated[str, Field(max_length=MAX_ID, pattern=r"^[A-Za-z0-9._:@-]*$")] = ""
    round: Round = 0
    msg_id: Id = Field(default_factory=new_msg_id)
    sent_at: Finite = Field(default_factory=time.time)
    blobs: Annotated[list[BlobRef], Field(max_length=MAX_BLOBS)] = []


class Hello(_Header):
    type: Literal["hello"] = "hello"
    agent_id: Id
    versions: Annotated[
        list[Annotated[int, Field(ge=1, le=1000)]], Field(min_length=1, max_length=16)
    ]
    software: Annotated[str, Field(max_length=MAX_NAME)] = ""
    profile: Profile
    methods: Annotated[list[Name], Field(max_length=32)] = []
    models: Annotated[list[Sha256], Field(max_length=MAX_LIST)] = []
    """Content hashes of base models the agent holds."""
    holds: Annotated[list[Sha256], Field(max_length=MAX_LIST)] = []
    """Content hashes of large objects (emulators, manifests) the agent already holds."""
    role: Literal["agent", "region"] = "agent"
    """``region``: a regional tier (``edgefed-aggregator region``) that answers each task with
    its own agents' aggregate; a method may treat it differently (FedPipe plans no ranks for it
    and accepts its aggregate's rank)."""


class Welcome(_Header):
    type: Literal["welcome"] = "welcome"
    agent_id: Id
    version: Annotated[int, Field(ge=1, le=1000)]
    heartbeat_interval: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]
    liveness: Annotated[int, Field(ge=1, le=100)]
    grant_above: Count | None = None
    """Results whose message is larger than this many bytes wait for a :class:`Grant`: the agent
    lists them in its heartbeats' ``ready`` and sends one when granted. None: send at once."""


class Heartbeat(_Header):
    """Liveness, both ways. An agent's heartbeat may also carry link measurements.

    ``probe=True`` asks the aggregator to answer at once with a heartbeat whose ``echo`` is this
    message's id; an agent times an empty probe (RTT) and one with a probe blob (bandwidth), then
    reports both in ``rtt_ms`` and ``bandwidth_mbps`` of a later heartbeat.
    """

    type: Literal["heartbeat"] = "heartbeat"
    state: Literal["idle", "busy", "ok"] = "ok"
    task_id: Annotated[str, Field(max_length=MAX_ID)] = ""
    progress: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    probe: bool = False
    echo: Annotated[str, Field(max_length=MAX_ID)] = ""
    rtt_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    bandwidth_mbps: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    ready: Annotated[list[Id], Field(max_length=64)] = []
    """Task ids of large results the agent holds and waits to be granted (Welcome.grant_above)."""


class BaseModelRef(_Strict):
    """The base model a task runs on: a name for people, a content hash for machines."""

    name: Name
    sha256: Sha256


JsonScalar = str | int | float | bool | None


class TaskAssign(_Header):
    type: Literal["task_assign"] = "task_assign"
    task_id: Id
    kind: Literal["train", "eval", "score"] = "train"
    method: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")]
    model: BaseModelRef
    quant: Quant = "nf4"
    params: dict[str, Any] = {}
    """Method parameters; validated by ``protocol.methods.<method>`` on both sides."""
    deadline_s: Annotated[float, Field(gt=0, le=7 * 86400, allow_inf_nan=False)] = 3600.0

    @field_validator("params")
    @classmethod
    def _bounded_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            encoded = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"params must be finite JSON: {exc}") from None
        if len(encoded) > MAX_PARAMS_JSON:
            raise ValueError(f"params exceed {MAX_PARAMS_JSON} bytes of JSON")
        return value


class TaskResult(_Header):
    type: Literal["task_result"] = "task_result"
    task_id: Id
    agent_id: Id
    method: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")]
    kind: Literal["train", "eval", "score"] = "train"
    num_examples: Annotated[int, Field(ge=0, le=10**9)]
    metrics: Annotated[
        dict[Annotated[str, Field(max_length=64)], Finite], Field(max_length=64)
    ] = {}


class Ack(_Header):
    type: Literal["ack"] = "ack"
    task_id: Id
    accepted: bool = True


class ErrorReply(_Header):
    """An error as data. Carries no content blobs; ``ref`` names the message it answers."""

    type: Literal["error"] = "error"
    code: ErrorCode
    reason: Annotated[str, Field(max_length=MAX_REASON)]
    ref: Annotated[str, Field(max_length=MAX_ID)] = ""
    task_id: Annotated[str, Field(max_length=MAX_ID)] = ""

    _clip_reason = field_validator("reason", mode="before")(_clipped)

    @field_validator("blobs")
    @classmethod
    def _no_blobs(cls, value: list[BlobRef]) -> list[BlobRef]:
        if value:
            raise ValueError("an ErrorReply carries no blobs")
        return value


class Grant(_Header):
    """Upload flow control: the aggregator lets a few large results travel at a time, so what
    it buffers is bounded by its upload window, not by the number of agents."""

    type: Literal["grant"] = "grant"
    task_id: Id


class Bye(_Header):
    type: Literal["bye"] = "bye"
    reason: Annotated[str, Field(max_length=MAX_REASON)] = ""

    _clip_reason = field_validator("reason", mode="before")(_clipped)


Message = Annotated[
    Hello | Welcome | Heartbeat | TaskAssign | TaskResult | Ack | Grant | ErrorReply | Bye,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def parse_header(data: bytes | memoryview | str) -> Message:
    """Parse and validate one header; raise :class:`BadHeader` saying what is wrong."""
    try:
        return _ADAPTER.validate_json(data if not isinstance(data, memoryview) else bytes(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = clip_text(".".join(str(p) for p in first["loc"]), 120)
        # pydantic quotes the offending input (e.g. an unknown 3,000-character type): cut it
        raise BadHeader(
            f"invalid header at {where or 'top'}: {clip_text(first['msg'], 300)}"
        ) from None


def dump_header(message: BaseModel) -> bytes:
    """Serialise a header to compact JSON bytes (no NaN by construction)."""
    return message.model_dump_json().encode()


def negotiate(offered: list[int], supported: tuple[int, ...]) -> int:
    """The highest version both sides speak, or :class:`VersionMismatch`."""
    common = set(offered) & set(supported)
    if not common:
        raise VersionMismatch(
            f"agent speaks protocol versions {sorted(offered)}, aggregator speaks {list(supported)}"
        )
    return max(common)
