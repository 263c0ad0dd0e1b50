#!/usr/bin/env python3
"""Create (or print) least-privilege Redis ACL users for one redisbus namespace.

usage: acl_setup.py [--url URL] [--apply] [--format commands|aclfile] [--redis6] [--prefix PREFIX] NAMESPACE

Three users, each confined to the namespace's keys and notify channel:

  <prefix>-<ns>-publisher  the trainer: writes chunks, commits versions (Lua), announces them
  <prefix>-<ns>-worker     collectors / inference servers: read versions, subscribe, write
                           only their own report in the workers hash
  <prefix>-<ns>-ops        operators (the redisbus CLI): everything on the namespace except
                           @dangerous commands (CONFIG, KEYS, FLUSHALL, ...)

Passwords come from the environment: REDISBUS_PUBLISHER_PASSWORD,
REDISBUS_WORKER_PASSWORD, REDISBUS_OPS_PASSWORD (a user whose variable is
unset is skipped). Rules carry only the SHA-256 of each password (``#<hex>``),
so neither the printed rules nor any output of this script contains one.

Without --apply the rules are printed (``ACL SETUSER ...`` lines for
redis-cli, or ``user ...`` lines for an aclfile); with --apply they are sent
to the Redis at --url / REDISBUS_URL, which must be a user allowed to run
ACL SETUSER. Re-running is safe: every rule set starts with ``reset``.
Redis 7 is assumed when printing; --redis6 prints rules Redis 6 accepts
(workers then get read-write key access, still limited to HSET as their only
write command). --apply detects the server's version itself.

Exit status: 0 done; 2 usage error (bad namespace, no password set); 4 Redis
unreachable, authentication failed, or ACL SETUSER refused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

ROLES = ("publisher", "worker", "ops")
PASSWORD_ENV = {role: f"REDISBUS_{role.upper()}_PASSWORD" for role in ROLES}

# What every redis-py connection does (PING health checks, SELECT, CLIENT SETNAME / SETINFO), minus the admin subcommands.
_CONNECTION = ["+@connection", "-@admin", "-@dangerous"]
# The trainer: allocate/commit scripts, chunk SET/DEL, GC of its own old versions, its report.
_PUBLISHER = [
    "+get", "+set", "+mget", "+incr", "+del", "+exists", "+strlen", "+getrange",
    "+zadd", "+zrem", "+zrange", "+pexpire", "+pttl", "+hset", "+publish",
    "+eval", "+evalsha", "+script|load", "+script|exists",
]
# A worker: read latest/pin, manifests and chunks; subscribe to notices.
_WORKER = ["+get", "+mget", "+strlen", "+getrange", "+exists", "+subscribe", "+unsubscribe"]
# Operators: all but the dangerous commands, still confined to the namespace's keys and channel.
_OPS = ["+@all", "-@dangerous"]


def _sha(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def user_name(prefix: str, namespace: str, role: str) -> str:
    """ACL user name of ``role`` for ``namespace``."""
    return f"{prefix}-{namespace}-{role}"


def rules(role: str, namespace: str, password: str, *, redis6: bool = False) -> list[str]:
    """The ACL SETUSER rules of ``role`` for ``namespace`` (the password only as its SHA-256).

    ``redis6``: Redis 6 has no read-only key patterns (``%R~``), so the worker
    then gets read-write key access to the namespace, still limited by its
    command list (no SET, DEL or scripts; HSET is its only write).
    """
    from redisbus.keys import KeySpace

    keys = KeySpace(namespace)
    head = ["reset", "resetchannels", "on", f"#{_sha(password)}", f"&{keys.notify}"]
    if role == "worker":
        # read everything of the namespace; write only the workers hash (HSET of its own report)
        if redis6:
            access = [f"~{keys.control_pattern}", f"~{keys.chunk_pattern}", "+hset"]
        else:
            access = [f"%R~{keys.control_pattern}", f"%R~{keys.chunk_pattern}", f"%RW~{keys.workers}", "+hset"]
        return head + access + _CONNECTION + _WORKER
    access = [f"~{keys.control_pattern}", f"~{keys.chunk_pattern}"]
    if role == "publisher":
        return head + access + _CONNECTION + _PUBLISHER
    if role == "ops":
        return head + access + _OPS
    raise ValueError(f"unknown role {role!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="acl_setup.py",
        description="Create or print least-privilege Redis ACL users (publisher, worker, ops) for a redisbus namespace.",
        epilog="Passwords: " + ", ".join(PASSWORD_ENV.values()) + " (unset = role skipped). "
        "Exit status: 0 done, 2 usage error, 4 Redis unreachable / refused.",
    )
    parser.add_argument("namespace", help="the bus namespace")
    parser.add_argument("--url", default=os.environ.get("REDISBUS_URL"), help="Redis URL of an ACL admin (default: REDISBUS_URL)")
    parser.add_argument("--apply", action="store_true", help="send the rules to Redis instead of printing them")
    parser.add_argument("--format", choices=("commands", "aclfile"), default="commands", help="printed form (default: commands)")
    parser.add_argument("--prefix", default="rb", help="user name prefix (default: rb)")
    parser.add_argument("--redis6", action="store_true", help="print rules for Redis 6 (no read-only key patterns)")
    args = parser.parse_args(argv)

    from redisbus.errors import ConfigError, RedisBusError
    from redisbus.keys import validate_namespace

    try:
        validate_namespace(args.namespace)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passwords = {role: pw for role, var in PASSWORD_ENV.items() if (pw := os.environ.get(var))}
    if not passwords:
        print(f"error: set at least one of {', '.join(PASSWORD_ENV.values())}", file=sys.stderr)
        return 2

    def users(redis6: bool) -> dict[str, list[str]]:
        return {user_name(args.prefix, args.namespace, r): rules(r, args.namespace, pw, redis6=redis6) for r, pw in passwords.items()}

    if not args.apply:
        for name, rule in users(args.redis6).items():
            print(("ACL SETUSER " if args.format == "commands" else "user ") + " ".join([name, *rule]))
        return 0

    import redis

    from redisbus.config import BusConfig
    from redisbus.transport import translate_errors

    try:
        config = BusConfig.from_env(args.url)
        client = config.client(retries=1)
        with translate_errors("applying ACL rules", client):
            version = str(client.info("server").get("redis_version", "7"))
            redis6 = int(version.split(".")[0]) < 7
            if redis6:
                print(f"note: Redis {version} has no read-only key patterns; workers get read-write key access", file=sys.stderr)
            for name, rule in users(redis6).items():
                client.execute_command("ACL", "SETUSER", name, *rule)
                print(f"ACL user {name} set ({len(rule)} rules)")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RedisBusError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
