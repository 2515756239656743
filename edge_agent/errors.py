"""Root exception of the agent package."""

from protocol.errors import ErrorCode


class EdgeAgentError(Exception):
    """Root of every error raised by :mod:`edge_agent`; its message is shown to the user as is."""


class ConfigError(EdgeAgentError):
    """The agent's configuration is invalid (all problems listed in the message)."""


class ModelError(EdgeAgentError):
    """The base model cannot be found, converted, hashed or loaded."""


class DataError(EdgeAgentError):
    """The agent's private data is missing or malformed (file name and line in the message)."""


class TaskError(EdgeAgentError):
    """A task cannot be run here (wrong model, unsupported method, not enough memory...)."""


class PayloadRejected(TaskError):
    """A blob of the task (a global state, an emulator, an alignment) is malformed or does not
    fit what the task says; answered with ``BAD_PAYLOAD``."""

    code = ErrorCode.BAD_PAYLOAD
