"""Exit statuses of the command-line tools, and the one-line errors they print, never with a password.

The ``redisbus`` command and ``scripts/gc_cron.py`` share them: 0 success;
1 verification failed (a bad chunk, manifest or signature, or corrupt data
met by any command); 2 usage error (bad option, malformed URL or namespace,
unreadable or refused file); 3 not found (unknown version, empty or unknown
namespace); 4 cannot connect to Redis or authentication failed; 5 Redis
refused a command (ACL, out of memory) or a publish failed; 130 interrupted.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from .errors import (
    BusConnectionError,
    ConfigError,
    CorruptBlobError,
    ManifestError,
    PublishError,
    RedisCommandError,
    SchemaMismatchError,
    SignatureError,
    VersionNotFoundError,
)
from .weightfiles import FileFormatError

__all__ = [
    "EXIT_CODES",
    "EXIT_CONNECTION",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "EXIT_VERIFY_FAILED",
    "exit_code_for",
    "redact",
]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONNECTION = 4
EXIT_REFUSED = 5
EXIT_INTERRUPTED = 130

#: Exit status -> meaning (documented in ``--help`` and the README).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_VERIFY_FAILED: "verification failed: a bad chunk, manifest or signature",
    EXIT_USAGE: "usage error: bad option, URL, namespace or file",
    EXIT_NOT_FOUND: "not found: unknown version, or nothing in the namespace",
    EXIT_CONNECTION: "cannot reach Redis, or authentication failed",
    EXIT_REFUSED: "Redis refused a command (ACL, out of memory), or a publish failed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

_BY_CLASS: list[tuple[type[BaseException], int]] = [
    (ConfigError, EXIT_USAGE),
    (VersionNotFoundError, EXIT_NOT_FOUND),
    (BusConnectionError, EXIT_CONNECTION),
    (RedisCommandError, EXIT_REFUSED),
    (ManifestError, EXIT_VERIFY_FAILED),
    (CorruptBlobError, EXIT_VERIFY_FAILED),
    (SignatureError, EXIT_VERIFY_FAILED),
    (SchemaMismatchError, EXIT_VERIFY_FAILED),
]


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an error (looking through ``PublishError`` to its cause).

    >>> exit_code_for(VersionNotFoundError("no version 9"))
    3
    """
    seen = exc
    while seen is not None:
        if isinstance(seen, FileFormatError):
            return EXIT_USAGE
        for kind, code in _BY_CLASS:
            if isinstance(seen, kind):
                return code
        if not isinstance(seen, PublishError):
            break
        seen = seen.__cause__  # type: ignore[assignment]
    return EXIT_REFUSED


def _secrets(url: str | None) -> list[str]:
    """Every string in ``url`` that may be a password, even in a malformed URL."""
    if not url:
        return []
    found = {url} if "@" in url else set()
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = url.split("://", 1)[-1].split("/", 1)[0]
    auth = netloc.rpartition("@")[0] if "@" in netloc else netloc
    if ":" in auth:
        secret = auth.split(":", 1)[1]
        found.update({secret, unquote(secret)})
    return [s for s in found if s and not s.isdigit()]


def redact(text: str, url: str | None) -> str:
    """``text`` with anything from ``url`` that may be a password replaced by ``***``.

    >>> redact("cannot reach redis://:s3cret@bus:6379/0", "redis://:s3cret@bus:6379/0")
    'cannot reach ***'
    """
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
