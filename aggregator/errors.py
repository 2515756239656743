"""Root exception of the aggregator package."""


class AggregatorError(Exception):
    """Root of every error raised by :mod:`aggregator`; its message is shown to the user as is."""


class ConfigError(AggregatorError):
    """The aggregator's configuration is invalid (all problems listed in the message)."""


class StateError(AggregatorError):
    """Persistent state (ledger, checkpoints) is missing, corrupt or inconsistent."""


class DamagedState(StateError):
    """What the ledger has committed cannot be read back (a committed round's checkpoint is
    missing, corrupt or not the one committed; a stored update is unreadable). Not the run's
    fault: the run keeps its status, and a restart after the operator mends the files resumes
    it."""


class DiskFull(StateError):
    """A write failed for want of space (ENOSPC, EDQUOT, SQLITE_FULL): transient; nothing
    committed or acknowledged is lost, and the service resumes once space is freed."""


class UpdateRejected(AggregatorError):
    """An agent's update failed validation; ``code`` says why on the wire."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
