"""Exceptions of the protocol package: one root, one class per way a message or payload fails.

Every class carries a stable ``code`` (an :class:`ErrorCode`) so that a daemon can turn it into
an ``ErrorReply`` on the wire without a lookup table of its own.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Codes carried by ``ErrorReply``; stable across versions."""

    BAD_SIGNATURE = "BAD_SIGNATURE"
    HEADER_TOO_LARGE = "HEADER_TOO_LARGE"
    BAD_HEADER = "BAD_HEADER"
    FRAME_COUNT = "FRAME_COUNT"
    BLOB_LENGTH = "BLOB_LENGTH"
    BLOB_HASH = "BLOB_HASH"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    PAYLOAD_HEADER_TOO_LARGE = "PAYLOAD_HEADER_TOO_LARGE"
    BAD_PAYLOAD = "BAD_PAYLOAD"
    PAYLOAD_MISMATCH = "PAYLOAD_MISMATCH"
    INDEX_OUT_OF_RANGE = "INDEX_OUT_OF_RANGE"
    NOT_FINITE = "NOT_FINITE"
    UNKNOWN_AGENT = "UNKNOWN_AGENT"
    IDENTITY_MISMATCH = "IDENTITY_MISMATCH"
    REPLAY = "REPLAY"
    STALE_TASK = "STALE_TASK"
    MODEL_MISMATCH = "MODEL_MISMATCH"
    UNSUPPORTED_METHOD = "UNSUPPORTED_METHOD"
    REJECTED_UPDATE = "REJECTED_UPDATE"
    RESOURCES = "RESOURCES"
    TASK_FAILED = "TASK_FAILED"
    INTERNAL = "INTERNAL"


class ProtocolError(Exception):
    """Root of every error raised by :mod:`protocol`."""

    code: ErrorCode = ErrorCode.INTERNAL


# --- frames -----------------------------------------------------------------------------------


class FrameError(ProtocolError):
    """A multipart message is malformed."""

    code = ErrorCode.BAD_HEADER


class BadSignature(FrameError):
    code = ErrorCode.BAD_SIGNATURE


class HeaderTooLarge(FrameError):
    code = ErrorCode.HEADER_TOO_LARGE


class BadHeader(FrameError):
    """The header is not valid JSON or does not validate (unknown type, extra field, NaN...)."""

    code = ErrorCode.BAD_HEADER


class FrameCountMismatch(FrameError):
    code = ErrorCode.FRAME_COUNT


class BlobLengthMismatch(FrameError):
    code = ErrorCode.BLOB_LENGTH


class BlobHashMismatch(FrameError):
    code = ErrorCode.BLOB_HASH


class VersionMismatch(ProtocolError):
    code = ErrorCode.VERSION_MISMATCH


# --- payloads ---------------------------------------------------------------------------------


class PayloadError(ProtocolError):
    """A tensor payload is malformed or is not what the task expected."""

    code = ErrorCode.BAD_PAYLOAD


class PayloadHeaderTooLarge(PayloadError):
    code = ErrorCode.PAYLOAD_HEADER_TOO_LARGE


class PayloadMismatch(PayloadError):
    """Names, shapes, dtypes, kind, method or round differ from what was expected."""

    code = ErrorCode.PAYLOAD_MISMATCH


class IndexOutOfRange(PayloadError):
    """Sparse indices or seed indices outside their valid range (or duplicated)."""

    code = ErrorCode.INDEX_OUT_OF_RANGE


class NotFinite(PayloadError):
    code = ErrorCode.NOT_FINITE
