"""The one exception tree of megafs.

Every class carries the errno the FUSE layer answers with and the HTTP status
the server answers with, so each boundary translates errors in one place::

    MegafsError
    ├── NotFound                ENOENT     404
    ├── AlreadyExists           EEXIST     409
    ├── NotEmpty                ENOTEMPTY  409
    ├── VersionConflict         EAGAIN     409   stale node version
    ├── PermissionDenied        EACCES     403
    ├── AuthFailed              EACCES     401   bad credentials or session
    │   └── SecondFactorRequired EACCES    401   right password, a 2FA code is needed
    ├── RateLimited             EAGAIN     429   too many failed attempts; retry later
    ├── InvalidRequest          EINVAL     400
    ├── TooLarge                EFBIG      413
    ├── QuotaExceeded           ENOSPC     507
    ├── CursorExpired           ESTALE     410   change feed cursor too old: list again
    ├── IntegrityError          EIO        422   any failed authentication check
    ├── FormatError             EIO        422   unknown version/algorithm, bad params
    └── RemoteError             EIO        502   server unreachable or broken
        └── RemoteTimeout       ETIMEDOUT  504
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "AlreadyExists",
    "AuthFailed",
    "CursorExpired",
    "FormatError",
    "IntegrityError",
    "InvalidRequest",
    "LocalDiskFull",
    "MegafsError",
    "NotEmpty",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "RateLimited",
    "RemoteError",
    "RemoteTimeout",
    "SecondFactorRequired",
    "TooLarge",
    "VersionConflict",
    "error_for_code",
]


class MegafsError(Exception):
    """Base class. ``code`` is the stable name used on the wire."""

    errno: int = _errno.EIO
    http_status: int = 500
    code: str = "internal"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code


class NotFound(MegafsError):
    errno, http_status, code = _errno.ENOENT, 404, "not_found"


class AlreadyExists(MegafsError):
    errno, http_status, code = _errno.EEXIST, 409, "already_exists"


class NotEmpty(MegafsError):
    errno, http_status, code = _errno.ENOTEMPTY, 409, "not_empty"


class VersionConflict(MegafsError):
    errno, http_status, code = _errno.EAGAIN, 409, "version_conflict"


class PermissionDenied(MegafsError):
    errno, http_status, code = _errno.EACCES, 403, "permission_denied"


class AuthFailed(MegafsError):
    errno, http_status, code = _errno.EACCES, 401, "auth_failed"


class SecondFactorRequired(AuthFailed):
    """The password was right, but the account has two-factor
    authentication: log in again with a code. Never raised for a wrong
    password, so it tells nothing to someone who does not know it."""

    code = "second_factor_required"


class RateLimited(MegafsError):
    """Too many failed attempts for this account or client address.
    ``retry_after`` (seconds) is sent as the ``Retry-After`` header."""

    errno, http_status, code = _errno.EAGAIN, 429, "rate_limited"

    def __init__(self, detail: str = "", retry_after: int = 0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class InvalidRequest(MegafsError):
    errno, http_status, code = _errno.EINVAL, 400, "invalid_request"


class TooLarge(MegafsError):
    errno, http_status, code = _errno.EFBIG, 413, "too_large"


class QuotaExceeded(MegafsError):
    errno, http_status, code = _errno.ENOSPC, 507, "quota_exceeded"


class LocalDiskFull(MegafsError):
    """The disk holding the local cache has no room (or no inodes) left:
    nothing more is saved there until room is made; what is already saved
    stays. Raised by the client for its own disk; it has a wire code and
    status (507 Insufficient Storage) like every class, so that each
    boundary maps errors the same way."""

    errno, http_status, code = _errno.ENOSPC, 507, "local_disk_full"


class CursorExpired(MegafsError):
    """A change feed cursor the server can no longer answer: deletes after
    it were forgotten (or it is ahead of the account). The client lists
    everything again and follows the feed from a fresh cursor."""

    errno, http_status, code = _errno.ESTALE, 410, "cursor_expired"


class IntegrityError(MegafsError):
    """The one uniform error for every failed authentication check (rule 9).

    The message never says which check failed: that would be an oracle.
    """

    errno, http_status, code = _errno.EIO, 422, "integrity"

    def __init__(self, detail: str = "integrity check failed") -> None:
        super().__init__(detail)


class FormatError(MegafsError):
    errno, http_status, code = _errno.EIO, 422, "format"


class RemoteError(MegafsError):
    errno, http_status, code = _errno.EIO, 502, "remote"


class RemoteTimeout(RemoteError):
    errno, http_status, code = _errno.ETIMEDOUT, 504, "remote_timeout"


_BY_CODE: dict[str, type[MegafsError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        NotEmpty,
        VersionConflict,
        PermissionDenied,
        AuthFailed,
        SecondFactorRequired,
        RateLimited,
        InvalidRequest,
        TooLarge,
        QuotaExceeded,
        LocalDiskFull,
        CursorExpired,
        IntegrityError,
        FormatError,
        RemoteError,
        RemoteTimeout,
    )
}


def error_for_code(code: str, http_status: int) -> type[MegafsError]:
    """Map a wire error code (or, failing that, an HTTP status) back to a class."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    for cls in _BY_CODE.values():
        if cls.http_status == http_status:
            return cls
    return RemoteError
