"""Exceptions of the transport layer.

Everything the network can do wrong surfaces as a `NetworkError` subclass with a one-line message, so that
peer/ and coordinator/ can catch one type, print the line and skip the round (or exit) instead of hanging.
"""
from __future__ import annotations

import re

# Go's log prefix ("2026/11/23 18:41:24 "), which p2pd errors carry into hivemind's messages.
_GO_TIMESTAMP = re.compile(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} ")


class NetworkError(Exception):
    """The network did not do what was asked: bad address, peer gone, timeout, bad data."""


class BlobFetchError(NetworkError):
    """A blob could not be obtained from a peer; the round that needed it should be skipped.

    When raised for several failed fetches at once, `failures` maps each failed (peer, sha) to its error.
    """

    def __init__(self, message: str, failures: dict | None = None) -> None:
        super().__init__(message)
        self.failures: dict = failures or {}


class BlobNotFound(BlobFetchError):
    """The peer answered but does not hold a blob with that hash (never had it, or already dropped it)."""


class BlobIntegrityError(BlobFetchError):
    """The bytes received do not hash to the requested address: a faulty or malicious sender."""


class BlobTruncated(BlobIntegrityError):
    """The sender's stream ended before the blob was complete (tried again while the timeout lasts)."""


class BlobUnreachable(BlobFetchError):
    """The peer could not be dialled (its process is gone, or its addresses are dead): the next source should be
    tried at once, not after the timeout."""


class BlobMalformed(BlobFetchError):
    """The bytes hash to their address but do not decode as tensors: the sender built a broken blob."""


class BlobTimeout(BlobFetchError, TimeoutError):
    """The transfer did not finish in time."""


class GroupNotFound(NetworkError):
    """No group of the required size formed for this round before the deadline."""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (hivemind errors carry multi-line tracebacks and timestamps)."""
    text = str(error).strip() or type(error).__name__
    return _GO_TIMESTAMP.sub("", text.splitlines()[0])
