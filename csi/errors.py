"""Typed errors raised by pools, the system layer and the servicers.

Every error names the gRPC status it becomes; the translation happens in exactly one
place (``csi.server``'s interceptor, via :data:`STATUS_OF`). Messages are meant for a
person: say what was wrong and what to do about it.
"""

from __future__ import annotations

import errno

import grpc


class FlotillaError(Exception):
    """Base class; ``str(err)`` is the message sent to the caller."""


class InvalidArgument(FlotillaError):
    """The request is malformed or asks for something this driver never serves."""


class NotFound(FlotillaError):
    """The referenced volume, snapshot or path does not exist."""


class AlreadyExists(FlotillaError):
    """An object with this name exists but is incompatible with the request."""


class ResourceExhausted(FlotillaError):
    """The pool cannot fit the request (space, overprovisioning, a threshold)."""


class OutOfRange(FlotillaError):
    """A size is outside what the volume or pool can be."""


class FailedPrecondition(FlotillaError):
    """The object is in a state where the operation is not allowed now."""


class Aborted(FlotillaError):
    """Another operation holds this name or id; retry later."""


class Unavailable(FlotillaError):
    """A pool or dependency is unusable right now."""


class Unimplemented(FlotillaError):
    """The RPC exists in the CSI spec but this plugin does not serve it (and does not
    advertise the capability)."""


class Internal(FlotillaError):
    """An unexpected failure of a command or the storage underneath."""


class CommandFailed(Internal):
    """An external command exited non-zero or timed out."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        what = "timed out and was killed" if returncode is None else f"exited {returncode}"
        super().__init__(f"{argv[0]} {what}: {self.stderr[-500:]}")


class CommandTimeout(CommandFailed):
    """An external command exceeded its timeout; its process group was killed."""


STATUS_OF: dict[type[FlotillaError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    Internal: grpc.StatusCode.INTERNAL,
}


def status_code(err: FlotillaError) -> grpc.StatusCode:
    """The gRPC status for an error: the nearest class in :data:`STATUS_OF`."""
    for cls in type(err).__mro__:
        code = STATUS_OF.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


#: errno of a failed host call on a caller's path -> the error it is for the caller
_PATH_ERRORS: dict[int, tuple[type[FlotillaError], str]] = {
    errno.ENOENT: (NotFound, "does not exist"),
    errno.ENOTDIR: (InvalidArgument, "has a component that is not a directory"),
    errno.ELOOP: (InvalidArgument, "is or passes through a symbolic link"),
    errno.ENAMETOOLONG: (InvalidArgument, "is too long"),
    errno.EEXIST: (AlreadyExists, "already exists"),
    errno.EISDIR: (AlreadyExists, "is a directory"),
    errno.ENOTEMPTY: (FailedPrecondition, "is a directory that is not empty"),
    errno.EBUSY: (FailedPrecondition, "is busy"),
    errno.EACCES: (FailedPrecondition, "is not accessible to the plugin (permission denied)"),
    errno.EPERM: (FailedPrecondition, "is not accessible to the plugin (operation not "
                                      "permitted)"),
    errno.EROFS: (FailedPrecondition, "is on a read-only filesystem"),
    errno.ENOSPC: (ResourceExhausted, "is on a full filesystem"),
    errno.EXDEV: (InvalidArgument, "is on another filesystem than expected"),
}


def path_error(err: OSError, what: str, path: str) -> FlotillaError:
    """The typed error for a host call on a caller-supplied path that failed with ``err``.

    A caller can cause these (a path that vanished, a link, a busy mount): they get the
    status the spec gives, never INTERNAL. Other errno values are genuine faults."""
    known = _PATH_ERRORS.get(err.errno or 0)
    if known is None:
        return Internal(f"{what} {path!r}: {err.strerror or err}")
    cls, text = known
    return cls(f"{what} {path!r} {text}")
