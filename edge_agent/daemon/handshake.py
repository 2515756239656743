"""The agent's side of the handshake: what its ``Hello`` says, and which answers end the daemon.

A ``Hello`` names the protocol versions this agent speaks, its software version, its machine
profile (RAM and bandwidth capped at the simulated limits of ``agent.toml``, if any), the
methods it runs (at most 32), the hash of its base model, the objects it already holds and its
role (``agent``, or ``region`` for a regional tier's upstream link).

The aggregator answers with ``Welcome`` or an ``ErrorReply``. One of :data:`REFUSALS` in answer
to the Hello cannot be fixed by retrying: the daemon exits with code 2, except MODEL_MISMATCH
and UNSUPPORTED_METHOD, which the next run of a serving aggregator may not give (the daemon
waits for it, see :data:`edge_agent.daemon.daemon.WAITS`). No answer at all is
usually a wrong address or key; :func:`no_answer_hint` says what to check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import metadata
from typing import Literal, cast

from pydantic import ValidationError

from edge_agent.daemon.config import AgentConfig
from edge_agent.daemon.link import LinkSettings
from edge_agent.errors import EdgeAgentError
from protocol import PROTOCOL_VERSIONS
from protocol.errors import ErrorCode
from protocol.messages import ErrorReply, Hello, Profile

MAX_METHODS = 32
"""Most method names one Hello lists."""

REFUSALS = frozenset(
    {
        ErrorCode.VERSION_MISMATCH,
        ErrorCode.UNKNOWN_AGENT,
        ErrorCode.IDENTITY_MISMATCH,
        ErrorCode.MODEL_MISMATCH,
        ErrorCode.UNSUPPORTED_METHOD,
    }
)
"""Answers to Hello that retrying cannot fix: the daemon exits with code 2."""


def make_hello(
    *,
    agent_id: str,
    profile: Profile,
    methods: Iterable[str],
    model_sha256: str,
    holds: list[str],
    role: Literal["agent", "region"],
) -> Hello:
    return Hello(
        agent_id=agent_id,
        versions=list(PROTOCOL_VERSIONS),
        software=f"edgefed-agent {software_version()}",
        profile=profile,
        methods=sorted(methods)[:MAX_METHODS],
        models=[model_sha256],
        holds=holds,
        role=role,
    )


def answers_hello(h: ErrorReply, hello_id: str) -> bool:
    """Whether ``h`` answers our Hello (by ref, or with no ref and no task at all).

    Not an answer to a heartbeat still in flight from before, which a restarted aggregator
    answers with UNKNOWN_AGENT too.
    """
    return h.ref == hello_id or (not h.ref and not h.task_id)


def is_refusal(h: ErrorReply, hello_id: str) -> bool:
    """An answer to our Hello that retrying cannot fix."""
    return answers_hello(h, hello_id) and h.code in REFUSALS


def no_answer_hint(link: LinkSettings) -> str:
    """What to check when the aggregator never answered the Hello."""
    where = link.endpoint
    if link.curve is None:
        return (
            f"no answer from the aggregator at {where}: check that it runs, that the address "
            "is right and reachable, and that it also runs with insecure = true"
        )
    return (
        f"no answer from the aggregator at {where}: check that it runs and is reachable, "
        "that security.server_public_key is the aggregator's public key, and that this "
        "agent's public key file is in the aggregator's allow-list directory"
    )


def agent_profile(config: AgentConfig) -> Profile:
    """This machine's measured profile, capped at the config's simulated memory and link rate."""
    from edge_agent.daemon.profile import collect_profile

    data = collect_profile(measure=True, disk_path=config.agent.state_dir)
    a = config.agent
    if a.memory_limit is not None:
        for key in ("ram_total", "ram_available"):
            data[key] = min(cast(int, data[key]), a.memory_limit)
        for gpu in cast(list[dict[str, int]], data.get("gpus") or []):  # where it trains, too
            for key in ("memory_total", "memory_free"):
                gpu[key] = min(int(gpu[key]), a.memory_limit)
    if a.bandwidth_limit_mbps is not None:
        data["bandwidth_mbps"] = a.bandwidth_limit_mbps
    try:
        return Profile.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        raise EdgeAgentError(f"machine profile is invalid: {exc.errors()[0]['msg']}") from None


def software_version() -> str:
    """The installed edgefed version, or ``dev`` when running from a source tree."""
    try:
        return metadata.version("edgefed")
    except metadata.PackageNotFoundError:
        return "dev"
