"""The project's error tree.

Every error the public API raises is a `CacheError`::

    CacheError
    ├── NotFoundError (also a LookupError)
    ├── LockedError
    ├── InvalidError
    ├── AlreadyExistsError
    ├── NeedsRemoteProvidersError   .digests: the lazy blobs without a handler
    ├── NoBlobsError
    ├── UnavailableError            containerd cannot be reached after the retry budget
    ├── FailedPreconditionError
    ├── UnimplementedError          the daemon does not implement the call or media type
    ├── AuthError                   a registry refused access (no or wrong credentials)
    ├── StoreDamagedError           .path, .lost: the metadata store is unreadable or lost records
    ├── NoSpaceError                a file system is full (the metadata store's or containerd's)
    └── ContainerdError             any other status containerd answers with

An error that comes from a containerd call carries `rpc` (the method, for example
`Content.Write`) and `message` (containerd's own text) besides its summary.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlreadyExistsError",
    "AuthError",
    "CacheError",
    "ContainerdError",
    "FailedPreconditionError",
    "InvalidError",
    "LockedError",
    "NeedsRemoteProvidersError",
    "NoBlobsError",
    "NoSpaceError",
    "NotFoundError",
    "StoreDamagedError",
    "UnavailableError",
    "UnimplementedError",
]


class CacheError(Exception):
    """Base of every error the project raises.

    `rpc` names the containerd method that failed and `message` is containerd's own text;
    both are empty for errors that did not come from containerd.
    """

    def __init__(self, summary: str, *, rpc: str = "", message: str = "") -> None:
        self.rpc = rpc
        self.message = message
        text = summary
        if rpc:
            text = f"{rpc}: {text}"
        if message and message not in summary:
            text = f"{text}: {message}"
        super().__init__(text)


class NotFoundError(CacheError, LookupError):
    """The record, snapshot, blob, lease or other object does not exist."""


class LockedError(CacheError):
    """The object is held by someone else (an open ref, another manager, an ingest lock)."""


class InvalidError(CacheError):
    """The input is not acceptable (bad argument, malformed digest, second release)."""


class AlreadyExistsError(CacheError):
    """An object with that name already exists."""


class FailedPreconditionError(CacheError):
    """containerd refused the call in the current state (snapshot has children, size mismatch)."""


class UnimplementedError(CacheError):
    """The daemon does not implement the call or the media type asked for."""


class AuthError(CacheError):
    """A registry refused access: no credentials were given, or they were not accepted."""


class UnavailableError(CacheError):
    """containerd could not be reached, even after the retry budget was spent."""


class ContainerdError(CacheError):
    """containerd answered with a status that has no more specific class."""


class StoreDamagedError(CacheError):
    """The metadata store cannot be read, or it lost records whose containerd objects still
    exist; `Manager.open(..., repair=True)` gives those records up explicitly.

    `path` is the damaged file; `lost` the ids of the records it no longer has (may be empty).
    """

    def __init__(self, summary: str, *, path: str, lost: Sequence[str] = ()) -> None:
        self.path = path
        self.lost = list(lost)
        super().__init__(summary)


class NoSpaceError(CacheError):
    """A write failed because its file system is full: the metadata store's (the summary names
    the file) or containerd's root (`rpc` and `message` say which call). Nothing half-written
    remains; the same call succeeds once space is freed."""


class NoBlobsError(CacheError):
    """A record has no blob and creating one was not allowed."""


class NeedsRemoteProvidersError(CacheError):
    """Lazy blobs of the chain have no descriptor handler to fetch them from."""

    def __init__(self, digests: Sequence[str]) -> None:
        self.digests = list(digests)
        super().__init__("missing descriptor handlers for lazy blobs " + ", ".join(self.digests))
