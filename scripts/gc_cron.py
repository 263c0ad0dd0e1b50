#!/usr/bin/env python3
"""Cron-friendly garbage collection of one or more redisbus namespaces.

usage: gc_cron.py [--url URL] [--keep N] [--grace SECONDS] [--pending-timeout SECONDS]
                  [--lock FILE] [--verbose] [--dry-run] NAMESPACE [NAMESPACE ...]

Runs what ``redisbus gc`` does for each namespace: keeps the newest --keep
versions (never ``latest`` nor the pinned version), gives older ones a grace
expiry, and fades chunks left by publishers that crashed before committing.

Made for cron: silent when all goes well (cron mails only what is printed),
one line per namespace on stdout with --verbose (for a log file), one line
per failure on stderr, never a password, and a lock file so runs never
overlap. A namespace that fails does not stop the others.

Example crontab line (every 10 minutes, with the virtualenv's python):

  */10 * * * * REDISBUS_URL=redis://:pw@bus:6379/0 /opt/venv/bin/python /opt/redisbus/scripts/gc_cron.py --keep 5 ppo-run-7

Exit status: 0 done; 2 usage error (bad namespace or URL); 3 a namespace
has nothing in Redis; 4 Redis unreachable or authentication failed;
5 Redis refused a command; 75 another run holds the lock (nothing done).
With several failing namespaces, the first failure's status is returned.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import tempfile
import time

from redisbus import defaults
from redisbus.errors import RedisBusError, VersionNotFoundError
from redisbus.exit_codes import exit_code_for, redact
from redisbus.ops import BusAdmin

EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later


def _default_lock() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"redisbus-gc-{os.getuid()}.lock")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gc_cron.py",
        description="Garbage-collect redisbus namespaces from cron: quiet on success, locked against overlap.",
        epilog="Exit status: 0 done, 2 usage, 3 namespace empty, 4 connection/auth, 5 refused, 75 locked.",
    )
    parser.add_argument("namespaces", nargs="+", metavar="NAMESPACE", help="namespaces to collect")
    parser.add_argument("--url", default=os.environ.get("REDISBUS_URL"), help="Redis URL (default: REDISBUS_URL)")
    parser.add_argument("--keep", type=int, default=defaults.KEEP_VERSIONS, help=f"newest versions kept (default {defaults.KEEP_VERSIONS})")
    parser.add_argument("--grace", type=float, default=defaults.GRACE_SECONDS, help=f"seconds evicted keys stay readable (default {defaults.GRACE_SECONDS:g})")
    parser.add_argument("--pending-timeout", type=float, default=defaults.PENDING_TIMEOUT_SECONDS,
                        help=f"age after which uncommitted chunks are orphans (default {defaults.PENDING_TIMEOUT_SECONDS:g})")
    parser.add_argument("--lock", default=_default_lock(), help="lock file held during the run (default: %(default)s)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print one line per namespace, also on success")
    parser.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    return parser


def collect_namespace(args: argparse.Namespace, namespace: str) -> int:
    """GC one namespace; print its line (verbose) or its error; return its exit status."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    admin = None
    try:
        admin = BusAdmin(args.url, namespace=namespace)
        if not admin.exists():
            raise VersionNotFoundError(f"nothing found for {admin.where()}")
        report = admin.gc(args.keep, dry_run=args.dry_run, grace_seconds=args.grace, pending_timeout=args.pending_timeout)
    except RedisBusError as exc:
        code = exit_code_for(exc)
        message = redact(" ".join(str(exc).split()), args.url)
        print(f"{stamp} redisbus-gc ns={namespace} error (exit {code}): {message}", file=sys.stderr)
        return code
    finally:
        if admin is not None:
            admin.close()
    if args.verbose:
        print(
            f"{stamp} redisbus-gc ns={namespace} keep={args.keep} "
            f"kept={','.join(map(str, report.kept)) or '-'} "
            f"{'would_evict' if args.dry_run else 'evicted'}={','.join(map(str, report.evicted)) or '-'} "
            f"orphan_chunks={report.orphan_chunks} url={admin.config.redacted_url()}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error("--keep must be at least 1")
    with open(args.lock, "a") as lock:  # held for the whole run, released on close
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"redisbus-gc: another run holds {args.lock}; nothing done", file=sys.stderr)
            return EXIT_LOCKED
        status = 0
        for namespace in args.namespaces:  # a failing namespace does not stop the others
            code = collect_namespace(args, namespace)
            status = status or code
        return status


if __name__ == "__main__":
    sys.exit(main())
